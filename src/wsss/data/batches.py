"""The images of a split in batches for inference: grouped by size, decoded by loader workers.

A batch holds images of one size only, so nothing is padded and every result equals the one-image result. Loading
errors (a corrupt image, an empty label set) come back from a worker as the error itself, naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import CARRIED, DataError, WorkerFailure
from .transforms import eval_transforms
from .voc import VOCDataset


@dataclass
class SplitImage:
    """One image of a batch: its dataset index, the normalised tensor, and on request its classes and pixels."""

    index: int
    tensor: Tensor  # (3, H, W), normalised
    classes: np.ndarray | None  # classifier outputs of its image-level classes
    pixels: np.ndarray | None  # (H, W, 3) uint8


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Positions ``0..len(sizes)-1`` in batches of at most ``batch_size`` with one size each.

    Sizes are taken in order of first appearance and positions keep their order within a size; batches of 1 keep
    the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size == 1:
        return [[position] for position in range(len(sizes))]
    groups: dict[tuple[int, int], list[int]] = {}
    for position, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(position)
    return [members[s : s + batch_size] for members in groups.values() for s in range(0, len(members), batch_size)]


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset: VOCDataset, indices: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 classes: bool, pixels: bool):
        self.dataset, self.indices = dataset, list(indices)
        self.transform = eval_transforms(None, mean, std)
        self.classes, self.pixels = classes, pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> SplitImage | WorkerFailure:
        index = self.indices[position]
        try:
            present = None
            if self.classes:
                present = np.flatnonzero(self.dataset.labels(index) > 0)
                if present.size == 0:
                    raise DataError(self.dataset.image_path(self.dataset.ids[index]),
                                    "empty label set: no class to localise")
            image = self.dataset.load_image(index)
            tensor, _ = self.transform(image)
        except CARRIED as exc:
            return WorkerFailure(exc)
        return SplitImage(index, tensor, present, image if self.pixels else None)


def _collate(items: list) -> list | WorkerFailure:
    return next((item for item in items if isinstance(item, WorkerFailure)), items)


def split_batches(dataset: VOCDataset, indices: Sequence[int], mean: Sequence[float], std: Sequence[float],
                  batch_size: int = 1, num_workers: int = 0, device: torch.device | str = "cpu",
                  classes: bool = False, pixels: bool = False) -> Iterator[tuple[Tensor, list[SplitImage]]]:
    """Yield ``(images (B, 3, H, W) on device, their SplitImage records)`` for the images ``indices``.

    ``classes`` adds each image's classes (an image without any is an error), ``pixels`` its uint8 pixels (for a
    CRF). Batches come by size, then in the order of ``indices``; on CUDA they are pinned and copied asynchronously.
    """
    device = torch.device(device)
    sizes = [dataset.image_size(i) for i in indices] if batch_size > 1 else [(0, 0)] * len(indices)
    loader = torch.utils.data.DataLoader(
        _Images(dataset, indices, mean, std, classes, pixels), batch_sampler=size_batches(sizes, batch_size),
        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    for batch in loader:
        if isinstance(batch, WorkerFailure):
            batch.reraise()
        yield torch.stack([item.tensor for item in batch]).to(device, non_blocking=True), batch
