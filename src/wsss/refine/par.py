"""PAR, pixel-adaptive refinement, in the AFA version used by AReAM (methods.md §1, §4).

For pixel i with the 48 neighbours j (8 per dilation in {1, 2, 4, 8, 12, 24}, replicate padding):

* ``sigma_i`` (per colour channel) is the unbiased std of the 48 neighbour values (centre excluded);
* ``d_ij = dilation * sqrt(2)`` for diagonal neighbours, ``dilation`` otherwise, and ``sigma_d`` the
  unbiased std of the 48 ``d_ij`` (the same for every pixel);
* ``kappa_ij = softmax_j( mean_ch[ -(|I_i - I_j| / (sigma_i + 1e-8) / 0.3)^2 ] )
  + w_pos * softmax_j( -(d_ij / (sigma_d + 1e-8) / 0.3)^2 )``;
* the maps are iterated ``m_i <- sum_j kappa_ij m_j`` (centre not among the j).

Each kernel row sums to ``1 + w_pos``, so every step scales the maps by 1.01 (as in the original); the
argmax over classes is unaffected. The image is the de-normalised RGB in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .neighbours import check_guide, local_std, neighbour_offsets, offset_lengths, propagate_local, shifted_views

PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
PAR_TEMPERATURE = 0.3


def par_positional_kernel(
    dilations: Sequence[int] = PAR_DILATIONS, temperature: float = PAR_TEMPERATURE
) -> torch.Tensor:
    """The image-independent ``(8 * len(dilations),)`` softmax over the neighbour distances (float64)."""
    lengths = offset_lengths(dilations)
    sigma_d = lengths.std()  # unbiased, as torch.std in the original
    return (-((lengths / (sigma_d + 1e-8) / temperature) ** 2)).softmax(0)


def par_kernel(
    image_0_1: torch.Tensor,
    dilations: Sequence[int] = PAR_DILATIONS,
    w_pos: float = 0.01,
    temperature: float = PAR_TEMPERATURE,
) -> torch.Tensor:
    """The ``(B, 8 * len(dilations), H, W)`` PAR kernel of a ``(B, 3, H, W)`` image in [0, 1]."""
    image = image_0_1 if image_0_1.is_floating_point() else image_0_1.float()
    offsets = neighbour_offsets(dilations)
    scale = local_std(image, offsets) + 1e-8
    logits = torch.stack(
        [(-(((image - view).abs() / scale / temperature) ** 2)).mean(1) for view in shifted_views(image, offsets)],
        dim=1,
    )
    positional = par_positional_kernel(dilations, temperature).to(image.device, image.dtype)
    return logits.softmax(dim=1) + w_pos * positional.view(1, -1, 1, 1)


def par(
    image_0_1: torch.Tensor,
    maps: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = PAR_DILATIONS,
    w_pos: float = 0.01,
) -> torch.Tensor:
    """Refine ``(B, K, H, W)`` maps with PAR guided by a ``(B, 3, H, W)`` image in [0, 1] (same H, W)."""
    check_guide(image_0_1, maps)
    kernel = par_kernel(image_0_1.to(maps.dtype) if maps.is_floating_point() else image_0_1, dilations, w_pos)
    return propagate_local(maps, kernel, dilations, iterations)


class PAR(nn.Module):
    """:func:`par` as a module (no parameters); ``forward(image_0_1, maps)``."""

    def __init__(self, iterations: int = 10, dilations: Sequence[int] = PAR_DILATIONS, w_pos: float = 0.01):
        super().__init__()
        self.iterations = int(iterations)
        self.dilations = tuple(int(d) for d in dilations)
        self.w_pos = float(w_pos)

    def forward(self, image_0_1: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return par(image_0_1, maps, self.iterations, self.dilations, self.w_pos)

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}, dilations={self.dilations}, w_pos={self.w_pos}"
