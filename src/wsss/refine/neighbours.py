"""Dilated 8-neighbourhoods with replicate padding, the stencil shared by PAMR and PAR.

A neighbour of pixel ``(y, x)`` at offset ``(dy, dx)`` is the pixel ``(clamp(y + dy), clamp(x + dx))``,
which is what replicate padding gives. Shifted views are slices of one padded copy, so a whole
neighbourhood costs one pad and ``P`` slices, never a ``(B, C, P, H, W)`` tensor.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

Offset = tuple[int, int]

# Row-major order of the 3x3 stencil, as in the authors' shift kernels.
_STENCIL: tuple[Offset, ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def check_guide(image: torch.Tensor, maps: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``image`` is ``(B, 3, H, W)`` and ``maps`` is ``(B, K, H, W)`` of the same size."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if maps.ndim != 4 or maps.shape[0] != image.shape[0] or maps.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, K, H, W) matching image {tuple(image.shape)}")


def neighbour_offsets(dilations: Sequence[int], include_centre: bool = False) -> list[Offset]:
    """``(dy, dx)`` of the 8 neighbours at each dilation (dilation-major, 3x3 row-major inside).

    With ``include_centre`` the centre ``(0, 0)`` is kept once per dilation (9 offsets per dilation).
    """
    if not dilations or any(int(d) < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {list(dilations)}")
    return [
        (d * dy, d * dx)
        for d in dilations
        for dy, dx in _STENCIL
        if include_centre or (dy, dx) != (0, 0)
    ]


def offset_lengths(dilations: Sequence[int]) -> torch.Tensor:
    """Euclidean length of each neighbour offset of :func:`neighbour_offsets` (``d`` or ``d * sqrt 2``)."""
    return torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(dilations)], dtype=torch.float64)


def shifted_views(x: torch.Tensor, offsets: Sequence[Offset]) -> Iterator[torch.Tensor]:
    """Yield, for each offset, the ``(B, C, H, W)`` map whose pixel ``(y, x)`` holds the neighbour's value."""
    height, width = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, [pad] * 4, mode="replicate")
    for dy, dx in offsets:
        yield padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def propagate_local(
    maps: torch.Tensor, kernel: torch.Tensor, dilations: Sequence[int], iterations: int
) -> torch.Tensor:
    """Apply ``m_i <- sum_j kernel[i, j] * m_j`` ``iterations`` times over the dilated 8-neighbourhoods.

    Args:
        maps: ``(B, K, H, W)``.
        kernel: ``(B, P, H, W)`` weights, ``P = 8 * len(dilations)`` in :func:`neighbour_offsets` order.
        dilations: the dilations the kernel was built for.
        iterations: number of propagation steps.
    """
    offsets = neighbour_offsets(dilations)
    if kernel.shape[1] != len(offsets) or kernel.shape[-2:] != maps.shape[-2:]:
        raise ValueError(
            f"kernel {tuple(kernel.shape)} does not fit maps {tuple(maps.shape)} and {len(offsets)} neighbours"
        )
    kernel = kernel.to(maps.dtype)
    for _ in range(iterations):
        out = torch.zeros_like(maps)
        for p, view in enumerate(shifted_views(maps, offsets)):
            out.addcmul_(kernel[:, p : p + 1], view)
        maps = out
    return maps


def local_std(x: torch.Tensor, offsets: Sequence[Offset]) -> torch.Tensor:
    """Per-channel unbiased standard deviation of ``x`` over the given neighbour offsets (two passes)."""
    count = len(offsets)
    mean = sum(shifted_views(x, offsets)) / count
    sq_dev = sum((view - mean) ** 2 for view in shifted_views(x, offsets))
    return (sq_dev / (count - 1)).sqrt()
