"""One training preset, one setting changed at a time: the own map's best-threshold mIoU on the eval split.

Each variant is the preset plus a few ``key=value`` overrides (quoted, space separated); ``--variant ""`` is the
preset as it is. Every variant trains from the same weights and seed in a temporary folder, then its method's own
map (the registry's ``own_map``, with the preset's ``val`` views and flip) is scored on the eval images with the
background-threshold sweep, as ``pipeline.py`` scores ``seed_eval``:

    python benchmarks/recipe_ablation.py --preset baseline_msrc --data ../shared/data/msrc --eval-split val \\
        --variant "" --variant "optim.lr=1e-5 optim.head_lr_mult=100" --out benchmarks/results/FILE.json

This is how the presets' settings were chosen (see each preset's comments); it answers "which setting moves the
map" without the rest of the pipeline (``pipeline.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, VIT_TINY_FILE, environment, markdown_table, set_threads, write_json
from pipeline import default_weights
from wsss.data.voc import VOCDataset
from wsss.methods import get_method
from wsss.pipeline import PipelineSettings, classifier_of, train_run, view_options
from wsss.train.validate import maps_miou


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="a training preset (wsss methods lists them)")
    p.add_argument("--data", type=Path, required=True, help="VOC-layout dataset root")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="val")
    p.add_argument("--variant", action="append", required=True,
                   help="overrides of one variant, 'key=value key=value'; \"\" for the preset itself (repeat)")
    p.add_argument("--weights", default=None,
                   help=f"initial weights (default: the shared {VIT_TINY_FILE}; 'none': the preset's own)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "recipe_ablation.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    weights = default_weights(args.weights)
    eval_set = VOCDataset(args.data, args.eval_split, require_masks=True)
    rows = []
    for variant in args.variant:
        overrides = variant.split()
        with tempfile.TemporaryDirectory(prefix="wsss_recipe_") as tmp:
            settings = PipelineSettings(data=args.data, run_root=Path(tmp), train_split=args.train_split,
                                        eval_split=args.eval_split, weights=weights, device=args.device)
            start = time.perf_counter()
            trainer = train_run(args.preset, Path(tmp) / "train", settings, overrides, resume=False)
            seconds = time.perf_counter() - start
            own_map = get_method(trainer.cfg["method"]["name"]).own_map
            score = maps_miou(classifier_of(trainer.model), eval_set, own_map, **view_options(trainer))
        rows.append({"overrides": overrides, "map": own_map, "miou": score["miou"],
                     "threshold": score["threshold"], "train_seconds": seconds})
        print(f"{variant or '(preset)'}: {own_map} {100 * score['miou']:.1f}", file=sys.stderr, flush=True)
    write_json(args.out, {"preset": args.preset, "data": str(args.data), "train_split": args.train_split,
                          "eval_split": args.eval_split, "variants": rows, "environment": environment(args.device)})
    # No threshold where the dataset has no background class (CamVid: the argmax over the present classes).
    print(markdown_table(["overrides", "map", f"{args.eval_split} mIoU", "threshold", "train s"],
                         [[" ".join(r["overrides"]) or "(preset)", r["map"], f"{100 * r['miou']:.1f}",
                           "-" if r["threshold"] is None else f"{r['threshold']:.2f}", f"{r['train_seconds']:.0f}"]
                          for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
