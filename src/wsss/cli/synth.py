"""``wsss synth``: write the synthetic shapes dataset (VOC layout) for demos and tests."""

from __future__ import annotations

import argparse

from ..data.synth import MAX_CLASSES, make_synthetic


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``synth`` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic segmentation dataset with exact masks",
        description="Write a synthetic VOC-layout dataset: textured shapes on cluttered scenes, with masks.",
    )
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--num-train", type=int, default=600, help="training images (default 600)")
    parser.add_argument("--num-val", type=int, default=100, help="validation images (default 100)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--classes", type=int, default=4, help=f"object classes, 1..{MAX_CLASSES} (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--bias", type=float, default=0.8, help="how often a class sits on its preferred scene")
    parser.add_argument("--max-objects", type=int, default=3, help="objects per image, at most (default 3)")
    parser.add_argument("--png", action="store_true", help="write PNG images instead of JPEG (quality 95)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print where it went."""
    out = make_synthetic(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        size=args.size,
        num_classes=args.classes,
        seed=args.seed,
        bias=args.bias,
        max_objects=args.max_objects,
        image_format="png" if args.png else "jpg",
        progress=True,
    )
    print(f"wrote {args.num_train} train and {args.num_val} val images with {args.classes} classes to {out}")
    return 0
