"""CamVid, weak labels to a segmentation model, CPU-sized: every step is the ``wsss`` command a user would run.

1. ``wsss train`` (classification): the shared ImageNet ViT-Ti fine-tuned on CamVid's image-level labels of random
   224 crops (a class counts if it covers >= 1% of the crop) over the whole train split.
2. ``wsss cam --method getam`` on a subset of train (the first ``--train-images`` ids), at the native 480x360 size;
   ``wsss eval`` scores the maps (argmax over the image's classes: CamVid has no background).
3. ``wsss pseudo --threshold T``: pixels whose best map is below T become 255 (ignored). Their quality (coverage
   and mIoU on the covered pixels) is computed here, since ``wsss eval`` does not accept 255 in predictions.
4. ``wsss train --config segment_camvid`` on the pseudo labels (a view of the dataset whose masks are the pseudo
   labels), then ``wsss predict`` on val and ``wsss eval``.
Optional: ``--gt-baseline`` trains the same segmentation model on the true masks of the same images (an upper bound
for this budget); ``--getam`` runs GETAM end to end (``getam_camvid`` preset) and scores it on val the same way.

Everything goes to ``--work`` (default ``runs/camvid_segment``); a stage whose output exists is skipped on a rerun.

    python benchmarks/camvid_segment.py [--train-images 120] [--cls-steps 300] [--seg-steps 300] [--gt-baseline]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from common import (REPO_ROOT, RESULTS_DIR, VIT_TINY, VIT_TINY_FILE, environment, markdown_table, set_threads,
                    shared_data_dir, write_json)
from wsss.data.classes import ClassSet
from wsss.data.io import read_mask
from wsss.evaluate import read_split_ids
from wsss.evaluate.confusion import ConfusionMatrix

COMMANDS = ("train", "cam", "pseudo", "eval", "predict")
# Multi-label fine-tuning of the ImageNet ViT-Ti on 224 crops (a class counts from 1% of the crop).
CLASSIFIER = {
    "model": {"name": VIT_TINY, "head": "token"},
    "data": {"split": "train", "num_workers": 2, "min_label_fraction": 0.01,
             "transforms": {"random_scale": [0.75, 1.25], "hflip": True, "crop": 224}},
    "optim": {"name": "adamw", "lr": 1.0e-4, "weight_decay": 0.05, "schedule": "cosine", "warmup_steps": 20},
    "train": {"log_every": 10, "ckpt_every": 100},
    "method": {"name": "classification"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="CamVid root (default: SHARED/camvid)")
    parser.add_argument("--weights", type=Path, default=None, help="ViT-Ti checkpoint (default: the shared one)")
    parser.add_argument("--train-images", type=int, default=120, help="train images for maps, pseudo labels, seg")
    parser.add_argument("--val-images", type=int, default=None, help="val images to score (default: all 101)")
    parser.add_argument("--cls-steps", type=int, default=300, help="classifier fine-tuning steps")
    parser.add_argument("--seg-steps", type=int, default=300, help="segmentation training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.2, help="pseudo labels: ignore below this map value")
    parser.add_argument("--refine", default="none", help="refinement of the maps before labelling (wsss pseudo)")
    parser.add_argument("--gt-baseline", action="store_true", help="also train on the true masks of the subset")
    parser.add_argument("--getam", action="store_true", help="also run GETAM end to end (getam_camvid preset)")
    parser.add_argument("--getam-steps", type=int, default=None, help="override the preset's train.steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "camvid_segment")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "camvid_segment.json")
    return parser.parse_args(argv)


def wsss(*argv: str) -> None:
    """Run one ``wsss`` subcommand in this process (predict too, whether or not the CLI registers it yet)."""
    parser = argparse.ArgumentParser(prog="wsss")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"wsss.cli.{name}").add_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    code = args.func(args)
    if code:
        raise SystemExit(f"wsss {' '.join(map(str, argv))} failed with {code}")


def make_view(root: Path, view: Path, splits: dict[str, list[str]], masks: Path | None = None) -> Path:
    """A dataset root that links to ``root``'s images (and masks, or ``masks``) with its own split files."""
    (view / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    links = {"JPEGImages": root / "JPEGImages", "classes.txt": root / "classes.txt",
             "SegmentationClass": masks if masks is not None else root / "SegmentationClass"}
    for name, target in links.items():
        if not (view / name).exists():
            (view / name).symlink_to(target.resolve())
    for name, ids in splits.items():
        (view / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return view


def pseudo_quality(root: Path, ids: list[str], pseudo: Path, classes: ClassSet) -> dict:
    """Share of labelled pixels the pseudo labels cover, and their mIoU on the covered pixels."""
    confusion = ConfusionMatrix(classes.num_classes)
    covered = labelled = 0
    for image_id in ids:
        gt = read_mask(root / "SegmentationClass" / f"{image_id}.png", classes.num_classes)
        label = read_mask(pseudo / f"{image_id}.png")
        keep = (gt != 255) & (label != 255)
        labelled += int((gt != 255).sum())
        covered += int(keep.sum())
        confusion.update(np.where(keep, label, 0).astype(np.uint8), np.where(keep, gt, 255).astype(np.uint8))
    metrics = confusion.compute()
    return {"coverage": covered / max(labelled, 1), "miou_covered": metrics["miou"],
            "pixel_accuracy_covered": metrics["pixel_accuracy"]}


def timed(stage: str, times: dict[str, float], fn, *args) -> None:
    start = time.perf_counter()
    fn(*args)
    times[stage] = time.perf_counter() - start
    print(f"[{stage}] {times[stage]:.0f} s", flush=True)


def train_once(run: Path, config: str, overrides: list[str], times: dict[str, float], stage: str) -> None:
    """``wsss train`` unless the run folder already holds a finished model."""
    if (run / "model.safetensors").is_file():
        return
    timed(stage, times, wsss, "train", "--config", config, f"run_dir={run}", *overrides)


def score_segmenter(run: Path, view: Path, split: str, out: Path, times: dict[str, float], stage: str) -> dict:
    """``wsss predict`` then ``wsss eval`` on ``split``; returns the metrics."""
    timed(f"{stage}_predict", times, wsss, "predict", "--checkpoint", run, "--data", view, "--split", split,
          "--out", out, "--device", "cpu")
    wsss("eval", "--data", view, "--split", split, "--pred", out)
    return json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    shared = shared_data_dir()
    source = args.data or shared / "camvid"
    weights = args.weights or shared / "weights" / VIT_TINY_FILE
    classes = ClassSet.from_file(source / "classes.txt")
    work = args.work
    train_ids = read_split_ids(source, "train")
    subset = train_ids[: args.train_images]
    val_ids = read_split_ids(source, "val")[: args.val_images]
    view = make_view(source, work / "data", {"train": train_ids, "train_sub": subset, "val_sub": val_ids})
    common = [f"model.weights={weights}", "device=cpu", f"data.batch_size={args.batch}"]
    times: dict[str, float] = {}

    cls_run = work / "classifier"
    cls_config = work / "classifier.yaml"
    cls_config.write_text(yaml.safe_dump(CLASSIFIER))
    train_once(cls_run, str(cls_config), [f"data.root={view}", f"train.steps={args.cls_steps}", *common], times,
               "classifier")
    maps = work / "maps_getam"
    timed("maps", times, wsss, "cam", "--checkpoint", cls_run, "--data", view, "--split", "train_sub",
          "--method", "getam", "--out", maps, "--device", "cpu")
    wsss("eval", "--data", view, "--split", "train_sub", "--pred", maps)
    maps_metrics = json.loads((maps / "metrics.json").read_text())

    pseudo = work / f"pseudo_{args.refine}_{args.threshold:.2f}"
    timed("pseudo", times, wsss, "pseudo", "--maps", maps, "--data", view, "--split", "train_sub", "--out", pseudo,
          "--threshold", args.threshold, "--refine", args.refine)
    quality = pseudo_quality(view, subset, pseudo, classes)
    pseudo_view = make_view(source, work / "data_pseudo", {"train_sub": subset}, masks=pseudo)

    seg_run = work / f"segment_{pseudo.name}"
    train_once(seg_run, "segment_camvid", [f"data.root={pseudo_view}", "data.split=train_sub",
                                           f"train.steps={args.seg_steps}", *common], times, "segment")
    results = {"pseudo": score_segmenter(seg_run, view, "val_sub", seg_run / "pred_val", times, "segment")}
    if args.gt_baseline:
        gt_run = work / "segment_gt"
        train_once(gt_run, "segment_camvid", [f"data.root={view}", "data.split=train_sub",
                                              f"train.steps={args.seg_steps}", *common], times, "segment_gt")
        results["gt"] = score_segmenter(gt_run, view, "val_sub", gt_run / "pred_val", times, "segment_gt")
    if args.getam:
        getam_run = work / "getam"
        steps = [f"train.steps={args.getam_steps}"] if args.getam_steps else []
        train_once(getam_run, "getam_camvid", [f"data.root={view}", "data.split=train", f"model.weights={weights}",
                                               "device=cpu", *steps], times, "getam")
        results["getam"] = score_segmenter(getam_run, view, "val_sub", getam_run / "pred_val", times, "getam")

    print(f"\nCamVid, ViT-Ti, {threads} thread(s): classifier {args.cls_steps} steps on all {len(train_ids)} train "
          f"images; GETAM maps, pseudo labels and segmentation on the first {len(subset)}; scored on "
          f"{len(val_ids)} val images.")
    print(f"maps (argmax over the image's classes) on the {len(subset)} train images: mIoU "
          f"{100 * maps_metrics['miou']:.2f}")
    print(f"pseudo labels (threshold {args.threshold}, refine {args.refine}): cover "
          f"{100 * quality['coverage']:.1f}% of the labelled pixels, mIoU there {100 * quality['miou_covered']:.2f}\n")
    names = list(classes.names)
    rows = [[kind, f"{100 * m['miou']:.2f}", f"{100 * m['pixel_accuracy']:.2f}"]
            + [f"{100 * m['iou'][n]:.1f}" if m['iou'][n] is not None else "—" for n in names]
            for kind, m in results.items()]
    print(markdown_table(["trained on", "val mIoU %", "pixel acc %"] + names, rows))
    payload = {
        "benchmark": "camvid_segment",
        "settings": {"model": VIT_TINY, "train_images": len(subset), "val_images": len(val_ids),
                     "cls_steps": args.cls_steps, "seg_steps": args.seg_steps, "batch": args.batch,
                     "threshold": args.threshold, "refine": args.refine, "map_method": "getam",
                     "segmentation_preset": "segment_camvid", "getam_preset": "getam_camvid" if args.getam else None},
        "environment": environment("cpu"),
        "maps_train_subset": {"miou": maps_metrics["miou"], "iou": maps_metrics["iou"]},
        "pseudo_labels": quality,
        "val": {kind: {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "iou": m["iou"]}
                for kind, m in results.items()},
        "seconds": times,
    }
    print(f"\nwrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
