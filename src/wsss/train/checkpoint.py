"""A run's checkpoints: the model in the one checkpoint format (:mod:`wsss.models.checkpoint`), the training state
as a ``weights_only`` torch file. Each checkpoint is written to a temporary folder and renamed into place, so a kill
never leaves a half-written checkpoint, and ``latest`` names the newest complete one.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.io import write_bytes_atomic
from ..errors import CheckpointError, naming
from ..models.checkpoint import MODEL_FILE, ModelSpec, save

STATE_FILE = "state.pt"
STEP_NAME = re.compile(r"step_\d{7,}")


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
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{pointer}: unreadable ({exc}); write the name of a checkpoint folder into it "
                                  f"(e.g. step_0000100)") from exc
        if not STEP_NAME.fullmatch(name):
            raise CheckpointError(f"{pointer}: should name a checkpoint folder like step_0000100, holds {name[:40]!r}")
        path = self.root / name
        if not (path / MODEL_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{pointer}: points at an incomplete checkpoint {path}; write the name of a "
                                  f"complete one into it")
        return path

    def save(self, step: int, model: nn.Module, spec: ModelSpec, state: dict[str, Any]) -> Path:
        """Write ``step_<step>`` atomically, point ``latest`` at it and drop all but the ``keep`` newest."""
        name = f"step_{step:07d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink():  # never write through a link
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save(tmp / MODEL_FILE, model, spec)
        # Serialised in memory and written by Python: torch.save to a path turns a full disk into an opaque
        # RuntimeError, a Python write raises the OSError (ENOSPC) that the command line reports by name.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with naming(tmp / STATE_FILE):
            (tmp / STATE_FILE).write_bytes(buffer.getvalue())
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
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # torch appends pages of advice
            raise CheckpointError(f"{path / STATE_FILE}: cannot read training state ({first}); write the name "
                                  f"of an earlier step_* folder into {path.parent / 'latest'} to resume from "
                                  f"it") from exc


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
