"""Refinements of zero-shot maps on the Weizmann horses: none, PAR, PAMR, dense CRF and attention affinity.

1. The shared ImageNet ViT-Ti (no training) makes a map of ImageNet class 339 ("sorrel") for every image, resized
   to SIZE x SIZE (mean = std = 0.5); the map (min-max normalised) is upsampled bilinearly to the image size and
   saved as ``maps/<id>.npz`` (class: the dataset's horse label). The same forward pass writes
   ``affinity/<id>.npz``: the head-mean patch-to-patch attention averaged over all blocks, ``(N, N)``, and its grid.
2. ``wsss pseudo --threshold T --refine R`` labels every image for each refinement R and each threshold T.
3. ``wsss eval`` scores each result. The raw maps are also swept (``wsss eval --sweep`` on the .npz files).

The table gives, per refinement, the mIoU at the raw maps' best threshold, the best mIoU over the threshold grid
(and its threshold), the two IoUs there, and the seconds per image of the ``wsss pseudo`` run (reading the image and
maps, refining, labelling and writing the PNG; one process).

    python benchmarks/refine_horses.py [--limit N] [--method getam] [--thresholds 0.1 0.2 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (REPO_ROOT, RESULTS_DIR, VIT_TINY, VIT_TINY_MEAN, VIT_TINY_STD, batches, environment,
                    load_vit_tiny, markdown_table, set_threads, shared_data_dir, write_json)
from wsss.cli.main import main as wsss_main
from wsss.data.classes import ClassSet
from wsss.data.io import read_image, save_maps, write_bytes_atomic
from wsss.data.transforms import eval_transforms
from wsss.evaluate import read_split_ids
from wsss.localize import localize
from wsss.methods import REGISTRY
from wsss.models import Capture
from wsss.localize.base import head_mean_patch_affinity

REFINEMENTS = ("none", "par", "pamr", "crf", "affinity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="horses root (default: SHARED/horses)")
    parser.add_argument("--weights", type=Path, default=None, help="ViT-Ti checkpoint (default: the shared one)")
    parser.add_argument("--split", default="all")
    parser.add_argument("--method", default="getam", choices=sorted(REGISTRY.maps()), help="map method (default getam)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images (writes a split file)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--refinements", nargs="+", default=list(REFINEMENTS), choices=REFINEMENTS)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.4],
                        help="background thresholds tried for every refinement (the raw maps' best is added)")
    parser.add_argument("--crf-preset", default="psa")
    parser.add_argument("--affinity-power", type=float, default=1.0)
    parser.add_argument("--affinity-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "refine_horses",
                        help="folder for maps, affinities and label PNGs (kept; reruns skip what exists)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "refine_horses.json")
    return parser.parse_args(argv)


def save_affinity(path: Path, affinity: np.ndarray, grid: tuple[int, int]) -> None:
    """``affinity`` (N, N) float32 and ``grid`` (h, w) as the .npz that ``wsss pseudo --affinity`` reads."""
    buffer = io.BytesIO()
    np.savez(buffer, affinity=affinity.astype(np.float32), grid=np.asarray(grid, dtype=np.int64))
    write_bytes_atomic(path, buffer.getvalue())


def make_maps(root: Path, ids: list[str], args: argparse.Namespace, maps_dir: Path, affinity_dir: Path) -> float:
    """Write every image's map and attention affinity; returns the map seconds per image (0 if all existed)."""
    todo = [i for i in ids if not (maps_dir / f"{i}.npz").is_file() or not (affinity_dir / f"{i}.npz").is_file()]
    if not todo:
        return 0.0
    model = load_vit_tiny("cpu", args.weights)
    target = int(json.loads((root / "imagenet_classes.json").read_text())["horse"])
    horse = ClassSet.from_file(root / "classes.txt").names.index("horse")
    transform = eval_transforms((args.size, args.size), mean=VIT_TINY_MEAN, std=VIT_TINY_STD)
    seconds = 0.0
    for sl in tqdm(list(batches(len(todo), args.batch)), desc=f"{args.method} maps", unit="batch"):
        chunk = todo[sl]
        originals = [read_image(root / "JPEGImages" / f"{i}.jpg") for i in chunk]
        x = torch.stack([transform(im)[0] for im in originals])
        start = time.perf_counter()
        maps = localize(model, x, torch.full((len(x), 1), target), method=args.method)
        seconds += time.perf_counter() - start
        with torch.inference_mode():
            out = model(x, capture=Capture(attn=True))
        affinity = head_mean_patch_affinity(out.attn, out.num_prefix) / len(out.attn)
        for k, (image_id, image) in enumerate(zip(chunk, originals)):
            up = F.interpolate(maps[k : k + 1], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            save_maps(maps_dir / f"{image_id}.npz", up.clamp(0, 1).numpy(), [horse])
            save_affinity(affinity_dir / f"{image_id}.npz", affinity[k].numpy(), out.grid)
    return seconds / len(todo)


def evaluate(root: Path, split: str, pred: Path, sweep: bool = False) -> dict:
    """Run ``wsss eval`` and read back its metrics.json."""
    argv = ["eval", "--data", str(root), "--split", split, "--pred", str(pred)] + (["--sweep"] if sweep else [])
    if wsss_main(argv) != 0:
        raise SystemExit(f"wsss eval failed on {pred}")
    return json.loads((pred / "metrics.json").read_text())


def run_pseudo(root: Path, split: str, maps_dir: Path, affinity_dir: Path, refine: str, threshold: float,
               out: Path, args: argparse.Namespace) -> float:
    """Run ``wsss pseudo`` once; returns its wall-clock seconds (0 if every PNG already existed)."""
    argv = ["pseudo", "--maps", str(maps_dir), "--data", str(root), "--split", split, "--out", str(out),
            "--threshold", str(threshold), "--refine", refine]
    if refine == "crf":  # the preset only goes with the CRF (with another refinement it is an error)
        argv += ["--crf-preset", args.crf_preset]
    if refine == "affinity":
        argv += ["--affinity", str(affinity_dir), "--affinity-power", str(args.affinity_power),
                 "--affinity-steps", str(args.affinity_steps)]
    existed = out.is_dir() and len(list(out.glob("*.png")))
    start = time.perf_counter()
    if wsss_main(argv) != 0:
        raise SystemExit(f"wsss pseudo failed ({refine}, {threshold})")
    return 0.0 if existed else time.perf_counter() - start


def label_folder(refine: str, args: argparse.Namespace) -> str:
    """A results folder name that changes with every setting of the refinement (reruns reuse only equal ones)."""
    if refine == "affinity":
        return f"affinity_p{args.affinity_power:g}_s{args.affinity_steps}"
    if refine == "crf":
        return f"crf_{args.crf_preset}"
    return refine


def subset_root(root: Path, split: str, limit: int | None, work: Path) -> tuple[Path, str]:
    """The dataset root and split to use: with ``limit``, a view of the root with a split of the first N ids."""
    if limit is None:
        return root, split
    view = work / "data"
    (view / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for name in ("JPEGImages", "SegmentationClass", "classes.txt", "imagenet_classes.json"):
        if not (view / name).exists():
            (view / name).symlink_to(root / name)
    name = f"first{limit}"
    ids = read_split_ids(root, split)[:limit]
    (view / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return view, name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    source = args.data or shared_data_dir() / "horses"
    work = args.work / f"{args.method}_{args.size}"
    root, split = subset_root(source, args.split, args.limit, work)
    ids = read_split_ids(root, split)
    maps_dir, affinity_dir = work / "maps", work / "affinity"
    map_seconds = make_maps(root, ids, args, maps_dir, affinity_dir)
    raw = evaluate(root, split, maps_dir, sweep=True)
    thresholds = sorted(set([round(raw["threshold"], 2)] + [round(t, 2) for t in args.thresholds]))
    results = {}
    for refine in args.refinements:
        runs = {}
        for t in thresholds:
            out = work / "labels" / f"{label_folder(refine, args)}_{t:.2f}"
            seconds = run_pseudo(root, split, maps_dir, affinity_dir, refine, t, out, args)
            metrics = evaluate(root, split, out)
            runs[f"{t:.2f}"] = {"miou": metrics["miou"], "iou": metrics["iou"],
                                "s_per_image": seconds / len(ids) if seconds else None}
        best = max(runs, key=lambda k: runs[k]["miou"])
        timed = [r["s_per_image"] for r in runs.values() if r["s_per_image"]]
        results[refine] = {"runs": runs, "best_threshold": float(best), "best_miou": runs[best]["miou"],
                           "best_iou": runs[best]["iou"], "miou_at_raw_threshold": runs[f"{raw['threshold']:.2f}"]["miou"],
                           "s_per_image": min(timed) if timed else None}

    print(f"\nRefinements of zero-shot {args.method} maps: {len(ids)} horses, ViT-Ti at {args.size}x{args.size}, "
          f"{threads} thread(s). Raw maps swept: best mIoU {100 * raw['miou']:.2f} at threshold "
          f"{raw['threshold']:.2f}. Map time {map_seconds:.3f} s/image.\n")
    rows = []
    for refine, r in results.items():
        per_image = "—" if r["s_per_image"] is None else f"{r['s_per_image']:.3f}"
        rows.append([refine, f"{100 * r['miou_at_raw_threshold']:.2f}", f"{100 * r['best_miou']:.2f}",
                     f"{r['best_threshold']:.2f}", f"{100 * r['best_iou']['background']:.2f}", f"{100 * r['best_iou']['horse']:.2f}",
                     per_image])
    print(markdown_table(["refinement", f"mIoU % at T={raw['threshold']:.2f}", "best mIoU %", "best T",
                          "bg IoU %", "horse IoU %", "s / image"], rows))
    payload = {
        "benchmark": "refine_horses",
        "settings": {"model": VIT_TINY, "method": args.method, "size": args.size, "num_images": len(ids),
                     "split": split, "thresholds": thresholds, "crf_preset": args.crf_preset,
                     "affinity": f"mean over blocks of the head-mean patch attention, power {args.affinity_power}, "
                                 f"{args.affinity_steps} step(s), row-normalised",
                     "rule": "wsss pseudo --threshold T"},
        "environment": environment("cpu"),
        "raw_maps": {"miou": raw["miou"], "threshold": raw["threshold"], "iou": raw["iou"],
                     "map_s_per_image": map_seconds},
        "results": results,
    }
    print(f"\nwrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
