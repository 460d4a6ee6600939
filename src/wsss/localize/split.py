"""Maps for every image of a dataset split: the step between a trained classifier and pseudo labels."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..data.transforms import eval_transforms
from ..data.voc import VOCDataset
from ..errors import DataError
from ..methods import REGISTRY


def iter_split_maps(model: nn.Module, dataset: VOCDataset, method: str, scales: Sequence[float] = (1.0,),
                    flip: bool = False, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                    indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
                    memory_budget: int | str | None = None,
                    **options) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(image id, maps (K, H, W) float32 in [0, 1], dataset labels (K,))`` for the image-level classes.

    The maps are at the image's own size; the classes are the image's labels (from its mask or labels file).
    ``memory_budget`` (bytes or a size such as ``"4G"``; None: the localizer's default) bounds one pass: a larger
    image is computed in chunks or at a reduced size (see :class:`~wsss.localize.base.Localizer`).
    """
    transform = eval_transforms(None, mean, std)
    classes = dataset.classes
    with REGISTRY.localizer(method)(model, **options) as loc:
        for i in range(len(dataset)) if indices is None else indices:
            image_id = dataset.ids[i]
            present = np.flatnonzero(dataset.labels(i) > 0)
            if present.size == 0:
                raise DataError(dataset.image_path(image_id), "empty label set: no class to localise")
            image, _ = transform(dataset.load_image(i))
            maps = loc(image[None].to(device), [present.tolist()], scales=scales, flip=flip,
                       memory_budget=memory_budget)[0]
            labels = np.array([classes.output_to_label(o) for o in present], dtype=np.int64)
            yield image_id, maps.cpu().numpy().astype(np.float32), labels
