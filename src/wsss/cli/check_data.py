"""``wsss check-data``: report every problem of a dataset split, with class statistics."""

from __future__ import annotations

import argparse

from ..data.check import check_dataset
from . import options


def add_parser(subparsers) -> None:
    """Register ``check-data``."""
    p = subparsers.add_parser("check-data", help="check a VOC-layout dataset split; exit 1 on problems")
    p.add_argument("--data", required=True,
                   help="dataset root: a VOC layout, or a folder of your own images with labels.csv / labels.json")
    p.add_argument("--split", default=None,
                   help="split name (ImageSets/Segmentation/<split>.txt; default: none, for a folder of images: "
                   "every labelled image)")
    p.add_argument("--no-background", dest="background", action="store_false",
                   help="a folder of images without classes.txt: no background class before the labels file's "
                   "names (scenes such as street views, labelled by argmax)")
    p.add_argument("--labels", default=None,
                   help="image-level labels file training uses (default: ROOT/labels.json or ROOT/labels.csv)")
    p.add_argument("--workers", type=options.non_negative_int, default=0,
                   help="worker processes reading images (default: 0)")
    p.add_argument("--max-problems", type=options.non_negative_int, default=20,
                   help="problems to list (default: %(default)s)")
    p.add_argument("--max-pixels", type=options.positive_int, default=None, metavar="N",
                   help="an image or mask of more pixels is a problem, a possible decompression bomb (default: "
                   "PIL's MAX_IMAGE_PIXELS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; return 1 when problems were found, else 0."""
    report = check_dataset(args.data, args.split, num_workers=args.workers, labels_file=args.labels,
                           max_pixels=args.max_pixels, background=args.background)
    print(report.format(max_problems=args.max_problems))
    return 0 if report.ok else 1
