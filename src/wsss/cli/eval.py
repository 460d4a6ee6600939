"""``wsss eval``: score label PNGs or saved maps against a split's ground truth, write metrics.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..evaluate import evaluate_split, format_table, threshold_grid, write_metrics_json
from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="score predictions (label PNGs or .npz maps) against a split's ground truth",
        description="Score PRED/<id>.png label maps or PRED/<id>.npz localisation maps against "
        "ROOT/SegmentationClass for every id of the split, print a per-class table and write metrics.json.",
    )
    parser.add_argument("--data", required=True, type=Path, help="dataset root (VOC layout)")
    parser.add_argument("--split", required=True, help="split name: ROOT/ImageSets/Segmentation/<split>.txt")
    parser.add_argument("--pred", required=True, type=Path, help="folder of <id>.png or <id>.npz predictions")
    parser.add_argument("--out", type=Path, default=None, help="folder for metrics.json (default: --pred)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--threshold", type=float, default=None,
                      help="background threshold for .npz maps (default: none; label PNGs need none)")
    mode.add_argument("--sweep", action="store_true", help="sweep the background threshold, report the best")
    parser.add_argument(
        "--thresholds",
        nargs=3,
        type=float,
        metavar=("START", "STOP", "STEP"),
        default=None,
        help="sweep grid, STOP excluded (default 0 1 0.01, i.e. 0.00..0.99)",
    )
    parser.add_argument("--workers", type=options.non_negative_int, default=0,
                        help="decoding threads (0: decode in the main thread)")
    options.add_limit(parser)
    parser.add_argument(
        "--absent-as-zero",
        action="store_true",
        help="count a class absent from both ground truth and prediction as IoU 0 (PSA/ACR/AReAM scripts) "
        "instead of leaving it out of the mean",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table and write ``OUT/metrics.json``."""
    if args.thresholds is not None and not args.sweep:
        raise ConfigError("--thresholds is only used with --sweep")
    thresholds = None
    if args.thresholds is not None:
        try:
            thresholds = threshold_grid(*args.thresholds)
        except ValueError as exc:
            raise ConfigError(f"--thresholds: {exc}") from exc
    metrics = evaluate_split(
        args.data,
        args.split,
        args.pred,
        threshold=args.threshold,
        sweep=args.sweep,
        thresholds=thresholds,
        num_workers=args.workers,
        absent_as_zero=args.absent_as_zero,
        limit=args.limit,
    )
    class_names = metrics["class_names"]
    print(format_table(metrics, class_names))
    if args.sweep:
        print(f"best threshold {metrics['threshold']:.2f}: mIoU {100 * metrics['miou']:.2f}")
    out_dir = args.pred if args.out is None else args.out
    extra = {
        "split": args.split,
        "data": str(args.data),
        "pred": str(args.pred),
        "absent_as_zero": args.absent_as_zero,
        "limit": args.limit,
    }
    write_metrics_json(out_dir / "metrics.json", metrics, class_names, extra)
    print(f"wrote {out_dir / 'metrics.json'}")
    return 0
