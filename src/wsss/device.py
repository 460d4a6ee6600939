"""One meaning of a device name for every command and the training engine (torch is imported only to resolve
one, so that parsers and config checks can use :data:`DEVICE_NAME` without it)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str, what: str = "--device") -> "torch.device":
    """The torch device ``name`` means: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``. Another name, or CUDA on a machine without it, is a ConfigError naming ``what`` was set."""
    import torch

    if not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {name}: no CUDA device is available (torch {torch.__version__}, "
                              f"{'a CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}); "
                              f"use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}); use one of them, cuda or auto")
    return device
