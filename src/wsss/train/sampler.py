"""A resumable, rank-sharded batch sampler.

Epoch ``e`` visits a permutation drawn from ``(seed, e)``. Global batch ``i`` is a fixed slice of that
permutation and each rank takes its own contiguous share, so N processes with per-rank batch b see exactly the
samples one process with batch N*b sees. Resuming at step s starts inside the right epoch at the right batch.
"""

from __future__ import annotations

from typing import Iterator

import torch


class ResumableBatchSampler:
    """Yields this rank's index lists for the batches of one epoch, starting at ``start_batch``."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_samples < batch_size * world_size:
            raise ValueError(f"the split has {num_samples} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} processes)")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # the last partial batch is dropped

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        for i in range(self.start_batch, self.batches_per_epoch):
            chunk = perm[i * self.global_batch : (i + 1) * self.global_batch]
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
