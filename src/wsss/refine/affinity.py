"""Propagating maps over patch tokens with a transformer's own attention affinity (a random walk).

With maps ``m`` of shape ``(K, N)`` (one row per class, one column per token) and an affinity ``A``
``(N, N)`` whose entry ``A[i, j]`` says how strongly token i attends to token j (query i, key j), the
steps are::

    W = (A + A^T) / 2              if symmetrize, else A
    W = W * mask                   if a mask is given (e.g. a local window)
    W = W ** power                 (beta)
    T = W / (W.sum(1) + eps)       normalize="row":    T[i, j] = W[i, j] / sum_j' W[i, j']
    T = (W / (W.sum(0) + eps))^T   normalize="column": T[i, j] = W[j, i] / sum_i' W[i', i]
    T = W                          normalize="none"
    T = T ** (2 ** log_steps)      (repeated squaring)
    m_i <- sum_j T[i, j] m_j       applied ``steps`` times, i.e. m <- m T^T

so the result is ``m (T^T)^(steps * 2^log_steps)``. The published variants are:

* AReAM ``cam' = A_hat cam`` with a row-stochastic ``A_hat``: ``normalize="row"`` (a no-op renormalisation);
* ACR ``g' = R g`` with an unnormalised ``R``: ``normalize="none"``;
* PSA / AFA (``trans = W / W.sum(0)``, ``cam_rw = cam @ trans``): ``normalize="column"``, with
  PSA's ``beta = 8, logt = 6`` as ``power=8, log_steps=6`` and AFA's as ``power=2, eps=0.1``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("row", "column", "none")


def transition_matrix(
    affinity: torch.Tensor,
    power: float = 1.0,
    normalize: str = "row",
    symmetrize: bool = False,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The one-step matrix ``T`` ``(B, N, N)`` of the module docstring (``m_i <- sum_j T[i, j] m_j``)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if affinity.ndim != 3 or affinity.shape[1] != affinity.shape[2]:
        raise ValueError(f"affinity must be (B, N, N), got {tuple(affinity.shape)}")
    weights = (affinity + affinity.transpose(1, 2)) / 2 if symmetrize else affinity
    if mask is not None:
        weights = weights * mask.to(weights.dtype)
    weights = weights**power
    if normalize == "row":
        return weights / (weights.sum(dim=2, keepdim=True) + eps)
    if normalize == "column":
        return (weights / (weights.sum(dim=1, keepdim=True) + eps)).transpose(1, 2)
    return weights


def propagate(
    maps_tokens: torch.Tensor,
    affinity: torch.Tensor,
    power: float = 1.0,
    steps: int = 1,
    log_steps: int = 0,
    normalize: str = "row",
    symmetrize: bool = False,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Random-walk ``(B, K, N)`` token maps with a ``(B, N, N)`` affinity; see the module docstring."""
    if maps_tokens.ndim != 3 or maps_tokens.shape[0] != affinity.shape[0] or maps_tokens.shape[2] != affinity.shape[-1]:
        raise ValueError(f"maps {tuple(maps_tokens.shape)} must be (B, K, N) for affinity {tuple(affinity.shape)}")
    if steps < 0 or log_steps < 0:
        raise ValueError(f"steps and log_steps must be >= 0, got {steps} and {log_steps}")
    trans = transition_matrix(affinity.to(maps_tokens.dtype), power, normalize, symmetrize, mask, eps)
    for _ in range(log_steps):
        trans = trans @ trans
    step = trans.transpose(1, 2)
    for _ in range(steps):
        maps_tokens = maps_tokens @ step
    return maps_tokens


def refine_with_affinity(
    maps: torch.Tensor,
    affinity: torch.Tensor,
    grid: Sequence[int],
    power: float = 1.0,
    steps: int = 1,
    log_steps: int = 0,
    normalize: str = "row",
    symmetrize: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Random-walk pixel maps ``(B, K, H, W)`` on an ``(h, w)`` token grid and return them at ``(H, W)``.

    The maps are area-averaged onto the grid (as PSA average-pools its CAMs), propagated with
    :func:`propagate` (the other arguments are its own) and upsampled bilinearly.
    """
    grid_h, grid_w = int(grid[0]), int(grid[1])
    if affinity.shape[-1] != grid_h * grid_w:
        raise ValueError(f"affinity {tuple(affinity.shape)} does not fit a {grid_h}x{grid_w} token grid")
    batch, channels, height, width = maps.shape
    tokens = F.interpolate(maps, size=(grid_h, grid_w), mode="area").reshape(batch, channels, -1)
    walked = propagate(tokens, affinity, power, steps, log_steps, normalize, symmetrize, eps=eps)
    walked = walked.reshape(batch, channels, grid_h, grid_w)
    return F.interpolate(walked, size=(height, width), mode="bilinear", align_corners=False)


PSA_BETA = 8.0  # methods.md §4: AReAM's main_psa.sh (PSA's defaults)
PSA_LOGT = 6
PSA_BACKGROUND = 0.39


def psa_random_walk(
    maps: torch.Tensor,
    affinity: torch.Tensor,
    stride: int,
    background: float = PSA_BACKGROUND,
    beta: float = PSA_BETA,
    log_steps: int = PSA_LOGT,
) -> torch.Tensor:
    """PSA's random walk (``infer_aff.py``) of ``(B, K, H, W)`` class maps with an AffinityNet's ``(B, N, N)``
    affinity; returns the walked scores ``(B, K + 1, H, W)``, channel 0 the background.

    As the authors: a constant background score ``background`` goes in front of the maps; the stack is
    zero-padded at the bottom and right to multiples of ``stride`` (the padded image the network saw), averaged
    over ``stride x stride`` cells onto the ``(ceil(H/s), ceil(W/s))`` grid, walked with
    ``T = (A^beta / column sums)^(2^log_steps)`` (``cam @ T``), upsampled bilinearly to the padded size and
    cropped back to ``H x W``. The argmax over channels is the label.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, K, H, W), got {tuple(maps.shape)}")
    batch, _, height, width = maps.shape
    grid_h, grid_w = -(-height // stride), -(-width // stride)
    if affinity.shape != (batch, grid_h * grid_w, grid_h * grid_w):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not fit {height}x{width} maps at stride {stride}: "
                         f"expected ({batch}, {grid_h * grid_w}, {grid_h * grid_w})")
    scores = torch.cat([maps.new_full((batch, 1, height, width), float(background)), maps], dim=1)
    padded = F.pad(scores, (0, grid_w * stride - width, 0, grid_h * stride - height))
    tokens = F.avg_pool2d(padded, stride, stride).flatten(2)
    walked = propagate(tokens, affinity, power=beta, log_steps=log_steps, normalize="column", eps=0.0)
    walked = walked.view(batch, -1, grid_h, grid_w)
    walked = F.interpolate(walked, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return walked[:, :, :height, :width]
