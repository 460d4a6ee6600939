"""Checkpoints: the model as safetensors (with the architecture in its metadata), the training state as a
``weights_only`` torch file. Each checkpoint is written to a temporary folder and renamed into place, so a kill
never leaves a half-written checkpoint, and ``latest`` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..data.io import write_bytes_atomic
from ..errors import CheckpointError
from ..models import create_model, load_into
from ..segment.model import SPEC_KEY

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_KEY = "wsss_model"


def model_spec(model: nn.Module, name: str, extra: dict | None = None) -> dict:
    """What :func:`load_model` needs to rebuild the architecture."""
    spec = {"name": name, "head": model.head_type, "pool": model.pool, "num_classes": model.num_classes,
            "img_size": [model.base_grid[0] * model.patch_size, model.base_grid[1] * model.patch_size]}
    spec.update(extra or {})
    return spec


def save_model(path: str | Path, model: nn.Module, spec: dict) -> None:
    """Write the weights (contiguous CPU copies) and the architecture spec as safetensors metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(spec)})
    os.replace(tmp, path)


def read_spec(path: str | Path) -> dict | None:
    """The architecture spec stored in a safetensors file by :func:`save_model`, or None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc
    return json.loads(meta[META_KEY]) if META_KEY in meta else None


def load_model(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (a run's checkpoint folder or its ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    spec = read_spec(path) if path.suffix == ".safetensors" else None
    if spec is None and "name" not in overrides:
        raise CheckpointError(f"{path}: no architecture stored in the checkpoint; pass the model name explicitly")
    spec = {**(spec or {}), **overrides}
    if SPEC_KEY in spec:
        raise CheckpointError(f"{path}: holds a segmentation model (backbone + decoder); load it with "
                              f"wsss.segment.model.load_segmenter")
    img_size = tuple(spec["img_size"]) if "img_size" in spec else 224
    model = create_model(spec["name"], head=spec.get("head", "token"), pool=spec.get("pool", "avg"),
                         num_classes=spec.get("num_classes"), img_size=img_size)
    from ..models.weights import load_state_dict

    load_into(model, load_state_dict(path), source=str(path))
    return model


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

    def save(self, step: int, model: nn.Module, spec: dict, state: dict[str, Any]) -> Path:
        """Write ``step_<step>`` atomically, point ``latest`` at it and drop all but the ``keep`` newest."""
        name = f"step_{step:07d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(tmp / MODEL_FILE, model, spec)
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
