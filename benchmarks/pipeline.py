"""The WSSS protocol on any VOC-layout dataset (:mod:`wsss.pipeline`): train each method, score its seeds, the map
matrix, its pseudo labels and a segmentation model trained on them, against the priors and the supervised bound.

    python benchmarks/pipeline.py --data ../shared/data/msrc --train-split train --eval-split val \\
        --methods baseline getam acr aream --out benchmarks/results/pipeline_msrc.json --run-root runs/pipe --resume

The recipes are the presets ``<method>_<recipe>`` and ``segment_<recipe>`` (``--recipe``, default the dataset
folder's name: ``msrc``, ``camvid``). The JSON is rewritten after every method; ``--resume`` skips finished stages.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common import RESULTS_DIR, VIT_TINY_FILE, environment, set_threads, shared_data_dir, write_json
from wsss.cli.options import positive_float
from wsss.refine import CRF_PRESETS
from wsss.segment.predict import FUSIONS
from wsss.pipeline import PipelineSettings, SegmentTest, results_table, run_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="VOC-layout dataset root")
    p.add_argument("--train-split", default="train", help="split the methods train on (image labels only)")
    p.add_argument("--eval-split", default="val", help="held-out split the maps and segmentation are scored on")
    p.add_argument("--methods", nargs="+", default=None,
                   help="registered methods (default: every method with a <method>_<recipe> preset)")
    p.add_argument("--maps", nargs="+", default=None, help="map formulas of the matrix (default: all registered)")
    p.add_argument("--recipe", default=None,
                   help="preset suffix: <method>_<recipe> and segment_<recipe> (default: the data folder's name)")
    p.add_argument("--weights", default=None,
                   help="model.weights of every run (default: the shared ViT-Ti when present; 'none' for none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every classifier run (repeatable)")
    p.add_argument("--segment-set", dest="segment_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every segmentation run (repeatable)")
    p.add_argument("--segment-preset", default=None,
                   help="preset (or YAML file) of the segmentation runs (default: segment_<recipe>)")
    p.add_argument("--segment", choices=("all", "best", "none"), default="all",
                   help="train a segmentation model on every method's pseudo labels, on the best ones, or none")
    p.add_argument("--segment-scales", nargs="+", type=positive_float, default=None, metavar="S",
                   help="also test every segmentation model at these scales (the papers' protocol; with "
                   "--segment-flip / --segment-crf): segment_eval_test beside the one-view segment_eval")
    p.add_argument("--segment-flip", action="store_true", help="the test protocol averages the flipped views in")
    p.add_argument("--segment-crf", default=None, choices=sorted(CRF_PRESETS),
                   help="the test protocol's dense CRF preset on the fused softmax")
    p.add_argument("--segment-fusion", default=None, choices=FUSIONS,
                   help="how the test protocol combines its views: mean (average the logits, the default) or max "
                   "(the pixel-wise maximum of each scale's softmax, AReAM's test)")
    p.add_argument("--mask-steps", nargs="+", choices=("refine", "psa"), default=["refine"],
                   help="pseudo-label steps on the seeds: each method's refinement recipe, and/or PSA's AffinityNet "
                   "and random walk (the affinity_<recipe> preset); each is segmented")
    p.add_argument("--no-supervised", action="store_true", help="skip the segmentation run on the true masks")
    p.add_argument("--warm-start", default=None, metavar="METHOD",
                   help="the other methods start from this method's trained classifier")
    p.add_argument("--limit", type=int, default=None, help="score only the first N eval images")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--run-root", type=Path, default=Path("runs/pipeline"), help="where runs and outputs go")
    p.add_argument("--resume", action="store_true", help="reuse the finished stages found in --run-root")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "pipeline.json", help="results JSON")
    return p.parse_args(argv)


def default_weights(choice: str | None) -> str | None:
    """``--weights``: a path, 'none', or (unset) the shared ImageNet ViT-Ti when it is present."""
    if choice == "none":
        return None
    if choice:
        return choice
    shared = shared_data_dir() / "weights" / VIT_TINY_FILE
    return str(shared) if shared.is_file() else None


def segment_test(args: argparse.Namespace) -> SegmentTest | None:
    """The test protocol the flags ask for; None when none of them is given."""
    flags = (args.segment_scales, args.segment_crf, args.segment_fusion)
    if all(flag is None for flag in flags) and not args.segment_flip:
        return None
    return SegmentTest(scales=tuple(args.segment_scales or (1.0,)), flip=args.segment_flip, crf=args.segment_crf,
                       fusion=args.segment_fusion or "mean")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    set_threads(args.threads)
    settings = PipelineSettings(
        data=args.data, run_root=args.run_root, train_split=args.train_split, eval_split=args.eval_split,
        methods=args.methods, maps=args.maps, recipe=args.recipe, weights=default_weights(args.weights),
        overrides=args.overrides, segment_overrides=args.segment_overrides, segment_preset=args.segment_preset,
        segment=args.segment, mask_steps=args.mask_steps, segment_test=segment_test(args),
        supervised=not args.no_supervised,
        warm_start=args.warm_start, limit=args.limit,
        device=args.device, resume=args.resume)

    def save(results: dict) -> None:
        write_json(args.out, {**results, "environment": environment(args.device)})

    results = run_pipeline(settings, on_update=save)
    print(results_table(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
