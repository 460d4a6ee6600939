"""``wsss cam``: localisation maps for every image of a split (and label PNGs given a background threshold).

The normalisation and the class list come from the checkpoint; a segmentation checkpoint is localised through its
encoder (the ViT with its classifier). Images whose outputs exist are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.io import save_maps, write_mask
from ..data.voc import VOCDataset
from ..errors import ConfigError
from ..localize.attention_gradients import checked_layer
from ..localize.split import iter_split_maps
from ..methods import REGISTRY
from ..models import checkpoint
from ..pseudo.labels import maps_to_labels
from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``cam`` subcommand; ``--method`` lists the maps registered now."""
    p = subparsers.add_parser(
        "cam", help="write localisation maps (.npz) for a split, and label PNGs",
        description="Write OUT/<id>.npz maps of every image's classes (and OUT/labels/<id>.png with --threshold, "
        "or always on a dataset without background) for `wsss pseudo` and `wsss eval`.")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, checkpoint folder or model.safetensors (a classifier, or a segmentation "
                   "model whose encoder is localised)")
    p.add_argument("--data", required=True, help="VOC-layout dataset root")
    p.add_argument("--split", required=True, help="split name: ROOT/ImageSets/Segmentation/<split>.txt")
    p.add_argument("--method", default="getam", choices=sorted(REGISTRY.maps()),
                   help="the map formula (`wsss methods` describes them)")
    p.add_argument("--out", required=True, help="output folder: <id>.npz maps (and labels/<id>.png)")
    p.add_argument("--threshold", type=float, default=None,
                   help="background threshold for label PNGs (default: none, only maps; datasets without "
                   "background: argmax labels, always written)")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first block read by the maps that take it (getam, acr; default: the method's)")
    options.add_views(p)
    options.add_normalization(p)
    options.add_limit(p)
    options.add_device(p)
    p.set_defaults(func=run)


def _map_options(method: str, start_layer: int | None, depth: int) -> dict:
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


def run(args: argparse.Namespace) -> int:
    """Write the maps (and labels) of every image of the split that has none yet."""
    device = options.resolve_device(args.device)
    source = checkpoint.resolve(args.checkpoint)
    model, spec = checkpoint.load(source, device)
    vit = model.encoder if spec.is_segmenter else model
    dataset = VOCDataset(args.data, args.split)
    options.check_classes(spec, dataset.classes.names, source, args.data)
    options.check_classifier(vit.num_classes, dataset.classes.num_fg, source, args.data)
    mean, std = options.normalization(args, spec, source)
    map_options = _map_options(args.method, args.start_layer, vit.depth)
    out = Path(args.out)
    # Label PNGs need a background threshold, except on datasets without a background class (argmax).
    has_background = dataset.classes.has_background
    with_labels = args.threshold is not None or not has_background
    threshold = args.threshold if has_background else None
    todo = [i for i in options.limited(range(len(dataset)), args.limit)
            if not (out / f"{dataset.ids[i]}.npz").is_file()
            or (with_labels and not (out / "labels" / f"{dataset.ids[i]}.png").is_file())]
    total = len(options.limited(dataset.ids, args.limit))
    if len(todo) < total:
        print(f"resuming: {total - len(todo)} of {total} images already done")
    maps_iter = iter_split_maps(vit, dataset, args.method, args.scales, args.flip, mean, std, indices=todo,
                                device=device, **map_options)
    for image_id, maps, labels in tqdm(maps_iter, total=len(todo), desc=f"{args.method} maps"):
        if with_labels:
            pred = maps_to_labels(torch.from_numpy(maps), labels, threshold)
            write_mask(out / "labels" / f"{image_id}.png", pred.numpy().astype(np.uint8))
        save_maps(out / f"{image_id}.npz", maps, labels)  # last, so a present .npz means the image is done
    print(f"wrote {len(todo)} map files to {out}")
    return 0
