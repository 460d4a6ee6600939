"""``wsss import-checkpoint``: a published model from its authors' code as a wsss checkpoint, so that ``wsss predict``
and ``wsss eval`` score it like any model trained here."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.classes import ClassSet
from ..data.prepare_voc import VOC_CLASSES
from ..errors import ConfigError
from ..models.checkpoint import describe, save
from ..models.dpt import import_authors_checkpoint
from ..models.hub import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("getam",)
GETAM_BACKBONES = {"vitb_hybrid": "vit_base_r50_s16_384", "vitb": "vit_base_patch16_384"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``import-checkpoint`` subcommand."""
    p = subparsers.add_parser(
        "import-checkpoint", help="convert an authors' released model into a wsss checkpoint",
        description="Convert a released model of a paper's own code into RUN/model.safetensors with its spec "
        "(architecture, classes, input normalisation), loading every weight strictly. getam: the state dict of "
        "GETAM's DPTSegmentationModel (test.py's --weights).")
    p.add_argument("path", type=Path, help="the authors' checkpoint (.pth)")
    p.add_argument("--format", choices=FORMATS, default="getam", help="whose code saved it (default: getam)")
    p.add_argument("--backbone", choices=sorted(GETAM_BACKBONES), default="vitb_hybrid",
                   help="their --backbone name (default: vitb_hybrid)")
    p.add_argument("--classes", type=Path, default=None,
                   help="a classes.txt, background first (default: the 21 PASCAL VOC classes)")
    p.add_argument("--out", type=Path, required=True, help="run folder to write model.safetensors into")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert, save and say what was written."""
    classes = list(VOC_CLASSES if args.classes is None else ClassSet.from_file(args.classes).names)
    if len(classes) < 2 or not ClassSet(tuple(classes)).has_background:
        raise ConfigError(f"{args.classes}: GETAM's models predict a background first and at least one class; "
                          f"got {classes}")
    arch = GETAM_BACKBONES[args.backbone]
    model = import_authors_checkpoint(args.path, arch=arch, num_classes=len(classes))
    # GETAM normalises with the ImageNet statistics (tool/imutils.py Normalize) and trains end to end.
    spec = describe(model, arch, classes=classes, mean=IMAGENET_MEAN, std=IMAGENET_STD, method="getam")
    target = args.out / "model.safetensors"
    save(target, model, spec)
    print(f"wrote {target}: GETAM {args.backbone} ({arch}) with the DPT decoder, {len(classes)} classes")
    return 0
