"""What AReAM's training does to the attention: per block, before and after training, with and without its loss.

    python benchmarks/aream_diagnosis.py --data ../shared/data/msrc \\
        --runs mctformer=runs/pipe_mct/mctformer/train aream=runs/pipe_mct/aream/train \\
        --out benchmarks/results/aream_diagnosis_msrc.json --figure benchmarks/results/aream_affinity_msrc.png

For every model (``imagenet``: the shared ViT-Ti with a fresh mct head, i.e. before training; then each run) and
every block l, on the eval split:
- ``row_entropy``: the mean entropy of the head-mean patch-to-patch attention rows, as a fraction of log2 N (1 =
  uniform attention: the over-smoothing the paper describes; low = each patch attends to few patches);
- ``cam_entropy``: the paper's per-layer entropy (``wsss entropy``): the CAM refined by block l's attention,
  softmax over positions, in bits;
- ``map_miou``: the best-threshold mIoU of the AReAM map refined with block l's affinity alone (the fused map of
  that one block), next to the all-block map and the CAM.
The figure shows, for a few eval images, the affinity row of the centre of the largest object in the shallow
blocks (mean of l < k) and in the deep ones (l >= k), for each model.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from common import RESULTS_DIR, VIT_TINY, VIT_TINY_FILE, environment, set_threads, shared_data_dir, write_json
from wsss.data.transforms import eval_transforms
from wsss.data.voc import VOCDataset
from wsss.methods.aream.objective import layer_entropies
from wsss.models import Capture, create_model, load
from wsss.train.validate import maps_miou
from wsss.visualize import overlay, titled_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--runs", nargs="+", default=[], metavar="NAME=RUN_DIR", help="trained runs to compare")
    p.add_argument("--layer-index", type=int, default=7, help="k: the shallow blocks are l < k")
    p.add_argument("--no-imagenet", action="store_true", help="leave out the untrained ImageNet model")
    p.add_argument("--figure-images", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "aream_diagnosis.json")
    p.add_argument("--figure", type=Path, default=None)
    return p.parse_args(argv)


def models(args: argparse.Namespace, num_classes: int) -> dict[str, tuple[torch.nn.Module, tuple, tuple]]:
    out = {}
    if not args.no_imagenet:
        weights = shared_data_dir() / "weights" / VIT_TINY_FILE
        out["imagenet"] = (create_model(VIT_TINY, weights=weights, num_classes=num_classes, head="mct").eval(),
                           (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for spec in args.runs:
        name, _, run = spec.partition("=")
        if not run:
            raise SystemExit(f"--runs wants NAME=RUN_DIR, got {spec!r}")
        model, meta = load(run)
        out[name] = (model, tuple(meta.mean), tuple(meta.std))
    return out


@torch.no_grad()
def attention_stats(model, dataset: VOCDataset, mean, std) -> dict[str, list[float]]:
    """Per block: mean normalised row entropy of the patch attention, and the paper's CAM entropy."""
    transform = eval_transforms(None, mean, std)
    rows, cams = [], []
    for i in range(len(dataset)):
        image, _ = transform(dataset.load_image(i))
        image = image[None, :, : image.shape[1] // 16 * 16, : image.shape[2] // 16 * 16]
        out = model(image, capture=Capture(attn=True))
        p = out.num_prefix
        n = out.attn[0].shape[-1] - p
        per_block = []
        for a in out.attn:
            patch = a.mean(1)[0, p:, p:]
            patch = patch / patch.sum(-1, keepdim=True)
            per_block.append(float(-(patch * patch.clamp_min(1e-12).log2()).sum(-1).mean() / math.log2(n)))
        rows.append(per_block)
        labels = torch.from_numpy(dataset.labels(i) > 0).float()[None]  # over the classifier outputs
        cams.append(layer_entropies(model, image, labels)[0].tolist())
    return {"row_entropy": np.nanmean(rows, 0).tolist(), "cam_entropy": np.nanmean(cams, 0).tolist()}


def map_scores(model, dataset: VOCDataset, mean, std) -> dict[str, object]:
    depth = model.depth
    views = dict(scales=(1.0,), flip=True, mean=mean, std=std)
    per_layer = []
    for layer in range(depth):
        weights = [1.0 if j == layer else 0.0 for j in range(depth)]
        per_layer.append(maps_miou(model, dataset, "aream", layers=None, layer_weights=weights, **views)["miou"])
    return {"map_miou": per_layer, "all_blocks": maps_miou(model, dataset, "aream", **views)["miou"],
            "cam": maps_miou(model, dataset, "cam", **views)["miou"]}


@torch.no_grad()
def affinity_figure(named: dict, dataset: VOCDataset, k: int, count: int) -> np.ndarray:
    rows = []
    for i in range(min(count, len(dataset))):
        raw = dataset.load_image(i)
        mask = dataset.load_mask(i)
        fg = [lab for lab in np.unique(mask) if lab not in (0, 255)]
        if not fg:
            continue
        biggest = max(fg, key=lambda lab: int((mask == lab).sum()))
        ys, xs = np.nonzero(mask == biggest)
        row = [("image", raw)]
        for name, (model, mean, std) in named.items():
            image, _ = eval_transforms(None, mean, std)(raw)
            h, w = image.shape[1] // 16 * 16, image.shape[2] // 16 * 16
            out = model(image[None, :, :h, :w], capture=Capture(attn=True))
            p, (gh, gw) = out.num_prefix, out.grid
            cy, cx = min(int(np.median(ys)) // 16, gh - 1), min(int(np.median(xs)) // 16, gw - 1)
            for part, blocks in (("shallow", out.attn[:k]), ("deep", out.attn[k:])):
                aff = torch.stack([a.mean(1)[0, p:, p:] for a in blocks]).mean(0)[cy * gw + cx].reshape(gh, gw)
                aff = (aff - aff.min()) / (aff.max() - aff.min() + 1e-12)
                up = torch.nn.functional.interpolate(aff[None, None], size=(h, w), mode="nearest")[0, 0].numpy()
                heat = np.zeros(raw.shape[:2], dtype=np.float32)
                heat[:h, :w] = up
                row.append((f"{name} {part}", overlay(raw, heat)))
        rows.append(row)
    return titled_grid(rows, tile=160)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    dataset = VOCDataset(args.data, args.split)
    named = models(args, dataset.classes.num_fg)
    results: dict = {"settings": {"data": str(args.data), "split": args.split, "layer_index": args.layer_index,
                                  "runs": args.runs, "num_images": len(dataset)}, "models": {}}
    for name, (model, mean, std) in named.items():
        stats = attention_stats(model, dataset, mean, std)
        stats.update(map_scores(model, dataset, mean, std))
        results["models"][name] = stats
        print(f"{name}: all-block map {100 * stats['all_blocks']:.1f}, CAM {100 * stats['cam']:.1f}", flush=True)
    results["environment"] = environment()
    write_json(args.out, results)
    depth = len(next(iter(results["models"].values()))["row_entropy"])
    print("\n| block | " + " | ".join(f"{n} row H / map" for n in results["models"]) + " |")
    print("|---|" + "---|" * len(results["models"]))
    for layer in range(depth):
        cells = [f"{m['row_entropy'][layer]:.3f} / {100 * m['map_miou'][layer]:.1f}" for m in results["models"].values()]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    if args.figure is not None:
        from PIL import Image

        args.figure.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(affinity_figure(named, dataset, args.layer_index, args.figure_images)).save(args.figure)
        print(f"wrote {args.figure}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
