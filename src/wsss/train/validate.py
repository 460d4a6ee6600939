"""Periodic validation: the mIoU of a model's localisation maps on a labelled split, and pictures of them."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data.io import read_mask
from ..data.voc import VOCDataset
from ..evaluate import ThresholdSweep, threshold_grid
from ..localize.split import iter_split_maps
from ..pseudo.labels import maps_to_labels
from ..visualize import class_legend, label_tile, labels_present, overlay, titled_grid


def maps_sweep(model: nn.Module, dataset: VOCDataset, method: str = "cam", scales: Sequence[float] = (1.0,),
               flip: bool = False, thresholds: Sequence[float] = (0.0, 1.0, 0.01),
               indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
               mean: Sequence[float] | None = (0.5, 0.5, 0.5), std: Sequence[float] | None = (0.5, 0.5, 0.5),
               **options) -> ThresholdSweep:
    """Confusion matrices at every background threshold ``threshold_grid(*thresholds)`` of ``method``'s maps over
    ``indices`` (default: the whole split). Sweeps of disjoint shards add up (``merge`` / ``all_reduce``)."""
    indices = list(range(len(dataset)) if indices is None else indices)
    sweep = ThresholdSweep(dataset.classes.num_classes, threshold_grid(*thresholds),
                           has_background=dataset.classes.has_background, class_names=dataset.classes.names)
    if not indices:
        return sweep
    for i, (_, maps, labels) in zip(indices, iter_split_maps(model, dataset, method, scales, flip, mean, std,
                                                             indices=indices, device=device, **options)):
        sweep.update(maps, labels, dataset.load_mask(i))
    return sweep


def sweep_result(sweep: ThresholdSweep, dataset: VOCDataset) -> dict:
    """``{'miou', 'threshold', 'iou', 'num_images'}`` at the sweep's best threshold (None without background)."""
    threshold, metrics = sweep.best()
    if not dataset.classes.has_background:
        threshold = None
    iou = np.asarray(metrics["iou"], dtype=np.float64)
    return {"miou": float(metrics["miou"]), "threshold": threshold, "num_images": sweep.num_images,
            "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(dataset.classes.names, iou)}}


def maps_miou(model: nn.Module, dataset: VOCDataset, method: str = "cam", scales: Sequence[float] = (1.0,),
              flip: bool = False, thresholds: Sequence[float] = (0.0, 1.0, 0.01), limit: int | None = None,
              indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
              mean: Sequence[float] | None = (0.5, 0.5, 0.5), std: Sequence[float] | None = (0.5, 0.5, 0.5),
              **options) -> dict:
    """Best-threshold mIoU of ``method``'s maps over ``dataset`` (argmax over the present classes when the dataset
    has no background). Returns ``{'miou', 'threshold', 'iou', 'num_images'}``."""
    if indices is None:
        indices = range(len(dataset) if limit is None else min(limit, len(dataset)))
    sweep = maps_sweep(model, dataset, method, scales, flip, thresholds, indices, device, mean, std, **options)
    return sweep_result(sweep, dataset)


def map_grid(model: nn.Module, dataset: VOCDataset, indices: Sequence[int], method: str = "cam",
             threshold: float | None = None, scales: Sequence[float] = (1.0,), flip: bool = False,
             device: torch.device | str = "cpu", mean: Sequence[float] | None = (0.5, 0.5, 0.5),
             std: Sequence[float] | None = (0.5, 0.5, 0.5), tile: int = 192, **options) -> np.ndarray:
    """A titled picture of ``method``'s maps, one row per image: the input, its ground truth (where the split has
    masks), the pseudo label of the maps at ``threshold`` (0.5 where None; argmax without a background class) and a
    heat map per class of the image, titled with its name; label maps in the dataset's palette with a legend of the
    classes drawn, a colour bar of the heat maps. ``(H, W, 3)`` uint8."""
    has_bg = dataset.classes.has_background
    names = dataset.classes.names
    palette = dataset.palette()
    t = (0.5 if threshold is None else threshold) if has_bg else None
    rows, drawn = [], []
    for i, (_, maps, labels) in zip(indices, iter_split_maps(model, dataset, method, scales, flip, mean, std,
                                                             indices=indices, device=device, **options)):
        image = dataset.load_image(i)
        pseudo = maps_to_labels(torch.from_numpy(maps), labels, t).numpy().astype(np.uint8)
        row = [("input", image)]
        if dataset.has_masks:
            mask = dataset.load_mask(i)
            drawn.append(mask)
            row.append(("ground truth", label_tile(mask, tile, palette)))
        drawn.append(pseudo)
        row.append((f"{method} labels" + (f" (bg {t:.2f})" if t is not None else ""), label_tile(pseudo, tile, palette)))
        row += [(f"map: {names[int(c)]}", overlay(image, m)) for m, c in zip(maps, labels)]
        rows.append(row)
    if not rows:
        raise ValueError("map_grid needs at least one image")
    return titled_grid(rows, tile=tile, legend=class_legend(names, palette=palette, only=labels_present(*drawn)),
                       colour_bar_label="map value")


def labels_grid(dataset: VOCDataset, folders: Mapping[str, Path], indices: Sequence[int],
                tile: int = 192) -> np.ndarray:
    """A titled picture of label PNGs, one row per image: the input (titled with its id), its ground truth (where the split has masks),
    then each folder's ``<id>.png`` (titled by its key; blank where missing), in the dataset's palette with a legend
    of the classes drawn. ``(H, W, 3)`` uint8."""
    palette = dataset.palette()
    rows, drawn = [], []
    for i in indices:
        row = [(f"image {dataset.ids[i]}", dataset.load_image(i))]
        labelled = [("ground truth", dataset.load_mask(i))] if dataset.has_masks else []
        for title, folder in folders.items():
            path = Path(folder) / f"{dataset.ids[i]}.png"
            labelled.append((title, read_mask(path) if path.is_file() else None))
        for title, labels in labelled:
            if labels is not None:
                drawn.append(labels)
            row.append(None if labels is None else (title, label_tile(labels, tile, palette)))
        rows.append(row)
    if not rows:
        raise ValueError("labels_grid needs at least one image")
    return titled_grid(rows, tile=tile, legend=class_legend(dataset.classes.names, palette=palette,
                                                            only=labels_present(*drawn)))
