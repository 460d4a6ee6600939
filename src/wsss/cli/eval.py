"""``wsss eval``: score label PNGs or saved maps against a split's ground truth, write metrics.json."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from ..data.manifest import GROUND_TRUTH_KIND, dataset_folder_of, find_manifest, manifest_path, untrusted_files
from ..errors import ConfigError, DataError
from ..evaluate import evaluate_split, format_table, read_split_ids, threshold_grid, write_metrics_json
from . import options

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="score predictions (label PNGs or .npz maps) against a split's ground truth",
        description="Score PRED/<id>.png label maps or PRED/<id>.npz localisation maps against "
        "ROOT/SegmentationClass for every id of the split, print a per-class table and write metrics.json. The "
        "dataset's own mask folder, a folder marked as ground truth, and files that PRED's manifest does not list "
        "are refused.",
    )
    parser.add_argument("--data", required=True, type=Path, help="dataset root (VOC layout)")
    parser.add_argument("--split", required=True, help="split name: ROOT/ImageSets/Segmentation/<split>.txt")
    parser.add_argument("--pred", required=True, type=Path, help="folder of <id>.png or <id>.npz predictions")
    parser.add_argument("--out", type=Path, default=None, help="folder for metrics.json (default: --pred)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--threshold", type=options.fraction, default=None,
                      help="background threshold for .npz maps (default: none; label PNGs need none)")
    mode.add_argument("--sweep", action="store_true", help="sweep the background threshold, report the best")
    parser.add_argument(
        "--thresholds",
        nargs=3,
        type=options.finite_float,
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


def _scored_names(pred: Path, ids: Sequence[str], wants_maps: bool) -> list[str]:
    """The file of each id that the evaluation reads (as :func:`wsss.evaluate.evaluate_split` picks it)."""
    if wants_maps:
        return [f"{image_id}.npz" for image_id in ids]
    return [f"{image_id}.png" if (pred / f"{image_id}.png").is_file() else f"{image_id}.npz" for image_id in ids]


def check_predictions(data: Path, split: str, pred: Path, wants_maps: bool, limit: int | None) -> None:
    """Refuse to score ground truth as predictions, or files that the manifest of ``pred`` does not vouch for.

    ``pred`` may not be (or lie in) the dataset's own mask folder, nor be a folder whose manifest says it holds
    ground truth; where it has a manifest (``wsss cam``/``pseudo``/``predict``), every file scored must be listed
    there unchanged (a file left or copied in afterwards is not a prediction of that run).
    """
    found = dataset_folder_of(pred, data)
    if found is not None:
        raise ConfigError(f"--pred {pred} is (or lies in) the dataset folder {found}, which holds a dataset's images "
                          "or true masks, not predictions (ground truth scored against itself gives 100%)")
    record, _ = find_manifest(pred)
    if record is None:
        return
    if record.get("kind") == GROUND_TRUTH_KIND:
        raise ConfigError(f"--pred {pred} holds ground truth ({manifest_path(pred)} says kind "
                          f"{GROUND_TRUTH_KIND!r}), not predictions")
    made_on = (record.get("data") or {}).get("root")
    if made_on is not None and Path(made_on) != data.expanduser().resolve():
        log.warning("%s was made on the dataset %s, scored here against %s", pred, made_on, data)
    ids = options.limited(read_split_ids(data, split), limit)
    _, bad = untrusted_files(pred, _scored_names(pred, ids, wants_maps))
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise DataError(pred, f"{len(bad)} of the {len(ids)} predictions are not files written by the "
                        f"`{record.get('command')}` run its manifest records ({shown}: not listed, or changed since); "
                        "rerun that command with the same settings to replace them")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table and write ``OUT/metrics.json``."""
    if args.thresholds is not None and not args.sweep:
        raise ConfigError("--thresholds is only used with --sweep")
    check_predictions(args.data, args.split, args.pred, args.threshold is not None or args.sweep, args.limit)
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
