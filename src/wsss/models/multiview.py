"""Test-time views: every scale of an image batch, optionally with its mirror image, and their outputs summed.

One implementation for the localisation maps (:class:`wsss.localize.Localizer`) and the segmentation logits
(:func:`wsss.segment.predict_probs`). The flipped view rides in the same batch as the original, so each scale costs
one forward (and one backward) pass.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_to_multiple(images: Tensor, scale: float, multiple: int) -> Tensor:
    """``images`` scaled by ``scale``, each side rounded to a multiple of ``multiple`` (bilinear)."""
    if scale <= 0:
        raise ValueError(f"scales must be positive, got {scale}")
    h, w = images.shape[-2:]
    size = (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def sum_over_views(fn: Callable[[Tensor], Tensor], images: Tensor, scales: Sequence[float], flip: bool,
                   multiple: int, align_corners: bool = False) -> Tensor:
    """``sum over views of fn(view)``, each output ``(B', C, h, w)`` upsampled (bilinear) to the input's ``H x W``.

    ``fn`` receives a batch of ``B`` (or ``2B`` with ``flip``: the originals, then their mirror images) views of one
    scale, and returns one ``(C, h, w)`` output per view; the mirrored outputs are flipped back before summing.
    Divide by ``len(scales) * (1 + flip)`` for the mean.
    """
    if not scales:
        raise ValueError("give at least one scale")
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    total = None
    for scale in scales:
        view = resize_to_multiple(images, scale, multiple)
        out = fn(torch.cat([view, view.flip(-1)]) if flip else view)
        out = F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=align_corners)
        out = out[:b] + out[b:].flip(-1) if flip else out
        total = out if total is None else total + out
    return total
