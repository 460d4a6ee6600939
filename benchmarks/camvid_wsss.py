"""CamVid weak supervision: fine-tune the shared ViT-Ti with each method's objective, then score its maps.

For each registered method with a ``<method>_camvid`` preset (``wsss methods`` lists them: baseline, acr, aream,
getam) the CPU-sized preset is loaded with ``wsss.train.load_config`` and trained by
``wsss.train.Trainer`` on the train crops (image-level labels only). The trained model's maps on the evaluation split
are then scored by ``wsss.train.validate.maps_miou``: the method's natural map (cam for the baseline, acr, aream,
getam) and the plain CAM for every method, so that the objectives are also compared with one map. CamVid has no
background class, so a pixel takes the argmax over the image's classes; on a split with a background class the
background threshold is swept (0.00..0.99).

Cost per training step: after training, every method's step (objective + backward + optimiser step, data loading
excluded) is timed on one fixed batch of ``--time-batch`` train crops, the methods interleaved round by round, and
divided by the baseline's time on the same batch (best of ``--time-repeat`` rounds). AReAM and GETAM are timed in
their second phase. With ``--threads 1`` on a CPU the clock is the process's CPU time, which counts the work done and
not the waits for a core on a shared machine; otherwise wall time.

``--steps`` shortens every run; the steps the presets count in (optimiser warm-up, AReAM's classification warm-up,
GETAM's ``cls_steps``, checkpoint interval) are scaled by the same factor. The runs go to ``--run-root``; with
``--resume`` a finished run found there is reloaded instead of trained again (its training time is then not known).
The JSON is rewritten after each method, so an interrupted run keeps what it finished.

    python benchmarks/camvid_wsss.py --threads 1 [--steps 40] [--methods baseline acr] [--limit 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import (RESULTS_DIR, VIT_TINY_FILE, environment, markdown_table, set_threads, shared_data_dir, time_calls,
                    write_json)
from wsss.data.voc import VOCDataset
from wsss.train import Trainer, load_config
from wsss.methods import REGISTRY, get_method
from wsss.train.validate import maps_miou

# Step counts inside a preset that scale with train.steps when --steps shortens a run.
STEP_KEYS = (("optim", "warmup_steps"), ("method", "warmup_steps"), ("method", "cls_steps"), ("train", "ckpt_every"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="VOC-layout root (default: SHARED/camvid)")
    parser.add_argument("--weights", type=Path, default=None, help="ViT-Ti checkpoint (default: the shared one)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--split", default="val", help="split whose maps are scored")
    parser.add_argument("--methods", nargs="+", default=None, choices=default_methods(),
                        help="default: every registered method with a <method>_camvid preset")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: each preset's)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images of --split")
    parser.add_argument("--time-batch", type=int, default=8, help="crops in the batch the steps are timed on")
    parser.add_argument("--time-repeat", type=int, default=3, help="timed rounds per method")
    parser.add_argument("--no-timing", action="store_true", help="skip the cost-per-step measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every method, e.g. --set model.head=gap (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: the preset's)")
    parser.add_argument("--run-root", type=Path, default=None, help="where the runs go (default: a temp folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs found in --run-root; a finished run is only reloaded")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "camvid_wsss.json")
    return parser.parse_args(argv)


def preset(method: str) -> str:
    """The CamVid preset of a method."""
    return f"{method}_camvid"


def default_methods() -> list[str]:
    """The registered methods that have a CamVid preset, baseline first."""
    names = [m.name for m in REGISTRY.wsss_methods() if preset(m.name) in m.preset_names()]
    return sorted(names, key=lambda n: (n != "baseline", n))


def method_config(method: str, args: argparse.Namespace, data: Path, weights: Path, run_dir: Path) -> dict:
    """The method's preset with the data, weights, device and (scaled) step counts of this benchmark."""
    overrides = [f"data.root={data}", f"model.weights={weights}", f"run_dir={run_dir}", f"device={args.device}",
                 f"data.split={args.train_split}", "val.every=0"]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    cfg = load_config(preset(method), overrides + list(args.overrides))
    if args.steps is not None:
        factor = args.steps / cfg["train"]["steps"]
        for section, key in STEP_KEYS:
            if cfg[section].get(key):
                cfg[section][key] = max(1, round(cfg[section][key] * factor))
        cfg["train"]["steps"] = args.steps
    return cfg


def fixed_batch(data: Path, split: str, cfg: dict, size: int, device: str) -> dict[str, Any]:
    """``size`` augmented train crops (seeded), collated, on ``device``: the batch every step is timed on."""
    from wsss.data.transforms import build_transforms
    from wsss.data.voc import collate

    d = cfg["data"]
    dataset = VOCDataset(data, split, transform=build_transforms(d["transforms"]),
                         min_label_fraction=d["min_label_fraction"], seed=cfg["seed"])
    batch = collate([dataset[i] for i in range(size)])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def training_step(trainer: Trainer, batch: dict[str, Any]):
    """One optimisation step of ``trainer``'s objective on ``batch``, in its last (full-cost) phase."""

    def step() -> None:
        loss, _ = trainer.objective(trainer.ddp, batch, trainer.total_steps)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    return step


def last_logged(run_dir: Path) -> dict[str, Any]:
    """The last line of a run's ``metrics.jsonl`` (what a reloaded, already finished run logged at its end)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def score_maps(model: torch.nn.Module, dataset: VOCDataset, method: str, limit: int | None, device: str,
               cfg: dict) -> dict[str, Any]:
    """mIoU of ``method``'s maps of the (backbone of the) trained model over ``dataset``."""
    backbone = getattr(model, "encoder", model)  # GETAM trains a segmentation model around the backbone
    t = cfg["data"]["transforms"]
    thresholds = (0.0, 1.0, 0.01) if dataset.classes.has_background else (0.0, 0.01, 0.01)
    start = time.perf_counter()
    result = maps_miou(backbone, dataset, method, thresholds=thresholds, limit=limit, device=device,
                       mean=t.get("mean", [0.5] * 3), std=t.get("std", [0.5] * 3))
    result["seconds"] = time.perf_counter() - start
    return result


def report(args: argparse.Namespace, data: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The JSON written: settings, per-method results and the environment."""
    first = next(iter(results.values()), None)
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "data": str(data),
            "num_eval_images": None if first is None else first["maps"]["cam"]["num_images"],
            "results": results, "environment": environment(args.device)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    data = args.data or shared_data_dir() / "camvid"
    weights = args.weights or shared_data_dir() / "weights" / VIT_TINY_FILE
    methods = args.methods or default_methods()
    eval_set = VOCDataset(data, args.split)
    run_root = args.run_root or Path(tempfile.mkdtemp(prefix="camvid_wsss_"))
    print(f"runs in {run_root}; {threads} torch threads; methods {methods}", file=sys.stderr)

    results: dict[str, dict[str, Any]] = {}
    trainers: dict[str, Trainer] = {}
    for method in methods:
        cfg = method_config(method, args, data, weights, run_root / method)
        trainer = Trainer(cfg)
        resumed_at = trainer.ckpt.latest() is not None and args.resume
        start = time.perf_counter()
        summary = trainer.fit(resume=args.resume) or last_logged(run_root / method)
        train_s = time.perf_counter() - start
        trainer.model.eval()
        maps = {"cam": score_maps(trainer.model, eval_set, "cam", args.limit, args.device, cfg)}
        natural = get_method(method).own_map
        if natural != "cam":
            maps[natural] = score_maps(trainer.model, eval_set, natural, args.limit, args.device, cfg)
        trainer.model.train()
        results[method] = {"preset": preset(method), "steps": cfg["train"]["steps"],
                           "batch_size": cfg["data"]["batch_size"],
                           "train_seconds": None if resumed_at else train_s, "resumed": resumed_at,
                           "train_summary": {k: v for k, v in summary.items() if not isinstance(v, dict)},
                           "natural_map": natural, "maps": maps, "config": copy.deepcopy(cfg)}
        trainers[method] = trainer
        write_json(args.out, report(args, data, results))  # a crash later on keeps what is done
        done = "reloaded" if resumed_at else f"trained in {train_s:.0f} s"
        print(f"{method}: {cfg['train']['steps']} steps, {done}; "
              + ", ".join(f"{m} mIoU {r['miou']:.4f}" for m, r in maps.items()), file=sys.stderr)

    # With one thread on a CPU, process time is the work done and ignores waiting for a busy core.
    clock = "cpu" if threads == 1 and torch.device(args.device).type == "cpu" else "wall"
    if not args.no_timing:
        first = trainers[methods[0]]
        batch = fixed_batch(data, args.train_split, first.cfg, args.time_batch, args.device)
        timings = time_calls({m: training_step(t, batch) for m, t in trainers.items()}, repeat=args.time_repeat,
                             warmup=1, device=args.device)
        base = timings["baseline"].best_of(clock) if "baseline" in timings else None
        for method, timing in timings.items():
            results[method]["step_time"] = timing.as_dict(clock=clock)
            results[method]["step_cost_vs_baseline"] = None if base is None else timing.best_of(clock) / base

    rows = []
    for method, r in results.items():
        natural = r["maps"][r["natural_map"]]
        cost = r.get("step_cost_vs_baseline")
        step_s = r.get("step_time", {}).get("best_s")
        train_s = "—" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        rows.append([method, r["steps"], r["batch_size"], train_s, r["natural_map"],
                     f"{100 * natural['miou']:.2f}", f"{100 * r['maps']['cam']['miou']:.2f}",
                     "—" if step_s is None else f"{step_s:.2f}", "—" if cost is None else f"{cost:.2f}x"])
    headers = ["method", "steps", "batch", "train s", "map", f"map mIoU ({args.split})", f"cam mIoU ({args.split})",
               f"step s ({clock}, batch {args.time_batch})", "step cost vs baseline"]
    print(markdown_table(headers, rows))
    write_json(args.out, report(args, data, results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
