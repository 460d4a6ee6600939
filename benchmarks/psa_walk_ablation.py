"""PSA's random walk, one setting at a time, on the runs of ``benchmarks/pipeline.py --mask-steps psa``.

For each method's run folder (``RUN_ROOT/<method>``: its train seeds in ``maps_train`` and its AffinityNet in
``affinity``), walk the seeds with each background score and power given and score the masks against the train
masks (mIoU; a walk labels every pixel):

    python benchmarks/psa_walk_ablation.py --data ../shared/data/msrc --run-root runs/pipe_psa --methods acr aream \\
        --backgrounds 0.39 calibrated --betas 8 --out benchmarks/results/psa_walk_ablation_msrc.json

``calibrated`` is the seeds' best train threshold (what the pipeline uses); 0.39 is AReAM's ``bg_thr``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import environment, set_threads, write_json
from wsss.data.voc import VOCDataset
from wsss.models import checkpoint
from wsss.pipeline import label_scores
from wsss.pseudo.random_walk import WalkSettings, walk_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="VOC-layout dataset root")
    p.add_argument("--split", default="train", help="the split the seeds and AffinityNet were made on")
    p.add_argument("--run-root", type=Path, required=True, help="the pipeline's run root")
    p.add_argument("--methods", nargs="+", required=True, help="method folders under the run root")
    p.add_argument("--backgrounds", nargs="+", default=["0.39", "calibrated"],
                   help="background scores: numbers, or 'calibrated' (the seeds' best train threshold)")
    p.add_argument("--betas", nargs="+", type=float, default=[8.0], help="powers of the affinity")
    p.add_argument("--logt", type=int, default=6, help="2^logt steps")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    return p.parse_args(argv)


def calibrated_threshold(run_root: Path, method: str) -> float:
    """The best train threshold of the method's seeds, from the pipeline's stages file."""
    done = json.loads((run_root / "stages.json").read_text())["done"]
    return float(done[f"{method}/seed_train"]["threshold"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    dataset = VOCDataset(args.data, args.split, require_masks=True)
    results: dict = {"split": args.split, "logt": args.logt, "methods": {}}
    lines = ["| method | background | beta | walk mIoU |", "|---|---|---|---|"]
    for method in args.methods:
        run = args.run_root / method
        model, spec = checkpoint.load(run / "affinity")
        rows = []
        for background in args.backgrounds:
            value = calibrated_threshold(args.run_root, method) if background == "calibrated" else float(background)
            for beta in args.betas:
                with tempfile.TemporaryDirectory() as tmp:
                    walk_split(model, dataset, run / "maps_train", Path(tmp), WalkSettings(value, beta, args.logt),
                               spec.mean, spec.std, progress=False)
                    score = label_scores(dataset, Path(tmp))["miou"]
                rows.append({"background": value, "background_choice": background, "beta": beta, "miou": score})
                lines.append(f"| {method} | {background} ({value:.2f}) | {beta:g} | {100 * score:.1f} |")
        results["methods"][method] = rows
    print("\n".join(lines))
    write_json(args.out, {**results, "environment": environment("cpu")})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
