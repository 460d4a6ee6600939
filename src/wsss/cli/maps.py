"""``wsss maps IMAGE|DIR ...``: localisation maps for any images, labelled or not.

The model is a trained run (``--checkpoint``; class names, normalisation and architecture from it) or a named
backbone with weights (``--model vit_tiny_patch16_224 --weights FILE``: an ImageNet classifier localises its own
classes zero-shot; ``--class-names`` gives their names). The classes of each image are given (``--classes``, names
or classifier-output indices) or the top-k the model predicts. For every image ``OUT/<name>.npz`` holds the maps
(``classes``: classifier-output indices), ``OUT/<name>.png`` shows one titled heat map per class with a colour bar
(with ``--threshold`` also the label map and its legend), and with ``--threshold`` ``OUT/labels/<name>.png`` holds
the labels (0 = background, k = the k-th class of the ``.npz``'s ``classes``, so any classifier fits a PNG).
``<name>`` is the image's path relative to the folder given, without its extension. Every file is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.io import read_image, save_maps, write_mask
from ..data.layout import IMAGE_EXTENSIONS
from ..data.transforms import eval_transforms
from ..errors import ConfigError, DataError
from ..methods import REGISTRY
from ..models import checkpoint, create_model
from ..models.multiview import check_views, views
from ..pseudo.labels import maps_to_labels
from ..visualize import class_legend, label_tile, labels_present, overlay, save_picture, titled_grid
from . import options
from .cam import map_options

TILE = 256  # pixels per heat map in the picture


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``maps`` subcommand."""
    p = subparsers.add_parser(
        "maps", help="localisation maps, heat-map pictures and labels for any images (files or folders)",
        description="Write OUT/<name>.npz maps, OUT/<name>.png heat maps (one titled tile per class) and, with "
        "--threshold, OUT/labels/<name>.png for every image given or found in the folders given.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE|DIR",
                   help="image files, or folders searched recursively for images")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    source = p.add_argument_group("model (exactly one)").add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a trained run folder, checkpoint folder or model.safetensors")
    source.add_argument("--model", help="a backbone preset with its classifier (`--weights` gives the weights; its "
                        "input normalisation is --mean/--std, 0.5 if left out, as for the shared ViT-Ti)")
    p.add_argument("--weights", type=Path, default=None, help="with --model: its weights file (required there; default: none)")
    p.add_argument("--class-names", type=Path, default=None,
                   help="with --model: a text file with one class name per classifier output, e.g. ImageNet's "
                   "(default: none, classes by index)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--classes", nargs="+", metavar="C",
                       help="the classes to localise in every image: names or classifier-output indices (default: "
                       "the top-k predicted)")
    which.add_argument("--top-k", type=options.bounded_int(1, 254), default=1, metavar="K",
                       help="without --classes: the K classes the model scores highest for each image")
    p.add_argument("--method", default="getam", choices=sorted(REGISTRY.maps()),
                   help="the map formula (`wsss methods` describes them)")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first block read by the maps that take it (getam, acr); negative: from the last "
                   "(default: the method's)")
    p.add_argument("--threshold", type=options.fraction, default=None,
                   help="background threshold: also write OUT/labels/<name>.png (0 = background, k = the k-th "
                   "class localised; default: none, no labels)")
    options.add_views(p, squares=True)
    options.add_normalization(p)
    options.add_device(p)
    p.set_defaults(func=run)


def find_images(inputs: Sequence[Path]) -> list[tuple[Path, str]]:
    """``(path, name)`` of every image: a file as given (name: its stem), a folder's images recursively (name: the
    path below the folder without extension), sorted; a missing input or a folder without images is an error."""
    found: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(item, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            found += [(p, p.relative_to(item).with_suffix("").as_posix()) for p in files]
        elif item.is_file():
            found.append((item, item.stem))
        else:
            raise DataError(item, "no such image or folder")
    names = [name for _, name in found]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"two inputs would write the same outputs {clash[:3]}: give them from different folders "
                          "or rename one")
    return found


def _read_names(path: Path, outputs: int) -> list[str]:
    if not path.is_file():
        raise DataError(path, "class names file not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != outputs:
        raise DataError(path, f"lists {len(names)} class names, but the classifier has {outputs} outputs")
    return names


def _load(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, list[str] | None,
                                                                  tuple[float, ...], tuple[float, ...]]:
    """The classifier, its output names (None: indices only) and the normalisation."""
    if args.checkpoint is not None:
        if args.weights is not None or args.class_names is not None:
            raise ConfigError("--weights and --class-names go with --model; a checkpoint carries its own")
        source = checkpoint.resolve(args.checkpoint)
        model, spec = checkpoint.load(source, device)
        vit = options.classifier_of(model, spec, source)
        mean, std = options.normalization(args, spec, source)
        names = None
        if spec.classes is not None:
            names = list(spec.classes)[len(spec.classes) - vit.num_classes:]  # the outputs' names, no background
        return vit.eval(), names, mean, std
    if args.weights is None:
        raise ConfigError("--model needs --weights FILE (the classifier whose classes are localised)")
    model = create_model(args.model, weights=args.weights).eval().to(device)
    if not getattr(model, "num_classes", 0):
        raise ConfigError(f"{args.weights} has no classifier head: there are no classes to localise")
    names = None if args.class_names is None else _read_names(args.class_names, model.num_classes)
    mean = tuple(args.mean) if args.mean is not None else (0.5, 0.5, 0.5)
    std = tuple(args.std) if args.std is not None else (0.5, 0.5, 0.5)
    return model, names, mean, std


def parse_classes(tokens: Sequence[str], names: list[str] | None, outputs: int) -> list[int]:
    """Classifier-output indices of ``tokens`` (names, or indices in ``0..outputs-1``); an unknown one is an
    error that lists a few known names."""
    picked = []
    for token in tokens:
        if names is not None and token in names:
            picked.append(names.index(token))
        elif token.isdigit() and int(token) < outputs:
            picked.append(int(token))
        else:
            known = f"names such as {', '.join(names[:5])}, ... or " if names else ""
            raise ConfigError(f"--classes: unknown class {token!r} (give {known}indices 0..{outputs - 1})")
    if len(set(picked)) != len(picked):
        raise ConfigError(f"--classes names a class twice: {list(tokens)}")
    return picked


def picture(image: np.ndarray, maps: np.ndarray, names: Sequence[str], logits: Sequence[float],
            labels: np.ndarray | None = None, threshold: float | None = None) -> np.ndarray:
    """The image, a heat map per class titled with its name and logit, the colour bar and, with ``labels``
    (0 = background, k = the k-th map's class, made at ``threshold``), the label map with its legend."""
    cells = [("image", image), *[(f"{name} (logit {logit:.1f})", overlay(image, m))
                                 for name, logit, m in zip(names, logits, maps)]]
    legend = []
    if labels is not None:
        cells.append((f"labels (bg {threshold:g})", label_tile(labels, TILE)))
        legend = class_legend(["background", *names], ignore=False, only=labels_present(labels))
    return titled_grid([cells], tile=TILE, legend=legend, colour_bar_label="map value")


def run(args: argparse.Namespace) -> int:
    """Localise the chosen classes of every image and write its maps, picture and (with a threshold) labels."""
    check_views(args.scales, args.square_sizes)
    device = options.resolve_device(args.device)
    images = find_images(args.inputs)
    model, names, mean, std = _load(args, device)
    fixed = None if args.classes is None else parse_classes(args.classes, names, model.num_classes)
    if fixed is not None and len(fixed) > 254:
        raise ConfigError(f"--classes: {len(fixed)} classes do not fit a label PNG (at most 254)")
    k = min(args.top_k, model.num_classes)
    transform = eval_transforms(None, mean, std)
    with REGISTRY.localizer(args.method)(model, **map_options(args.method, args.start_layer, model.depth)) as loc:
        for path, name in images:
            pixels = read_image(path)
            tensor, _ = transform(pixels)
            x = tensor[None].to(device)
            with torch.no_grad():  # the logits of the first view's geometry (the image, or its first square)
                first = next(views(x, [1.0], model.patch_size, args.square_sizes))
                scores = model(first)[0].float().cpu()
            classes = fixed if fixed is not None else scores.topk(k).indices.tolist()
            maps = loc(x, [classes], scales=args.scales, flip=args.flip, square_sizes=args.square_sizes)[0]
            maps = maps.cpu().numpy()
            save_maps(_output(args.out, name, ".npz"), maps, classes)
            shown = [names[c] if names else str(c) for c in classes]
            labels = None
            if args.threshold is not None:
                positions = np.arange(1, len(classes) + 1)
                labels = maps_to_labels(torch.from_numpy(maps), positions, args.threshold).numpy().astype(np.uint8)
                write_mask(_output(args.out / "labels", name, ".png"), labels)
            drawn = picture(pixels, maps, shown, [float(scores[c]) for c in classes], labels, args.threshold)
            save_picture(_output(args.out, name, ".png"), drawn)
    print(f"wrote the {args.method} maps of {len(images)} images to {args.out}")
    return 0


def _output(out: Path, name: str, suffix: str) -> Path:
    path = out / f"{name}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
