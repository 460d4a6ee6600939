"""``wsss entropy``: per-block attention entropies of a trained classifier, AReAM's layer weights (methods.md §4).

Each image is resized to ``--size`` x ``--size`` (bicubic, as the authors' ``ent_voc_*.py``); for every block the
CAM summed over the image's classes is refined with that block's head-mean patch attention, turned into a
distribution over the patches by a softmax, and its Shannon entropy (bits) is averaged over the split. The JSON
written is what ``method.layer_weights: FILE.json`` of the ``aream`` objective reads. The normalisation and the
class list come from the checkpoint.
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
from ..errors import DataError
from ..methods.aream.objective import layer_entropies
from ..models import checkpoint
from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``entropy`` subcommand."""
    p = subparsers.add_parser(
        "entropy", help="per-block attention entropies (AReAM's entropy layer weights)",
        description="Average per-block attention entropies of a classifier over a split, written as the JSON "
        "that the aream objective's method.layer_weights reads.")
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoint folder or model.safetensors")
    p.add_argument("--data", required=True, help="VOC-layout dataset root")
    p.add_argument("--split", required=True, help="split name: ROOT/ImageSets/Segmentation/<split>.txt")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--size", type=options.positive_int, default=224, help="square input size")
    p.add_argument("--batch", type=options.positive_int, default=16, help="images per forward pass")
    options.add_limit(p)
    options.add_normalization(p)
    options.add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Average the entropies over the split and write the JSON."""
    device = options.resolve_device(args.device)
    source = checkpoint.resolve(args.checkpoint)
    model, spec = checkpoint.load(source, device)
    model = options.classifier_of(model, spec, source)
    dataset = VOCDataset(args.data, args.split)
    options.check_classes(spec, dataset.classes.names, source, args.data)
    options.check_classifier(model.num_classes, dataset.classes.num_fg, source, args.data)
    mean, std = options.normalization(args, spec, source)
    transform = eval_transforms((args.size, args.size), mean, std, interpolation="bicubic")
    count = len(options.limited(dataset.ids, args.limit))
    total = torch.zeros(model.depth, dtype=torch.float64)
    used = 0
    for start in tqdm(range(0, count, args.batch), desc="entropy", unit="batch"):
        indices = range(start, min(start + args.batch, count))
        images = torch.stack([transform(dataset.load_image(i))[0] for i in indices]).to(device)
        labels = torch.from_numpy(np.stack([dataset.labels(i) for i in indices])).to(device)
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
