"""``wsss demo``: the whole pipeline on a synthetic set, with nothing to download.

1. make a synthetic dataset; 2. train a small ViT on its image labels; 3. make maps with every method and score them;
4. write ``report.md`` (a table and overlay pictures) and ``results.json``. Each step is skipped when its output
exists, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from ..data.io import write_bytes_atomic
from ..data.synth import make_synthetic
from ..data.voc import VOCDataset
from ..methods import REGISTRY
from ..models import checkpoint
from ..train import Trainer, load_config
from ..train.validate import map_grid, maps_miou
from . import options

SYNTH = {"size": 64, "num_train": 800, "num_val": 100, "num_classes": 4, "seed": 0}  # context bias: default 0.8


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo", help="synthetic data -> small ViT -> maps with every method -> report",
        description="Make a synthetic dataset, train a small ViT on its image labels, score the maps of every "
        "registered map method and write OUT/report.md. Finished steps are skipped (resume).")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=options.positive_int, default=None,
                   help="training steps (default: the demo preset's)")
    p.add_argument("--threads", type=options.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--num-train", type=options.positive_int, default=SYNTH["num_train"],
                   help="synthetic training images")
    p.add_argument("--num-val", type=options.positive_int, default=SYNTH["num_val"],
                   help="synthetic validation images")
    options.add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the four steps, each skipped when its output exists."""
    device = options.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    if not (data / "ImageSets" / "Segmentation" / "val.txt").is_file():
        print(f"[1/4] synthetic dataset -> {data}")
        make_synthetic(data, progress=True, **{**SYNTH, "num_train": args.num_train, "num_val": args.num_val})
    run_dir = out / "train"
    overrides = [f"data.root={data}", f"run_dir={run_dir}", f"device={args.device}"]
    overrides += [f"train.steps={args.steps}"] if args.steps else []
    cfg = load_config("demo", overrides)
    if not (run_dir / "model.safetensors").is_file():
        print(f"[2/4] training {cfg['model']['name']} for {cfg['train']['steps']} steps -> {run_dir}")
        t0 = time.perf_counter()
        Trainer(cfg).fit(resume=True)
        print(f"      trained in {time.perf_counter() - t0:.0f} s")
    model, spec = checkpoint.load(run_dir, device)
    val = VOCDataset(data, "val")
    view = {"scales": cfg["val"]["scales"], "flip": cfg["val"]["flip"], "device": device, "mean": spec.mean,
            "std": spec.std}
    print("[3/4] maps with every method on the validation split")
    results = {}
    for method in REGISTRY.maps():
        t0 = time.perf_counter()
        r = maps_miou(model, val, method, **view)
        per_image = (time.perf_counter() - t0) / r["num_images"]
        results[method] = {"miou": r["miou"], "threshold": r["threshold"], "seconds_per_image": per_image,
                           "iou": r["iou"]}
        print(f"      {method:8s} mIoU {r['miou']:.3f}  (threshold {r['threshold']:.2f}, {per_image * 1000:.0f} ms/image)")
    print(f"[4/4] report -> {out / 'report.md'}")
    write_report(out, model, val, results, view)
    return 0


def write_report(out: Path, model: torch.nn.Module, val: VOCDataset, results: dict, view: dict,
                 num_images: int = 4) -> None:
    """``results.json``, ``report.md`` and one overlay picture per method; ``view`` holds the keyword arguments
    of :func:`~wsss.train.validate.map_grid` the maps were scored with (scales, flip, device, mean, std)."""
    write_bytes_atomic(out / "results.json", json.dumps({"methods": results}, indent=2).encode())
    best = max(results, key=lambda m: results[m]["miou"])
    lines = ["# wsss demo", "",
             "A small ViT trained from scratch on image-level labels of a synthetic set, localised with every method.",
             "mIoU on the validation split with the best background threshold of an exhaustive sweep "
             f"(views: scales {view['scales']}, flip {view['flip']}).", "",
             "| method | mIoU | threshold | ms / image |", "|---|---|---|---|"]
    for m, r in results.items():
        mark = " **(best)**" if m == best else ""
        lines.append(f"| {m}{mark} | {r['miou']:.3f} | {r['threshold']:.2f} | {r['seconds_per_image'] * 1000:.0f} |")
    lines += ["", "Rows of each picture: the input, its ground truth, the label map of the maps at the method's best "
              "threshold, and the strongest map over the input."]
    for method, r in results.items():
        picture = map_grid(model, val, range(min(num_images, len(val))), method, threshold=r["threshold"], **view)
        name = f"overlay_{method}.png"
        Image.fromarray(picture).save(out / name)
        lines += ["", f"## {method}: mIoU {r['miou']:.3f}", "", f"![{method}]({name})"]
    write_bytes_atomic(out / "report.md", ("\n".join(lines) + "\n").encode())
