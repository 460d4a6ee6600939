"""Periodic validation: the mIoU of a model's localisation maps on a labelled split."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.voc import VOCDataset
from ..evaluate import ThresholdSweep, threshold_grid
from ..localize.split import iter_split_maps


def maps_miou(model: nn.Module, dataset: VOCDataset, method: str = "cam", scales: Sequence[float] = (1.0,),
              flip: bool = False, thresholds: Sequence[float] = (0.0, 1.0, 0.01), limit: int | None = None,
              indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
              mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
              **options) -> dict:
    """Best-threshold mIoU of ``method``'s maps over ``dataset`` (argmax over the present classes when the dataset
    has no background). Returns ``{'miou', 'threshold', 'iou', 'num_images'}``."""
    if indices is None:
        indices = range(len(dataset) if limit is None else min(limit, len(dataset)))
    sweep = ThresholdSweep(dataset.classes.num_classes, threshold_grid(*thresholds),
                           has_background=dataset.classes.has_background, class_names=dataset.classes.names)
    for i, (image_id, maps, labels) in zip(indices, iter_split_maps(model, dataset, method, scales, flip, mean, std,
                                                                    indices=indices, device=device, **options)):
        sweep.update(maps, labels, dataset.load_mask(i))
    threshold, metrics = sweep.best()
    if not dataset.classes.has_background:
        threshold = None
    iou = np.asarray(metrics["iou"], dtype=np.float64)
    return {"miou": float(metrics["miou"]), "threshold": threshold, "num_images": sweep.num_images,
            "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(dataset.classes.names, iou)}}
