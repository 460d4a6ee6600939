"""Background scores stacked in front of per-class maps (channel 0 = background)."""

from __future__ import annotations

import torch


def psa_background(maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """PSA's background score ``(1 - max_k maps_k) ** alpha`` of ``(K, H, W)`` maps in [0, 1], as ``(H, W)``.

    With no maps (K = 0) the background score is 1 everywhere. PSA uses alpha = 1 ("low") and 12 ("high");
    GETAM's label completion uses 32.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (K, H, W), got {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        return torch.ones(maps.shape[1:], dtype=maps.dtype, device=maps.device)
    return (1 - maps.amax(dim=0)) ** alpha


def with_background(maps: torch.Tensor, background: torch.Tensor | float) -> torch.Tensor:
    """``(K + 1, H, W)``: the background (a scalar or an ``(H, W)`` map) as channel 0, then the maps."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be (K, H, W), got {tuple(maps.shape)}")
    bg = torch.as_tensor(background, dtype=maps.dtype, device=maps.device).expand(1, *maps.shape[1:])
    return torch.cat([bg, maps], dim=0)
