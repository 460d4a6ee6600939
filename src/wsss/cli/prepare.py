"""``wsss prepare voc|coco``: build the standard datasets in the VOC layout the toolkit reads."""

from __future__ import annotations

import argparse
import logging
import os

from ..data.prepare_coco import prepare_coco
from ..data.prepare_voc import prepare_voc
from . import options


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=options.non_negative_int, default=_default_workers(),
                   help="worker processes (0 = run in this process; default: %(default)s)")
    p.add_argument("--copy-images", action="store_true",
                   help="copy the images into OUT/JPEGImages instead of symlinking them")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="only warn when a split size differs from the official one (for subsets)")
    p.add_argument("--overwrite", action="store_true", help="rewrite masks that already exist")


def add_parser(subparsers) -> None:
    """Register ``prepare`` with its ``voc`` and ``coco`` sub-commands."""
    parser = subparsers.add_parser("prepare", help="build VOC+SBD train_aug or COCO VOC-style masks")
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="{voc,coco}")

    voc = datasets.add_parser("voc", help="VOC 2012 + SBD -> train_aug (10,582), train, val")
    voc.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 (or VOCdevkit, or the folder above it)")
    voc.add_argument("--sbd", required=True, help="SBD benchmark_RELEASE/dataset (or benchmark_RELEASE)")
    voc.add_argument("--out", required=True, help="output dataset root (VOC layout)")
    _add_common(voc)
    voc.set_defaults(func=run)

    coco = datasets.add_parser("coco", help="COCO instances -> VOC-style masks (80 classes + background)")
    coco.add_argument("--coco", required=True, help="COCO root with annotations/ and {train,val}YEAR/")
    coco.add_argument("--year", type=options.positive_int, default=2014, help="release year (default: %(default)s)")
    coco.add_argument("--out", default=None, help="output dataset root (default: COCO/voc_layout)")
    coco.add_argument("--splits", nargs="+", default=["train", "val"], help="splits (default: train val)")
    _add_common(coco)
    coco.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen converter and print what it produced."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    common = dict(copy_images=args.copy_images, workers=args.workers, strict=args.strict,
                  overwrite=args.overwrite)
    if args.dataset == "voc":
        s = prepare_voc(args.voc, args.sbd, args.out, **common)
        print(f"VOC dataset ready at {s.out}: " + ", ".join(f"{k} {n}" for k, n in s.split_sizes.items()))
        print(f"masks: {s.num_from_voc} from VOC, {s.num_from_sbd} from SBD; "
              f"{s.num_written} written, {s.num_skipped} already there")
        return 0
    s = prepare_coco(args.coco, args.year, args.out, splits=args.splits, **common)
    print(f"COCO dataset ready at {s.out}")
    for split, n in s.split_sizes.items():
        print(f"  {split}: {n} images ({split}_full.txt), {s.labelled_sizes[split]} with annotations "
              f"({split}.txt), {len(s.unlabelled[split])} without (background-only masks)")
    print(f"masks: {s.num_written} written, {s.num_skipped} already there")
    return 0
