"""Baselines that use the true image labels and no learning: what a localisation map must beat to mean anything.

Both place a map for every class the image contains and are scored like any map (best background threshold of an
exhaustive sweep), so a learned map that does not beat them has learned nothing about *where* the classes are.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.io import IGNORE_INDEX
from ..data.voc import VOCDataset
from .threshold import ThresholdSweep, threshold_grid

Prior = Callable[[int, tuple[int, int]], np.ndarray]


def new_sweep(dataset: VOCDataset) -> ThresholdSweep:
    """An exhaustive background-threshold sweep (0..1 by 0.01) for ``dataset``'s classes; a single argmax matrix
    when the dataset has no background class."""
    thresholds = threshold_grid(0.0, 1.0, 0.01) if dataset.classes.has_background else [0.0]
    return ThresholdSweep(dataset.classes.num_classes, thresholds, has_background=dataset.classes.has_background,
                          class_names=dataset.classes.names)


def prior_miou(dataset: VOCDataset, prior: Prior) -> float:
    """Best-threshold mIoU of ``prior(label, (H, W))`` maps, one per class present in each image."""
    sweep = new_sweep(dataset)
    for i in range(len(dataset)):
        gt = dataset.load_mask(i)
        present = np.flatnonzero(dataset.labels(i) > 0)
        classes = np.array([dataset.classes.output_to_label(o) for o in present], dtype=np.int64)
        maps = np.stack([prior(int(c), gt.shape) for c in classes]) if classes.size else np.zeros((0, *gt.shape))
        sweep.update(maps.astype(np.float32), classes, gt)
    return float(sweep.best()[1]["miou"])


def centre_gaussian(_: int, size: tuple[int, int]) -> np.ndarray:
    """A centred Gaussian whose sigma is a quarter of each side (the same for every class)."""
    ys = (np.arange(size[0]) - (size[0] - 1) / 2) / (size[0] / 4)
    xs = (np.arange(size[1]) - (size[1] - 1) / 2) / (size[1] / 4)
    return np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


def centre_prior(dataset: VOCDataset) -> float:
    """Best-threshold mIoU of :func:`centre_gaussian` for every present class."""
    return prior_miou(dataset, centre_gaussian)


def class_mean_masks(dataset: VOCDataset, side: int = 64) -> np.ndarray:
    """``(num_classes, side, side)``: the fraction of the images containing each class in which each cell of a
    ``side`` x ``side`` grid is that class (masks resized with nearest neighbours)."""
    sums = np.zeros((dataset.classes.num_classes, side, side))
    counts = np.zeros(dataset.classes.num_classes)
    for i in range(len(dataset)):
        gt = torch.from_numpy(dataset.load_mask(i).astype(np.int64))[None, None].float()
        small = F.interpolate(gt, size=(side, side), mode="nearest")[0, 0].numpy()
        for c in np.unique(small):
            if c != IGNORE_INDEX:
                sums[int(c)] += small == c
                counts[int(c)] += 1
    return sums / np.maximum(counts, 1)[:, None, None]


def mean_mask_prior(train_set: VOCDataset, eval_set: VOCDataset, side: int = 64) -> float:
    """Best-threshold mIoU on ``eval_set`` of each class's mean mask over ``train_set``'s masks."""
    means = class_mean_masks(train_set, side)

    def mean_mask(c: int, size: tuple[int, int]) -> np.ndarray:
        grid = torch.from_numpy(means[c])[None, None].float()
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()

    return prior_miou(eval_set, mean_mask)
