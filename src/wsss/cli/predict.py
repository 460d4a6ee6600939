"""``wsss predict``: label PNGs of a split from a trained segmentation model (multi-scale, flip, optional CRF).

``OUT/wsss-manifest.json`` records what made the folder (the checkpoint's sha256, the views, the CRF, the dataset) and
the PNGs written; a rerun with the same settings skips the PNGs it lists, so an interrupted run resumes where it
stopped. Other settings are an error unless ``--overwrite``; a PNG it does not list is recomputed. Each PNG is
written atomically. The normalisation (mean/std) and the class list come from the checkpoint. Scales are relative
to each image's own size (GETAM's test instead resizes to squares of 256, 320 and 480, distorting the aspect ratio).
``--fusion`` combines the views: the mean of their logits (GETAM), or the pixel-wise max of each scale's softmax
(AReAM's test: ``--scales 0.5 0.75 1 1.25 1.5 --fusion max --crf-preset aream``, no flip).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from ..data.manifest import check_output_folder, checkpoint_digest
from ..data.voc import VOCDataset
from ..errors import CheckpointError, ConfigError
from ..models import checkpoint
from ..models.multiview import check_views
from ..refine.crf import CRF_PRESETS
from ..segment.predict import FUSIONS, predict_split
from ..train.validate import labels_grid
from ..visualize import save_picture
from . import options, sharding

SHOW_DIR = "show"  # --show: the pictures, beside the label PNGs
SHOW_TILE = 256


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``predict`` subcommand."""
    p = subparsers.add_parser(
        "predict",
        help="segment a split with a trained segmentation model and write label PNGs",
        description="Write OUT/<id>.png (VOC palette) for every image of the split (with --show also a picture of "
        "each in OUT/show/). OUT/wsss-manifest.json records "
        "the settings and the PNGs written: a rerun with the same settings resumes (keeps the PNGs it lists), with "
        "other settings it is an error unless --overwrite.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run folder, a checkpoint folder or a model.safetensors of a segmentation run")
    p.add_argument("--data", required=True, type=Path, help="dataset root (VOC layout)")
    p.add_argument("--split", default=None,
                   help="split name: ROOT/ImageSets/Segmentation/<split>.txt (default: none; a folder of your own "
                   "images takes every labelled image)")
    p.add_argument("--out", required=True, type=Path, help="folder for the <id>.png labels")
    p.add_argument("--refine", choices=("none", "crf"), default=None,
                   help="refinement of the probabilities before the argmax, as in wsss pseudo (default: none; crf "
                   "where --crf-preset is given)")
    options.add_crf(p, CRF_PRESETS, "psa with --refine crf; getam is GETAM's test setting, aream AReAM's")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete the files the manifest of --out lists, even if made with other settings")
    p.add_argument("--show", action="store_true",
                   help="also write OUT/show/<id>.png for people: the image, its ground truth where the dataset has "
                   "masks and the prediction, titled, in the dataset's palette with a class legend")
    options.add_views(p, what="probabilities", squares=True)
    p.add_argument("--fusion", choices=FUSIONS, default="mean",
                   help="how the views combine: mean (of their logits, then the softmax; GETAM) or max (the "
                   "pixel-wise max of each scale's softmax; AReAM's test: --scales 0.5 0.75 1 1.25 1.5 --fusion max "
                   "--crf-preset aream, no flip) (default: mean)")
    options.add_normalization(p)
    options.add_batching(p)
    options.add_limit(p)
    options.add_device(p)
    p.set_defaults(func=run)


def manifest_settings(digest: str, args: argparse.Namespace, mean: Sequence[float],
                      std: Sequence[float]) -> dict[str, Any]:
    """The settings that decide the PNGs: the checkpoint's content, the views, the CRF and the normalisation."""
    settings = {"checkpoint_sha256": digest, "scales": [float(s) for s in args.scales], "flip": bool(args.flip),
                "crf": crf_preset(args), "mean": list(mean), "std": list(std)}
    if args.square_sizes:  # only when used, so folders written before the option still resume
        settings["square_sizes"] = list(args.square_sizes)
    if args.fusion != "mean":  # likewise
        settings["fusion"] = args.fusion
    return settings


def crf_preset(args: argparse.Namespace) -> str | None:
    """The dense CRF preset the probabilities go through (None: no CRF), chosen as in ``wsss pseudo``."""
    if options.crf_refinement(args.refine, args.crf_preset) != "crf":
        return None
    return args.crf_preset or "psa"


def run(args: argparse.Namespace) -> int:
    """Predict every image of the split whose label PNG the manifest of ``--out`` does not list."""
    check_views(args.scales, args.square_sizes)
    shard = sharding.join(args)
    source = checkpoint.resolve(args.checkpoint)
    model, spec = checkpoint.load(source, shard.device)
    if not spec.is_segmenter:
        raise CheckpointError(f"{source} is a{'n' if spec.task[0] in 'aeiou' else ''} {spec.task} model; `wsss "
                              "predict` needs a segmentation model (localise a classifier with `wsss cam`, walk "
                              "maps with an AffinityNet with `wsss affinity walk`)")
    dataset = VOCDataset(args.data, args.split, require_labels=False, class_names=spec.classes)
    options.check_classes(spec, dataset.classes.names, source, args.data)
    mean, std = options.normalization(args, spec, source)
    check_output_folder(args.out, dataset.root, dataset.mask_dir)
    settings = manifest_settings(checkpoint_digest(source), args, mean, std)
    indices = shard.take(options.limited(range(len(dataset)), args.limit))
    with shard.open_manifest(args.out, "predict", settings, dataset.root, args.split, overwrite=args.overwrite,
                             command="wsss predict", arguments=vars(args)) as manifest:
        written, skipped = predict_split(model, dataset, args.out, args.scales, args.flip, crf_preset(args), mean=mean,
                                         std=std, device=shard.device, indices=indices, manifest=manifest,
                                         batch_size=args.batch_size,
                                         num_workers=options.loader_workers(args, shard.device),
                                         progress=shard.is_main, square_sizes=args.square_sizes,
                                         fusion=args.fusion)
    if args.show:  # drawn from the PNGs on disk, so a resumed run shows the images it skipped too
        for i in indices:
            save_picture(args.out / SHOW_DIR / f"{dataset.ids[i]}.png",
                         labels_grid(dataset, {"prediction": args.out}, [i], tile=SHOW_TILE))
    written, skipped = shard.finish(args.out, [written, skipped])
    if shard.is_main:
        shown = f"; pictures in {args.out / SHOW_DIR}" if args.show else ""
        print(f"wrote {written} label PNGs to {args.out} ({skipped} already there){shown}")
    return 0
