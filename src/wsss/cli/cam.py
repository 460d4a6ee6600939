"""``wsss cam``: localisation maps for every image of a split (and label PNGs given a background threshold).

The normalisation and the class list come from the checkpoint; a segmentation checkpoint is localised through its
encoder (the ViT with its classifier). ``OUT/wsss-manifest.json`` records what made the folder (the checkpoint's
sha256, the map and its options, the views, the threshold, the dataset) and the files written: a rerun with the same
settings skips the images whose files it lists, so an interrupted run resumes; other settings are an error unless
``--overwrite``; a file it does not list is recomputed.

Images of one size are localised in batches, decoded by loader workers; under ``torchrun`` the ranks share the
images out (:mod:`wsss.cli.sharding`) and write the same files as one process.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.io import save_maps, write_mask
from ..data.manifest import check_output_folder, checkpoint_digest
from ..data.voc import VOCDataset
from ..errors import ConfigError
from ..localize.attention_gradients import checked_layer
from ..localize.base import parse_memory_size
from ..localize.split import iter_split_maps
from ..methods import REGISTRY
from ..models import checkpoint
from ..models.multiview import check_views
from ..pseudo.labels import maps_to_labels
from . import options, sharding


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``cam`` subcommand; ``--method`` lists the maps registered now."""
    p = subparsers.add_parser(
        "cam", help="write localisation maps (.npz) for a split, and label PNGs",
        description="Write OUT/<id>.npz maps of every image's classes (and OUT/labels/<id>.png with --threshold, "
        "or always on a dataset without background) for `wsss pseudo` and `wsss eval`. OUT/wsss-manifest.json "
        "records the settings and the files written: a rerun with the same settings resumes, with other settings it "
        "is an error unless --overwrite.")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, checkpoint folder or model.safetensors (a classifier, or a segmentation "
                   "model whose encoder is localised)")
    p.add_argument("--data", required=True, help="VOC-layout dataset root")
    p.add_argument("--split", default=None,
                   help="split name: ROOT/ImageSets/Segmentation/<split>.txt (default: none; a folder of your own "
                   "images takes every labelled image)")
    p.add_argument("--method", default="getam", choices=sorted(REGISTRY.maps()),
                   help="the map formula (`wsss methods` describes them)")
    p.add_argument("--out", required=True, help="output folder: <id>.npz maps (and labels/<id>.png)")
    p.add_argument("--threshold", type=options.fraction, default=None,
                   help="background threshold for label PNGs (default: none, only maps; datasets without "
                   "background: argmax labels, always written)")
    # Any integer: a negative index counts from the last block; the range depends on the model's depth.
    p.add_argument("--start-layer", type=int, default=None,
                   help="first block read by the maps that take it (getam, acr; negative: from the last, -1 = the "
                   "last block; default: the method's)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete the files the manifest of --out lists, even if made with other settings")
    p.add_argument("--memory-budget", type=_memory_size, default=None, metavar="SIZE",
                   help="most memory one image's maps may take, e.g. 4G (default: $WSSS_MEMORY_BUDGET, else a "
                   "quarter of the RAM or 90%% of the free GPU memory); a larger image is computed in chunks or at "
                   "a reduced size, with a warning")
    p.add_argument("--map-resolution", choices=("compact", "full"), default="compact",
                   help="compact (default): maps stored at a quarter of the patch size per pixel (4x the token "
                   "grid, float16), upsampled when read; full: at the image size")
    options.add_views(p, squares=True)
    options.add_normalization(p)
    options.add_batching(p)
    options.add_limit(p)
    options.add_device(p)
    p.set_defaults(func=run)


def _memory_size(text: str) -> int:
    """``--memory-budget``: a size such as ``4G``, ``512M`` or a byte count."""
    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def map_options(method: str, start_layer: int | None, depth: int) -> dict:
    """The localiser options of the command line; ``--start-layer`` only for the maps that read blocks from one."""
    if start_layer is None:
        return {}
    takes = sorted(name for name, cls in REGISTRY.maps().items()
                   if "start_layer" in inspect.signature(cls.__init__).parameters)
    if method not in takes:
        raise ConfigError(f"--start-layer applies to the maps {', '.join(takes)}, not {method}")
    try:
        checked_layer(start_layer, depth)
    except ValueError as exc:
        raise ConfigError(f"--start-layer: {exc}") from None
    return {"start_layer": start_layer}


def map_stride(resolution: str, patch_size: int) -> int:
    """Pixels per stored map value: a quarter of the patch (4x the token grid) for ``compact``, 1 for ``full``."""
    return 1 if resolution == "full" else max(patch_size // 4, 1)


def run(args: argparse.Namespace) -> int:
    """Write the maps (and labels) of every image of the split whose files the manifest of ``--out`` lacks."""
    check_views(args.scales, args.square_sizes)
    shard = sharding.join(args)
    source = checkpoint.resolve(args.checkpoint)
    model, spec = checkpoint.load(source, shard.device)
    vit = options.classifier_of(model, spec, source)
    dataset = VOCDataset(args.data, args.split, class_names=spec.classes)
    options.check_classes(spec, dataset.classes.names, source, args.data)
    options.check_classifier(vit.num_classes, dataset.classes.num_fg, source, args.data)
    mean, std = options.normalization(args, spec, source)
    localizer_options = map_options(args.method, args.start_layer, vit.depth)
    out = Path(args.out)
    check_output_folder(out, dataset.root, dataset.mask_dir)
    # Label PNGs need a background threshold, except on datasets without a background class (argmax).
    has_background = dataset.classes.has_background
    with_labels = args.threshold is not None or not has_background
    threshold = args.threshold if has_background else None
    stride = map_stride(args.map_resolution, vit.patch_size)
    settings = {"checkpoint_sha256": checkpoint_digest(source), "method": args.method, "start_layer": args.start_layer,
                "scales": [float(s) for s in args.scales], "flip": bool(args.flip), "mean": list(mean),
                "std": list(std), "labels": with_labels, "threshold": threshold, "map_stride": stride}
    if args.square_sizes:  # only when used, so folders written before the option still resume
        settings["square_sizes"] = list(args.square_sizes)
    indices = shard.take(options.limited(range(len(dataset)), args.limit))
    names = {i: [f"{dataset.ids[i]}.npz"] + ([f"labels/{dataset.ids[i]}.png"] if with_labels else [])
             for i in indices}
    with shard.open_manifest(out, "cam", settings, dataset.root, args.split, overwrite=args.overwrite,
                             command="wsss cam", arguments=vars(args)) as manifest:
        manifest.warn_untrusted(name for i in indices for name in names[i])
        palette = dataset.palette() if with_labels else None  # label PNGs in the dataset's own colours
        todo = [i for i in indices if not all(manifest.trusted(name) for name in names[i])]
        maps_iter = iter_split_maps(vit, dataset, args.method, args.scales, args.flip, mean, std, indices=todo,
                                    device=shard.device, memory_budget=args.memory_budget,
                                    batch_size=args.batch_size, square_sizes=args.square_sizes,
                                    num_workers=options.loader_workers(args, shard.device), **localizer_options)
        for image_id, maps, labels in tqdm(maps_iter, total=len(todo), desc=f"{args.method} maps",
                                           disable=not shard.is_main):
            if with_labels:
                pred = maps_to_labels(torch.from_numpy(maps), labels, threshold)
                write_mask(out / "labels" / f"{image_id}.png", pred.numpy().astype(np.uint8), palette)
                manifest.record(f"labels/{image_id}.png")
            save_maps(out / f"{image_id}.npz", maps, labels, stride=stride)
            manifest.record(f"{image_id}.npz")
    written, total = shard.finish(out, [len(todo), len(indices)])
    if shard.is_main:
        if written < total:
            print(f"resuming: {total - written} of {total} images already done")
        print(f"wrote {written} map files to {out}")
    return 0
