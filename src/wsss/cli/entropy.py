"""``wsss entropy``: per-block attention entropies of a trained classifier, AReAM's layer weights (methods.md §4).

Each image is resized to ``--size`` x ``--size`` (bicubic, as the authors' ``ent_voc_*.py``); for every block the
CAM summed over the image's classes is refined with that block's head-mean patch attention, turned into a
distribution over the patches by a softmax, and its Shannon entropy (bits) is averaged over the split. The JSON
written is what ``method.layer_weights: FILE.json`` of the ``aream`` objective reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.io import write_bytes_atomic
from ..data.transforms import eval_transforms
from ..data.voc import VOCDataset
from ..errors import CheckpointError, DataError
from ..train.aream import layer_entropies
from ..train.checkpoint import load_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("entropy", help="per-block attention entropies (AReAM's entropy layer weights)")
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoint folder or model.safetensors")
    p.add_argument("--data", required=True, help="VOC-layout dataset root")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--size", type=int, default=224, help="square input size (default 224)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--mean", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    p.add_argument("--std", type=float, nargs=3, default=[0.5, 0.5, 0.5])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint).to(args.device).eval()
    dataset = VOCDataset(args.data, args.split)
    if model.num_classes != dataset.classes.num_fg:
        raise CheckpointError(f"{args.checkpoint}: the model has {model.num_classes} classes, the dataset "
                              f"{dataset.classes.num_fg} foreground classes")
    transform = eval_transforms((args.size, args.size), args.mean, args.std, interpolation="bicubic")
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    total = torch.zeros(model.depth, dtype=torch.float64)
    used = 0
    for start in tqdm(range(0, count, args.batch), desc="entropy", unit="batch"):
        indices = range(start, min(start + args.batch, count))
        images = torch.stack([transform(dataset.load_image(i))[0] for i in indices]).to(args.device)
        labels = torch.from_numpy(np.stack([dataset.labels(i) for i in indices])).to(args.device)
        entropy = layer_entropies(model, images, labels).double().cpu()
        valid = ~entropy.isnan().any(dim=1)  # images without a label carry no class map
        total += entropy[valid].sum(dim=0)
        used += int(valid.sum())
    if used == 0:
        raise DataError(Path(args.data), f"split {args.split!r} has no image with a foreground label")
    result = {"entropy": (total / used).tolist(), "num_images": used, "checkpoint": str(args.checkpoint),
              "data": str(args.data), "split": args.split, "size": args.size}
    write_bytes_atomic(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())
    print(f"per-block entropies (bits) over {used} images: " + ", ".join(f"{v:.3f}" for v in result["entropy"]))
    print(f"wrote {args.out}")
    return 0
