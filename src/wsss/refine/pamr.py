"""PAMR, pixel-adaptive mask refinement, in the GETAM version (methods.md §1).

For pixel i with the 48 neighbours j (8 per dilation in {1, 2, 4, 8, 12, 24}, replicate padding):

* ``sigma_i`` (per colour channel) is the unbiased std of the 54 values of the 3x3 stencils at the six
  dilations, the centre included once per dilation;
* ``kappa_ij = softmax_j( mean_ch( -|I_i - I_j| / (1e-8 + 0.1 * sigma_i) ) )`` over the 48 neighbours;
* the maps are iterated ``m_i <- sum_j kappa_ij m_j``; the centre pixel itself is not among the j.

The image is the raw RGB in 0..255. Since each kernel row sums to 1, a constant map stays constant.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .neighbours import check_guide, local_std, neighbour_offsets, propagate_local, shifted_views

PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


def pamr_kernel(image_0_255: torch.Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> torch.Tensor:
    """The ``(B, 8 * len(dilations), H, W)`` PAMR kernel of a ``(B, 3, H, W)`` image in 0..255."""
    image = image_0_255 if image_0_255.is_floating_point() else image_0_255.float()
    sigma = local_std(image, neighbour_offsets(dilations, include_centre=True))
    scale = 1e-8 + 0.1 * sigma
    logits = torch.stack(
        [(-(image - view).abs() / scale).mean(1) for view in shifted_views(image, neighbour_offsets(dilations))],
        dim=1,
    )
    return logits.softmax(dim=1)


def pamr(
    image_0_255: torch.Tensor,
    maps: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = PAMR_DILATIONS,
) -> torch.Tensor:
    """Refine ``(B, K, H, W)`` maps with PAMR guided by a ``(B, 3, H, W)`` image in 0..255 (same H, W)."""
    check_guide(image_0_255, maps)
    kernel = pamr_kernel(image_0_255.to(maps.dtype) if maps.is_floating_point() else image_0_255, dilations)
    return propagate_local(maps, kernel, dilations, iterations)


class PAMR(nn.Module):
    """:func:`pamr` as a module (no parameters); ``forward(image_0_255, maps)``."""

    def __init__(self, iterations: int = 10, dilations: Sequence[int] = PAMR_DILATIONS):
        super().__init__()
        self.iterations = int(iterations)
        self.dilations = tuple(int(d) for d in dilations)

    def forward(self, image_0_255: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return pamr(image_0_255, maps, self.iterations, self.dilations)

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}, dilations={self.dilations}"
