"""``wsss predict``: label PNGs of a split from a trained segmentation model (multi-scale, flip, optional CRF).

Images whose ``OUT/<id>.png`` exists are skipped, so an interrupted run resumes where it stopped; each PNG is
written atomically. The normalisation (mean/std) and the class list come from the checkpoint. Scales are relative
to each image's own size (GETAM's test instead resizes to squares of 256, 320 and 480, distorting the aspect ratio).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.voc import VOCDataset
from ..errors import ConfigError
from ..refine.crf import CRF_PRESETS
from ..segment.model import load_segmenter
from ..segment.predict import predict_split


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``predict`` subcommand."""
    p = subparsers.add_parser(
        "predict",
        help="segment a split with a trained segmentation model and write label PNGs",
        description="Write OUT/<id>.png (VOC palette) for every image of the split; existing PNGs are kept.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run folder, a checkpoint folder or a model.safetensors of a segmentation run")
    p.add_argument("--data", required=True, type=Path, help="dataset root (VOC layout)")
    p.add_argument("--split", required=True, help="split name: ROOT/ImageSets/Segmentation/<split>.txt")
    p.add_argument("--out", required=True, type=Path, help="folder for the <id>.png labels")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="resize factors of the views (default 1)")
    p.add_argument("--flip", action="store_true", help="add the mirrored view of every scale")
    p.add_argument("--crf", choices=sorted(CRF_PRESETS), default=None,
                   help="refine the probabilities with a dense CRF preset (getam: GETAM's test setting)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Predict every image of the split that has no label PNG yet."""
    if any(s <= 0 for s in args.scales):
        raise ConfigError(f"--scales must be positive, got {args.scales}")
    model, spec = load_segmenter(args.checkpoint)
    dataset = VOCDataset(args.data, args.split, require_labels=False)
    trained_on = spec.get("classes")
    if trained_on is not None and list(trained_on) != list(dataset.classes.names):
        raise ConfigError(f"{args.data}: classes {list(dataset.classes.names)} differ from the checkpoint's "
                          f"{list(trained_on)}")
    written, skipped = predict_split(model, dataset, args.out, args.scales, args.flip, args.crf,
                                     mean=spec.get("mean", [0.5] * 3), std=spec.get("std", [0.5] * 3),
                                     device=args.device)
    print(f"wrote {written} label PNGs to {args.out} ({skipped} already there)")
    return 0
