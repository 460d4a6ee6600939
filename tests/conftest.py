"""Shared fixtures: the real data in ../shared/data (overridable with WSSS_SHARED_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

# Set before torch is imported: spinning OpenMP threads slow a busy 2-core machine badly.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSSS_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set WSSS_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def vit_tiny_weights() -> Path:
    return _need(SHARED_DATA / "weights" / "vit_tiny_patch16_224_in1k.safetensors")
