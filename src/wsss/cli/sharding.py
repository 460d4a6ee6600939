"""Split inference over ``torchrun`` ranks: ``cam``, ``pseudo`` and ``predict`` share the images of a split out.

Under ``torchrun --nproc_per_node N -m wsss.cli.main cam ...`` each rank takes every N-th image of the split (a
fixed assignment, so every rank knows the others' images without talking to them), writes only its own files and
records them in its own part manifest; rank 0 checks the folder first (settings, ``--overwrite``), and merges the
parts at the end. The folder then holds the same files and manifest as one process would write, and a killed run
resumes, with any number of ranks. One process (no ``torchrun``) runs as before.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import torch

from ..device import resolve_device
from ..data.manifest import OutputManifest, consolidate_parts
from ..errors import WSSSError
from ..train.distributed import DistInfo, all_gather_objects, init_distributed, shutdown

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's share of a split-inference job and the device it runs on."""

    dist: DistInfo
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th, from its rank on (all of them for one process)."""
        return list(items[self.dist.rank :: self.dist.world_size])

    def open_manifest(self, out: str | Path, kind: str, settings: Mapping[str, Any], data_root: str | Path,
                      split: str, overwrite: bool, command: str, arguments: Mapping[str, Any]) -> OutputManifest:
        """The manifest this rank records into; rank 0 checks the folder (and deletes on ``overwrite``) first, and
        an error there (other settings) is raised on every rank."""
        if not self.dist.enabled:
            return OutputManifest.open(out, kind, settings, data_root, split, overwrite=overwrite, command=command,
                                       arguments=arguments)
        error = None
        if self.is_main:
            try:
                OutputManifest.open(out, kind, settings, data_root, split, overwrite=overwrite, command=command,
                                    arguments=arguments)
                consolidate_parts(out)  # a killed sharded run's parts: one manifest before the ranks read it
            except WSSSError as exc:
                error = exc
        error = all_gather_objects(error, self.dist)[0]  # also the barrier: nobody reads before rank 0 is done
        if error is not None:
            raise error
        return OutputManifest.open(out, kind, settings, data_root, split, command=command, arguments=arguments,
                                   part=self.dist.rank)

    def finish(self, out: str | Path, counts: Sequence[int]) -> list[int]:
        """Wait for every rank, merge the parts (rank 0) and leave the group; the ``counts`` summed over ranks."""
        gathered = all_gather_objects(list(counts), self.dist)
        if self.dist.enabled and self.is_main:
            consolidate_parts(out)
        shutdown(self.dist)
        return [sum(values) for values in zip(*gathered)]


def join(args: argparse.Namespace) -> Shard:
    """Join the ``torchrun`` job, if any, on ``args.device``; each rank of a CUDA job takes GPU ``LOCAL_RANK``."""
    device = resolve_device(args.device)
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return Shard(dist, device)
