"""Checkpoints: the model as safetensors (with the architecture in its metadata), the training state as a
``weights_only`` torch file. Each checkpoint is written to a temporary folder and renamed into place, so a kill
never leaves a half-written checkpoint, and ``latest`` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..data.io import write_bytes_atomic
from ..errors import CheckpointError
from ..models import create_model, load_into

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
    model = create_model(spec["name"], head=spec.get("head", "token"), pool=spec.get("pool", "avg"),
                         num_classes=spec.get("num_classes"), img_size=tuple(spec["img_size"]) if "img_size" in spec else 224)
    from ..models.weights import load_state_dict

    load_into(model, load_state_dict(path), source=str(path))
    return model


class CheckpointManager:
    """``run_dir/checkpoints/step_000123/{model.safetensors,state.pt}`` plus a ``latest`` pointer."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / MODEL_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{pointer}: points at an incomplete checkpoint {path}")
        return path

    def save(self, step: int, model: nn.Module, spec: dict, state: dict[str, Any]) -> Path:
        name = f"step_{step:07d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(tmp / MODEL_FILE, model, spec)
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
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
