"""Periodic validation: the mIoU of a model's localisation maps on a labelled split, and pictures of them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.voc import VOCDataset
from ..evaluate import ThresholdSweep, threshold_grid
from ..localize.split import iter_split_maps
from ..pseudo.labels import maps_to_labels
from ..visualize import colorize, overlay, resize_tile


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
             std: Sequence[float] | None = (0.5, 0.5, 0.5), tile: int = 128, **options) -> np.ndarray:
    """One row per image: the input, its ground truth, the pseudo label of the maps at ``threshold`` and the
    strongest map over the input. Returns an ``(rows * tile, 4 * tile, 3)`` uint8 picture."""
    has_bg = dataset.classes.has_background
    rows = []
    for i, (_, maps, labels) in zip(indices, iter_split_maps(model, dataset, method, scales, flip, mean, std,
                                                             indices=indices, device=device, **options)):
        image = dataset.load_image(i)
        t = (0.5 if threshold is None else threshold) if has_bg else None
        pseudo = maps_to_labels(torch.from_numpy(maps), labels, t).numpy().astype(np.uint8)
        cells = [resize_tile(image, tile), resize_tile(colorize(dataset.load_mask(i)), tile, nearest=True),
                 resize_tile(colorize(pseudo), tile, nearest=True), resize_tile(overlay(image, maps.max(axis=0)), tile)]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0) if rows else np.zeros((tile, 4 * tile, 3), dtype=np.uint8)
