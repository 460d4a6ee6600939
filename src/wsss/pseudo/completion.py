"""GETAM's activation-aware label completion (``compute_seg_label_3``, methods.md §2).

With normalised maps P (K, H, W) of the present classes and a binary saliency S:

1. ``y = argmax([(1 - max_k P_k)^bg_power, P])`` (channel 0 = background);
2. ``y = 255`` where y is background, then ``y = background`` wherever ``S = 0`` (saliency background
   overrides CAM foreground);
3. for each class c in ascending label order: ``tau_c`` is the value at sorted index
   ``floor(cut_threshold * n)`` of the n positive entries of ``P_c`` (skipped when that index is 0);
   pixels with ``P_c > tau_c`` that are still background become c (so the lower label wins), and their
   saliency is set to 255;
4. ``F = (y != background)`` (255 counts as foreground) is opened with an ``opening x opening`` square and
   ``y = background`` wherever the opened F is 0.

Without a saliency map the CAM's own foreground (the pixels step 1 does not call background) stands in
for it: step 2 then leaves y as step 1 made it, step 3 can only turn step-1 background pixels above a
class's 90th percentile into that class (rare, since ``(1 - max)^32`` is tiny wherever a map is high)
and step 4 removes foreground specks smaller than the square.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.io import IGNORE_INDEX
from ..refine.background import psa_background, with_background
from .labels import channels_to_labels, sorted_by_label
from .morphology import binary_opening


def percentile_threshold(values: torch.Tensor, cut_threshold: float) -> float | None:
    """GETAM's ``tau``: the sorted positive entries' value at index ``int(n * cut_threshold)``; None if 0."""
    positive = values[values > 0].flatten()
    position = int(positive.numel() * cut_threshold)
    if position <= 0 or position >= positive.numel():
        return None
    return float(torch.kthvalue(positive.cpu(), position + 1).values)


def label_completion_with_saliency(
    maps: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    saliency: torch.Tensor | None,
    cut_threshold: float = 0.9,
    bg_power: float = 32,
    opening: int = 10,
    opencv_anchor: bool = True,
    background_label: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``(H, W)`` int64 and the edited saliency (see the module docstring).

    The saliency returned is the binarised input (``S > 0`` as 0/1, or the CAM foreground when
    ``saliency`` is None) with the completed pixels set to 255, as GETAM feeds it to its saliency loss.
    ``opencv_anchor`` keeps OpenCV's one-pixel shift of an even-sized opening (see
    :func:`wsss.pseudo.morphology.binary_opening`); ``opening=0`` skips step 4.
    """
    maps, classes_t = sorted_by_label(maps, classes)
    maps = maps.float()
    scores = with_background(maps, psa_background(maps, bg_power))
    index = scores.argmax(dim=0)
    if saliency is None:
        salient = index != 0
    else:
        if saliency.shape != index.shape:
            raise ValueError(f"saliency {tuple(saliency.shape)} does not match the maps {tuple(index.shape)}")
        salient = saliency.to(index.device) > 0
    index = index.masked_fill(index == 0, IGNORE_INDEX).masked_fill(~salient, 0)
    edited = salient.to(torch.uint8)
    for channel in range(maps.shape[0]):
        tau = percentile_threshold(maps[channel], cut_threshold)
        if tau is None:
            continue
        claimed = (maps[channel] > tau) & (index == 0)
        index[claimed] = channel + 1
        edited[claimed] = IGNORE_INDEX
    if opening > 0:
        kept = binary_opening(index != 0, opening, opencv_anchor=opencv_anchor)
        index = index.masked_fill(~kept, 0)
    return channels_to_labels(index, classes_t, background_label), edited


def label_completion(
    maps: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    saliency: torch.Tensor | None = None,
    cut_threshold: float = 0.9,
    bg_power: float = 32,
    opening: int = 10,
    opencv_anchor: bool = True,
    background_label: int = 0,
) -> torch.Tensor:
    """GETAM's pseudo labels ``(H, W)`` int64 from normalised maps (see the module docstring)."""
    labels, _ = label_completion_with_saliency(
        maps, classes, saliency, cut_threshold, bg_power, opening, opencv_anchor, background_label
    )
    return labels
