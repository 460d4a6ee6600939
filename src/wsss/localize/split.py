"""Maps for every image of a dataset split: the step between a trained classifier and pseudo labels."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..data.batches import split_batches
from ..data.voc import VOCDataset
from ..methods import REGISTRY


def iter_split_maps(model: nn.Module, dataset: VOCDataset, method: str, scales: Sequence[float] = (1.0,),
                    flip: bool = False, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                    indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
                    memory_budget: int | str | None = None, batch_size: int = 1, num_workers: int = 0,
                    square_sizes: Sequence[int] | None = None,
                    **options) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(image id, maps (K, H, W) float32 in [0, 1], dataset labels (K,))`` for the image-level classes.

    The maps are at the image's own size; the classes are the image's labels (from its mask or labels file).
    ``batch_size`` images of one size are localised together (images then come by size, then in split order; see
    :func:`~wsss.data.batches.split_batches`) and ``num_workers`` loader processes decode them.
    ``memory_budget`` (bytes or a size such as ``"4G"``; None: the localizer's default) bounds one pass: a larger
    batch or image is computed in chunks or at a reduced size (see :class:`~wsss.localize.base.Localizer`).
    ``square_sizes`` replaces ``scales`` with views resized to ``S x S`` (ACR's ``[384]``); the maps are still at
    each image's own size.
    """
    indices = list(range(len(dataset)) if indices is None else indices)
    to_label = dataset.classes.output_to_label
    with REGISTRY.localizer(method)(model, **options) as loc:
        for images, batch in split_batches(dataset, indices, mean, std, batch_size, num_workers, device,
                                           classes=True):
            maps = loc(images, [item.classes.tolist() for item in batch], scales=scales, flip=flip,
                       memory_budget=memory_budget, square_sizes=square_sizes).cpu().numpy()
            for row, item in enumerate(batch):
                labels = np.array([to_label(o) for o in item.classes], dtype=np.int64)
                yield dataset.ids[item.index], maps[row, : len(item.classes)].astype(np.float32), labels
