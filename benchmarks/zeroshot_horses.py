"""Zero-shot localisation on the Weizmann horses: ImageNet ViT-Ti maps for class 339 ('sorrel'), no training.

For each map method, every image (resized to SIZE x SIZE, mean = std = 0.5) gets a map for ImageNet class 339; the
map is upsampled bilinearly to the mask's original size (``--eval-size original``, the default) or the mask is
resized to SIZE x SIZE by nearest neighbour (``--eval-size input``). A background-threshold sweep over 0.00..0.99
keeps one confusion matrix per threshold over the whole set (``wsss.evaluate.ThresholdSweep``); the best fg/bg
mIoU, its threshold and the time per image of the map computation (after a warm-up batch) are reported.

    python benchmarks/zeroshot_horses.py [--limit N] [--batch 8] [--flip] [--scales 1.0 0.75]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (RESULTS_DIR, VIT_TINY, VIT_TINY_MEAN, VIT_TINY_STD, batches, environment, load_vit_tiny,
                    markdown_table, set_threads, shared_data_dir, timed_call, write_json)
from wsss.data.classes import ClassSet
from wsss.data.io import read_image, read_mask
from wsss.data.transforms import eval_transforms
from wsss.evaluate import ThresholdSweep, read_split_ids, threshold_grid
from wsss.localize import localize
from wsss.methods import REGISTRY




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="horses root (default: SHARED/horses)")
    parser.add_argument("--weights", type=Path, default=None, help="ViT-Ti checkpoint (default: the shared one)")
    parser.add_argument("--split", default="all")
    parser.add_argument("--methods", nargs="+", default=sorted(REGISTRY.maps()), choices=sorted(REGISTRY.maps()))
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of the split")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="square input size")
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0])
    parser.add_argument("--flip", action="store_true", help="add the flipped view of every scale")
    parser.add_argument("--eval-size", choices=("original", "input"), default="original",
                        help="compare at the mask's original size (maps upsampled) or at the input size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "zeroshot_horses.json")
    return parser.parse_args(argv)


def imagenet_class(root: Path) -> int:
    """The ImageNet index that stands for 'horse' (``imagenet_classes.json`` of the dataset)."""
    return int(json.loads((root / "imagenet_classes.json").read_text())["horse"])


def load_set(root: Path, split: str, size: int, limit: int | None) -> tuple[list[str], torch.Tensor, list[np.ndarray]]:
    """Image ids, the normalised ``(N, 3, size, size)`` images and the original-size masks."""
    ids = read_split_ids(root, split)[:limit]
    num_classes = ClassSet.from_file(root / "classes.txt").num_classes
    transform = eval_transforms((size, size), mean=VIT_TINY_MEAN, std=VIT_TINY_STD, interpolation="bilinear")
    images, masks = [], []
    for image_id in tqdm(ids, desc="load", unit="img"):
        image, _ = transform(read_image(root / "JPEGImages" / f"{image_id}.jpg"), None)
        images.append(image)
        masks.append(read_mask(root / "SegmentationClass" / f"{image_id}.png", num_classes))
    return ids, torch.stack(images), masks


def recognition(model: torch.nn.Module, images: torch.Tensor, target: int, batch: int, device: str) -> dict:
    """How often the classifier ranks ``target`` first / in its top 5 (context for the maps' quality)."""
    ranks = []
    with torch.inference_mode():
        for sl in batches(len(images), batch):
            logits = model(images[sl].to(device))
            ranks.append((logits > logits[:, target : target + 1]).sum(1).cpu())
    rank = torch.cat(ranks)
    return {"top1": float((rank == 0).float().mean()), "top5": float((rank < 5).float().mean())}


def eval_maps(maps: torch.Tensor, mask: np.ndarray, eval_size: str) -> tuple[np.ndarray, np.ndarray]:
    """One image's ``(1, H, W)`` map and ground truth at the evaluation size."""
    if eval_size == "original":
        up = F.interpolate(maps[None].float(), size=mask.shape, mode="bilinear", align_corners=False)[0]
        return up.clamp(0, 1).cpu().numpy(), mask
    gt = torch.from_numpy(mask)[None, None].float()
    small = F.interpolate(gt, size=maps.shape[-2:], mode="nearest-exact")[0, 0]  # samples pixel centres, like PIL
    return maps.float().cpu().numpy(), small.numpy().astype(np.uint8)


def run_method(model: torch.nn.Module, method: str, images: torch.Tensor, masks: list[np.ndarray], target: int,
               fg_label: int, args: argparse.Namespace) -> dict:
    """Maps of every image for one method, swept; returns the metrics and the time per image."""
    sweep = ThresholdSweep(2, threshold_grid(0.0, 1.0, 0.01))
    opts = dict(method=method, scales=args.scales, flip=args.flip)
    first = images[: args.batch].to(args.device)
    localize(model, first, torch.full((len(first), 1), target), **opts)  # warm-up, untimed
    wall = cpu = 0.0
    for sl in tqdm(list(batches(len(images), args.batch)), desc=method, unit="batch"):
        x = images[sl].to(args.device)
        classes = torch.full((len(x), 1), target, device=args.device)
        out: list[torch.Tensor] = []
        w, c = timed_call(lambda: out.append(localize(model, x, classes, **opts)), args.device)
        wall, cpu, maps = wall + w, cpu + c, out[0]
        for i, mask in zip(range(len(x)), masks[sl]):
            m, gt = eval_maps(maps[i], mask, args.eval_size)
            sweep.update(m, [fg_label], gt)
    threshold, metrics = sweep.best()
    return {"method": method, "miou": metrics["miou"], "threshold": threshold, "iou": metrics["iou"],
            "curve": sweep.curve()[:, 1], "ms_per_image": 1000 * wall / len(images),
            "cpu_ms_per_image": 1000 * cpu / len(images)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    root = args.data or shared_data_dir() / "horses"
    classes = ClassSet.from_file(root / "classes.txt")
    fg_label = classes.names.index("horse")
    target = imagenet_class(root)
    ids, images, masks = load_set(root, args.split, args.size, args.limit)
    model = load_vit_tiny(args.device, args.weights)
    recog = recognition(model, images, target, args.batch, args.device)
    results = [run_method(model, m, images, masks, target, fg_label, args) for m in args.methods]

    print(f"\nZero-shot horses: {len(ids)} images at {args.size}x{args.size}, ViT-Ti ImageNet class {target}, "
          f"scales {args.scales}, flip {args.flip}, compared at the {args.eval_size} size, batch {args.batch}, "
          f"{threads} thread(s) on {args.device}")
    print(f"class {target} is top-1 on {100 * recog['top1']:.1f}% and top-5 on {100 * recog['top5']:.1f}% "
          "of the images\n")
    rows = [[r["method"], f"{100 * r['miou']:.2f}", f"{r['threshold']:.2f}", f"{100 * r['iou'][0]:.2f}",
             f"{100 * r['iou'][1]:.2f}", f"{r['ms_per_image']:.1f}", f"{r['cpu_ms_per_image']:.1f}"] for r in results]
    print(markdown_table(["method", "best mIoU %", "best threshold", "bg IoU %", "horse IoU %", "wall ms / image",
                          "CPU ms / image"], rows))
    payload = {
        "benchmark": "zeroshot_horses",
        "settings": {"model": VIT_TINY, "imagenet_class": target, "num_images": len(ids), "size": args.size,
                     "mean": VIT_TINY_MEAN, "std": VIT_TINY_STD, "batch": args.batch, "scales": args.scales,
                     "flip": args.flip, "eval_size": args.eval_size, "thresholds": "0.00..0.99 step 0.01",
                     "map_interpolation": "maps at input size, bilinear (align_corners=False) to the mask size"
                     if args.eval_size == "original" else "masks nearest-resized to the input size"},
        "environment": environment(args.device),
        "recognition": recog,
        "results": {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in results},
    }
    print(f"\nwrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
