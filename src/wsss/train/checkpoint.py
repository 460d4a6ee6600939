"""A run's checkpoints: the model in the one checkpoint format (:mod:`wsss.models.checkpoint`), the training state
as a ``weights_only`` torch file. Each checkpoint is written to a temporary folder and renamed into place, so a kill
never leaves a half-written checkpoint, and ``latest`` names the newest complete one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.io import write_bytes_atomic
from ..errors import CheckpointError
from ..models.checkpoint import MODEL_FILE, ModelSpec, save

STATE_FILE = "state.pt"


class CheckpointManager:
    """``run_dir/checkpoints/step_000123/{model.safetensors,state.pt}`` plus a ``latest`` pointer."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None before the first; an inconsistent pointer is an error."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / MODEL_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{pointer}: points at an incomplete checkpoint {path}")
        return path

    def save(self, step: int, model: nn.Module, spec: ModelSpec, state: dict[str, Any]) -> Path:
        """Write ``step_<step>`` atomically, point ``latest`` at it and drop all but the ``keep`` newest."""
        name = f"step_{step:07d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save(tmp / MODEL_FILE, model, spec)
        torch.save(state, tmp / STATE_FILE)
        # Saving a step again (a finished run resumed): move the old copy aside first, so that ``latest`` never
        # names a missing folder, whenever the process dies.
        old = self.root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        write_bytes_atomic(self.root / "latest", name.encode())
        self._prune(keep_name=name)
        return final

    def _prune(self, keep_name: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load_state(path: Path) -> dict[str, Any]:
        """The training state, read with ``weights_only=True`` (tensors, numbers, strings and containers)."""
        try:
            return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path / STATE_FILE}: cannot read training state ({exc})") from exc


def rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, Python, NumPy) in ``weights_only``-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA part only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
