"""Pseudo labels from per-class maps with a background score: threshold, PSA's (1 - max)^alpha, AReAM's two thresholds.

Conventions shared by every function here:

* ``maps`` is a ``(K, H, W)`` float tensor with scores in [0, 1] for K foreground classes whose dataset
  label indices are ``classes`` (K,). Channels are put in ascending label order first, so ties between
  classes go to the lower label index whatever the file order.
* The background channel goes first; ``torch.argmax`` returns the first maximum, so background wins
  ties (a pixel is foreground exactly where a class beats the background score).
* The result is an ``(H, W)`` int64 tensor of dataset labels; background pixels get
  ``background_label`` (0 on datasets with a background class; pass 255 = ignore on one without) and
  255 marks ignored pixels.
* ``refine`` is an optional :data:`wsss.refine.Refiner` applied to the ``(1, K + 1, h, w)`` score stack
  before the argmax (e.g. PAR, PAMR, a dense CRF).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.io import IGNORE_INDEX
from ..refine.background import psa_background, with_background
from ..refine.refiner import Refiner


def sorted_by_label(maps: torch.Tensor, classes: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``maps`` and ``classes`` (as int64) reordered by ascending label; checks they fit together."""
    classes_t = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != classes_t.numel():
        raise ValueError(f"maps {tuple(maps.shape)} must be (K, H, W) with K = {classes_t.numel()} classes")
    if classes_t.unique().numel() != classes_t.numel():
        raise ValueError(f"classes must be distinct, got {classes_t.tolist()}")
    order = torch.argsort(classes_t)
    return maps[order.to(maps.device)], classes_t[order]


def channels_to_labels(index: torch.Tensor, classes: torch.Tensor, background_label: int = 0) -> torch.Tensor:
    """Map channel indices (0 = background, k = ``classes[k - 1]``, 255 kept) to dataset labels."""
    lookup = torch.cat([torch.tensor([background_label], dtype=torch.int64), classes.to(torch.int64)])
    lookup = lookup.to(index.device)
    ignored = index == IGNORE_INDEX
    labels = lookup[index.clamp(max=lookup.numel() - 1)]
    return labels.masked_fill(ignored, IGNORE_INDEX)


def background_argmax(
    maps: torch.Tensor,
    background: torch.Tensor | float,
    refine: Refiner | None = None,
    softmax: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """Channel index (0 = background, k = map k - 1) of ``argmax([background, maps])``, ``(H, W)`` int64.

    In AReAM's order (``cam_to_seg``): stack, resize by ``scale`` (bilinear, sizes ``int(H * scale)``),
    softmax over channels if asked, refine, resize back, argmax.
    """
    scores = with_background(maps.float(), background).unsqueeze(0)
    height, width = scores.shape[-2:]
    if scale != 1.0:
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    if softmax:
        scores = scores.softmax(dim=1)
    if refine is not None:
        scores = refine(scores)
    if scores.shape[-2:] != (height, width):
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
    return scores[0].argmax(dim=0)


def maps_to_labels_threshold(
    maps: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    bg_threshold: float,
    refine: Refiner | None = None,
    softmax: bool = False,
    scale: float = 1.0,
    background_label: int = 0,
) -> torch.Tensor:
    """Labels from a constant background score ``bg_threshold``: ``argmax([t, maps])``.

    With ``softmax=True, scale=0.5`` and a PAR refiner this is one run of AReAM's ``cam_to_seg``.
    """
    maps, classes_t = sorted_by_label(maps, classes)
    index = background_argmax(maps, float(bg_threshold), refine, softmax, scale)
    return channels_to_labels(index, classes_t, background_label)


def psa_labels(
    maps: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    alpha: float,
    refine: Refiner | None = None,
    softmax: bool = False,
    scale: float = 1.0,
    background_label: int = 0,
) -> torch.Tensor:
    """Labels from PSA's background ``(1 - max maps)^alpha`` (with a CRF refiner: PSA's ``crf_with_alpha``)."""
    maps, classes_t = sorted_by_label(maps, classes)
    index = background_argmax(maps, psa_background(maps.float(), alpha), refine, softmax, scale)
    return channels_to_labels(index, classes_t, background_label)


def two_threshold_labels(
    maps: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    high: float = 0.55,
    low: float = 0.35,
    refine: Refiner | None = None,
    softmax: bool = True,
    scale: float = 0.5,
    background_label: int = 0,
) -> torch.Tensor:
    """AReAM's labels with an ignore band (methods.md §4 step 2).

    Each threshold is one :func:`background_argmax` run (background ``high`` or ``low``, x``scale``
    resizing, softmax over background and the given classes, ``refine``, argmax). The label is the
    ``high`` run's; pixels the ``high`` run calls background but the ``low`` run foreground become 255;
    pixels both call background get ``background_label``.
    """
    if low > high:
        raise ValueError(f"the low threshold {low} exceeds the high one {high}")
    maps, classes_t = sorted_by_label(maps, classes)
    index_high = background_argmax(maps, float(high), refine, softmax, scale)
    index_low = background_argmax(maps, float(low), refine, softmax, scale)
    index = index_high.clone()
    index[(index_high == 0) & (index_low != 0)] = IGNORE_INDEX
    return channels_to_labels(index, classes_t, background_label)
