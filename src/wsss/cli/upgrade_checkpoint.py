"""``wsss upgrade-checkpoint``: rewrite an older (version 1) checkpoint with the input normalisation it was trained
with, so that every command reads its mean/std (and classes) from the file itself."""

from __future__ import annotations

import argparse

from ..methods import REGISTRY
from ..models.checkpoint import upgrade
from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``upgrade-checkpoint`` subcommand."""
    p = subparsers.add_parser(
        "upgrade-checkpoint", help="rewrite an older checkpoint with its input normalisation",
        description="Rewrite a version-1 model.safetensors in place with the current spec, given the mean/std "
        "it was trained with (data.transforms.mean/std of its training config).")
    p.add_argument("path", help="a run folder, checkpoint folder or model.safetensors")
    p.add_argument("--mean", required=True, type=options.finite_float, nargs=3, metavar="M",
                   help="per-channel mean of RGB in [0, 1] it was trained with")
    p.add_argument("--std", required=True, type=options.positive_float, nargs=3, metavar="S",
                   help="per-channel standard deviation it was trained with")
    p.add_argument("--method", choices=REGISTRY.names(), default=None,
                   help="the method that trained it (default: not recorded)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Upgrade the file and print its new spec."""
    spec = upgrade(args.path, args.mean, args.std, method=args.method)
    print(f"upgraded {args.path}: {spec.arch}, {spec.num_classes} classes, mean {list(spec.mean)}, "
          f"std {list(spec.std)}, spec version {spec.version}")
    return 0
