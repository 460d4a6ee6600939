"""Test-time views: every scale of an image batch (or every square size), optionally with its mirror image, and
their outputs summed.

One implementation for the localisation maps (:class:`wsss.localize.Localizer`) and the segmentation logits
(:func:`wsss.segment.predict_probs`). The flipped view rides in the same batch as the original, so each view costs
one forward (and one backward) pass.

Two geometries: ``scales`` resize each image by a factor, keeping its aspect ratio (wsss's default); ``square_sizes``
resize it to ``S x S``, distorting the aspect ratio, as GETAM's ``test.py`` and ACR's ``infer_cam.py`` do
(methods.md §6.8). Either way every output is upsampled back to the image's own size.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError


def _multiple_of(length: float, multiple: int) -> int:
    return max(multiple, round(length / multiple) * multiple)


def resize_to_multiple(images: Tensor, scale: float, multiple: int) -> Tensor:
    """``images`` scaled by ``scale``, each side rounded to a multiple of ``multiple`` (bilinear)."""
    if scale <= 0:
        raise ValueError(f"scales must be positive, got {scale}")
    h, w = images.shape[-2:]
    size = (_multiple_of(h * scale, multiple), _multiple_of(w * scale, multiple))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def resize_to_square(images: Tensor, size: int, multiple: int) -> Tensor:
    """``images`` resized to ``S x S`` (bilinear; the aspect ratio not kept), ``S`` = ``size`` rounded to a
    multiple of ``multiple``."""
    if size <= 0:
        raise ValueError(f"square sizes must be positive, got {size}")
    side = _multiple_of(size, multiple)
    if tuple(images.shape[-2:]) == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)


def check_views(scales: Sequence[float], square_sizes: Sequence[int] | None) -> None:
    """Square sizes replace the scales: with ``square_sizes`` the scales must be ``[1]``, and every size a positive
    integer; otherwise a :class:`~wsss.errors.ConfigError` naming both."""
    if not square_sizes:
        return
    bad = [s for s in square_sizes if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
    if bad:
        raise ConfigError(f"square sizes must be positive integers (pixels), got {bad}")
    if [float(s) for s in scales] != [1.0]:
        raise ConfigError(f"square sizes replace the scales: give one or the other (scales {list(scales)}, square "
                          f"sizes {list(square_sizes)})")


def views(images: Tensor, scales: Sequence[float], multiple: int,
          square_sizes: Sequence[int] | None = None) -> Iterator[Tensor]:
    """The resized copies of ``images`` the test-time views start from, made one at a time: one per scale, or,
    with ``square_sizes``, one per square size (see :func:`check_views`)."""
    check_views(scales, square_sizes)
    if square_sizes:
        return (resize_to_square(images, s, multiple) for s in square_sizes)
    if not scales:
        raise ValueError("give at least one scale")
    return (resize_to_multiple(images, s, multiple) for s in scales)


def sum_over_views(fn: Callable[[Tensor], Tensor], images: Tensor, scales: Sequence[float], flip: bool,
                   multiple: int, align_corners: bool = False, square_sizes: Sequence[int] | None = None) -> Tensor:
    """``sum over views of fn(view)``, each output ``(B', C, h, w)`` upsampled (bilinear) to the input's ``H x W``.

    The views are those of :func:`views` (every scale, or every square size), each with its mirror image when
    ``flip``. ``fn`` receives a batch of ``B`` (or ``2B`` with ``flip``: the originals, then their mirror images)
    views of one size, and returns one ``(C, h, w)`` output per view; the mirrored outputs are flipped back before
    summing. Divide by the number of sizes times ``1 + flip`` for the mean.
    """
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    total = None
    for view in views(images, scales, multiple, square_sizes):
        out = fn(torch.cat([view, view.flip(-1)]) if flip else view)
        out = F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=align_corners)
        out = out[:b] + out[b:].flip(-1) if flip else out
        total = out if total is None else total + out
    return total
