"""An image's (or a batch's) refinement as a callable on score stacks, whatever the method.

A refiner maps ``(B, C, h, w)`` scores to refined ``(B, C, h, w)`` scores (B = 1 for one image). It holds the image at full
size and resizes it (bilinear, ``align_corners=False``, as AReAM's ``cam_to_seg``) when the scores
come at another size, e.g. at half resolution. Image-dependent kernels are computed once per size and
reused, so two runs on the same image (two thresholds) pay for one kernel.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .affinity import refine_with_affinity
from .crf import CRFParams, crf_params, dense_crf
from .neighbours import propagate_local
from .pamr import PAMR_DILATIONS, pamr_kernel
from .par import PAR_DILATIONS, par_kernel

Refiner = Callable[[torch.Tensor], torch.Tensor]

REFINEMENTS = ("none", "pamr", "par", "crf", "affinity")


class _ImageAtSize:
    """An ``(H, W, 3)`` uint8 image, or a ``(B, 3, H, W)`` float batch in 0..255, as a float ``(B, 3, h, w)``
    tensor in 0..255 at any requested size."""

    def __init__(self, image: np.ndarray | torch.Tensor):
        if torch.is_tensor(image) and image.ndim == 4:
            if image.shape[1] != 3:
                raise ValueError(f"an image batch must be (B, 3, H, W), got {tuple(image.shape)}")
            self.full = image.detach().float()
            return
        image_t = torch.as_tensor(np.array(image))  # a copy: PIL-backed arrays are read-only
        if image_t.ndim != 3 or image_t.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3), got {tuple(image_t.shape)}")
        self.full = image_t.permute(2, 0, 1).unsqueeze(0).float()

    def at(self, size: Sequence[int]) -> torch.Tensor:
        if tuple(size) == tuple(self.full.shape[-2:]):
            return self.full
        return F.interpolate(self.full, size=tuple(size), mode="bilinear", align_corners=False)


def _local_refiner(image: _ImageAtSize, kind: str, iterations: int, dilations: Sequence[int]) -> Refiner:
    kernels: dict[tuple[int, int], torch.Tensor] = {}

    def refine(scores: torch.Tensor) -> torch.Tensor:
        size = tuple(scores.shape[-2:])
        if size not in kernels:
            guide = image.at(size).to(scores.device, torch.float32)
            kernels[size] = pamr_kernel(guide, dilations) if kind == "pamr" else par_kernel(guide / 255.0, dilations)
        return propagate_local(scores, kernels[size], dilations, iterations)

    return refine


def _crf_refiner(image: _ImageAtSize, params: CRFParams) -> Refiner:
    if image.full.shape[0] != 1:
        raise ValueError("the dense CRF refines one image at a time")

    def refine(scores: torch.Tensor) -> torch.Tensor:
        guide = image.at(scores.shape[-2:]).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
        probs = dense_crf(guide.numpy(), scores[0].detach().cpu().float().numpy(), params)
        return torch.from_numpy(probs).to(scores.device, scores.dtype).unsqueeze(0)

    return refine


def make_refiner(
    kind: str,
    image: np.ndarray | torch.Tensor | None,
    iterations: int = 10,
    dilations: Sequence[int] | None = None,
    crf: str | CRFParams = "psa",
    affinity: torch.Tensor | None = None,
    grid: Sequence[int] | None = None,
    affinity_power: float = 1.0,
    affinity_steps: int = 1,
    affinity_normalize: str = "row",
) -> Refiner | None:
    """The refiner of ``kind`` (one of :data:`REFINEMENTS`) for an ``(H, W, 3)`` uint8 image, or for a
    ``(B, 3, H, W)`` float batch in 0..255 (not the CRF); None for "none".

    ``pamr`` and ``par`` run ``iterations`` steps (default dilations 1, 2, 4, 8, 12, 24; PAMR sees the image
    in 0..255, PAR in [0, 1]); ``crf`` uses the preset or :class:`CRFParams` ``crf``; ``affinity`` needs the
    ``(N, N)`` token ``affinity`` and its ``(h, w)`` ``grid`` (see :func:`refine_with_affinity`) and no image.
    """
    if kind not in REFINEMENTS:
        raise ValueError(f"unknown refinement {kind!r}; choose one of {REFINEMENTS}")
    if kind == "none":
        return None
    if kind == "affinity":
        if affinity is None or grid is None:
            raise ValueError("affinity refinement needs the token affinity matrix and its grid")
        matrix = torch.as_tensor(affinity, dtype=torch.float32)
        matrix = matrix.unsqueeze(0) if matrix.ndim == 2 else matrix

        def walk(scores: torch.Tensor) -> torch.Tensor:
            return refine_with_affinity(
                scores, matrix.to(scores.device, scores.dtype), grid,
                power=affinity_power, steps=affinity_steps, normalize=affinity_normalize,
            )

        return walk
    if image is None:
        raise ValueError(f"the {kind} refinement needs the image")
    held = _ImageAtSize(image)
    if kind == "crf":
        return _crf_refiner(held, crf_params(crf))
    default = PAMR_DILATIONS if kind == "pamr" else PAR_DILATIONS
    return _local_refiner(held, kind, iterations, tuple(dilations or default))
