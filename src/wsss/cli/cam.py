"""``wsss cam``: localisation maps for every image of a split (and label PNGs given a background threshold)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.io import save_maps, write_mask
from ..data.voc import VOCDataset
from ..evaluate import maps_to_labels
from ..localize import METHODS
from ..localize.split import iter_split_maps
from ..errors import CheckpointError
from ..train.checkpoint import load_model, read_spec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cam", help="write localisation maps (.npz) for a split, and label PNGs")
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoint folder or model.safetensors")
    p.add_argument("--data", required=True, help="VOC-layout dataset root")
    p.add_argument("--split", required=True)
    p.add_argument("--method", default="getam", choices=sorted(METHODS))
    p.add_argument("--out", required=True, help="output folder: <id>.npz maps (and labels/<id>.png)")
    p.add_argument("--threshold", type=float, default=None,
                   help="background threshold for label PNGs (datasets without background: argmax, always written)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--flip", action="store_true", help="add horizontally flipped views")
    p.add_argument("--start-layer", type=int, default=None, help="getam/acr: first block read")
    p.add_argument("--mean", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    p.add_argument("--std", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    model = load_model(path).to(args.device).eval()
    dataset = VOCDataset(args.data, args.split)
    trained_on = (read_spec(path) or {}).get("classes") if path.suffix == ".safetensors" else None
    if trained_on is not None and list(trained_on) != list(dataset.classes.names):
        raise CheckpointError(f"{path} was trained on the classes {trained_on}, but {args.data} has "
                              f"{list(dataset.classes.names)}")
    out = Path(args.out)
    # Label PNGs need a background threshold, except on datasets without a background class (argmax).
    with_labels = args.threshold is not None or not dataset.classes.has_background
    threshold = args.threshold if dataset.classes.has_background else None
    todo = [i for i, image_id in enumerate(dataset.ids) if not (out / f"{image_id}.npz").is_file()
            or (with_labels and not (out / "labels" / f"{image_id}.png").is_file())]
    options = {"start_layer": args.start_layer} if args.start_layer is not None and args.method in ("getam", "acr") else {}
    if len(todo) < len(dataset):
        print(f"resuming: {len(dataset) - len(todo)} of {len(dataset)} images already done")
    maps_iter = iter_split_maps(model, dataset, args.method, args.scales, args.flip, args.mean, args.std,
                                indices=todo, device=args.device, **options)
    for image_id, maps, labels in tqdm(maps_iter, total=len(todo), desc=f"{args.method} maps"):
        if with_labels:
            pred = maps_to_labels(maps, labels, threshold, dataset.classes.has_background)
            write_mask(out / "labels" / f"{image_id}.png", np.asarray(pred, dtype=np.uint8))
        save_maps(out / f"{image_id}.npz", maps, labels)  # last, so a present .npz means the image is done
    print(f"wrote {len(todo)} map files to {out}")
    return 0
