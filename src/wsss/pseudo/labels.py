"""Pseudo labels from per-class maps with a background score: threshold, PSA's (1 - max)^alpha, AReAM's two thresholds.

These are the only maps-to-labels rules of the toolkit: ``wsss cam``, ``wsss pseudo``, ``wsss eval --threshold``,
validation and the training objectives all call them. Conventions shared by every function here:

* ``maps`` is a ``(K, H, W)`` float tensor with scores in [0, 1] for K foreground classes whose dataset
  label indices are ``classes`` (K,). Channels are put in ascending label order first, so ties between
  classes go to the lower label index whatever the file order. :func:`two_threshold_labels` takes a batch.
* The background channel goes first; ``torch.argmax`` returns the first maximum, so background wins
  ties (a pixel is foreground exactly where a class beats the background score). The background score is cast
  to the maps' float dtype before comparing, as the authors' scripts pad the maps with a constant channel of
  their own dtype: a float32 map value of 0.55 ties with ``t = 0.55`` and stays background.
* The result is an ``(H, W)`` int64 tensor of dataset labels; background pixels get
  ``background_label`` (0 on datasets with a background class; pass 255 = ignore on one without) and
  255 marks ignored pixels.
* ``refine`` is an optional :data:`wsss.refine.Refiner` applied to the ``(B, K + 1, h, w)`` score stack
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


def _scores_dtype(maps: torch.Tensor) -> torch.Tensor:
    """The maps in their own float dtype (integer maps as float64), the dtype the background is compared in."""
    return maps if maps.is_floating_point() else maps.double()


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
    scores = with_background(_scores_dtype(maps), background).unsqueeze(0)
    return _refined_argmax(scores, refine, softmax, scale)[0]


def _refined_argmax(scores: torch.Tensor, refine: Refiner | None, softmax: bool, scale: float,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, W)`` argmax of ``(B, C, H, W)`` scores after resize / softmax / refine / resize back; channels
    where ``keep`` (``(B, C)``) is False never win."""
    height, width = scores.shape[-2:]
    if scale != 1.0:
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    dropped = None if keep is None else ~keep[:, :, None, None]
    if softmax:
        scores = (scores if dropped is None else scores.masked_fill(dropped, float("-inf"))).softmax(dim=1)
    elif dropped is not None:
        scores = scores.masked_fill(dropped, 0.0)
    if refine is not None:
        scores = refine(scores)
    if scores.shape[-2:] != (height, width):
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
    if dropped is not None:
        scores = scores.masked_fill(dropped, float("-inf"))
    return scores.argmax(dim=1)


def maps_to_labels(
    maps: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    threshold: float | None,
    refine: Refiner | None = None,
    softmax: bool = False,
    scale: float = 1.0,
    background_label: int = 0,
) -> torch.Tensor:
    """Labels from a constant background score ``threshold``: ``argmax([t, maps])``; ``threshold=None``: the
    argmax over the maps alone (datasets without a background class, e.g. CamVid).

    With ``softmax=True, scale=0.5`` and a PAR refiner this is one run of AReAM's ``cam_to_seg``.
    """
    maps, classes_t = sorted_by_label(maps, classes)
    if threshold is None:
        if classes_t.numel() == 0:
            raise ValueError("without a background threshold at least one map is needed to label the pixels")
        index = _refined_argmax(_scores_dtype(maps).unsqueeze(0), refine, softmax, scale)[0]
        return classes_t.to(index.device)[index]
    if background_label == 0 and bool((classes_t == 0).any()):
        raise ValueError("maps must not include the background class 0 (it is the threshold channel)")
    index = background_argmax(maps, float(threshold), refine, softmax, scale)
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
    index = background_argmax(maps, psa_background(_scores_dtype(maps), alpha), refine, softmax, scale)
    return channels_to_labels(index, classes_t, background_label)


def two_threshold_labels(
    maps: torch.Tensor,
    classes: torch.Tensor,
    high: float = 0.55,
    low: float = 0.35,
    refine: Refiner | None = None,
    softmax: bool = True,
    scale: float = 0.5,
    background_label: int = 0,
) -> torch.Tensor:
    """AReAM's labels with an ignore band (methods.md §4 step 2), for a batch: ``(B, H, W)`` int64.

    ``maps`` is ``(B, K, H, W)`` and ``classes`` ``(B, K)`` the dataset label of each map, -1 for an unused slot
    (images of a batch have different class counts). Per threshold t: stack a constant background t before the
    image's class maps (ascending labels), resize by ``scale``, softmax over the background and the used slots,
    ``refine`` (one call per threshold, on the whole batch), resize back, argmax. The label is the ``high`` run's;
    pixels the ``high`` run calls background but the ``low`` run foreground become 255; pixels both call
    background get ``background_label``. Used by AReAM's training step and by ``wsss pseudo``.
    """
    if low > high:
        raise ValueError(f"the low threshold {low} exceeds the high one {high}")
    if maps.ndim != 4 or classes.shape != maps.shape[:2]:
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, K, H, W) with classes (B, K), got "
                         f"{tuple(classes.shape)}")
    classes = classes.to(device=maps.device, dtype=torch.int64)
    used = classes >= 0
    # Used slots first in ascending label order (unused ones, keyed past every label, last), so ties go to the
    # lower label as in the per-image rules.
    order = torch.sort(torch.where(used, classes, torch.iinfo(torch.int64).max), dim=1, stable=True).indices
    packed = maps.gather(1, order[:, :, None, None].expand_as(maps))
    labels = classes.gather(1, order)
    keep = torch.cat([torch.ones_like(used[:, :1]), used.gather(1, order)], dim=1)
    runs = []
    for t in (high, low):
        scores = torch.cat([packed.new_full((maps.shape[0], 1, *maps.shape[2:]), t), packed], dim=1)
        runs.append(_refined_argmax(_scores_dtype(scores), refine, softmax, scale, keep))
    index_high, index_low = runs
    lookup = torch.cat([torch.full_like(labels[:, :1], background_label), labels.clamp(min=0)], dim=1)
    seg = lookup.gather(1, index_high.flatten(1)).view_as(index_high)
    seg[(index_high == 0) & (index_low != 0)] = IGNORE_INDEX
    return seg


def psa_confident_labels(
    maps: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    low_alpha: float = 1.0,
    high_alpha: float = 12.0,
    refine: Refiner | None = None,
    background_label: int = 0,
) -> torch.Tensor:
    """PSA's confident labels for AffinityNet (``VOC12AffDataset``): two :func:`psa_labels` runs, 255 between.

    ``(1 - max)^alpha`` is a large background score for a small alpha, so the ``low_alpha`` run (1 in
    AReAM/MCTformer, 4 in PSA) only keeps strong foreground and the ``high_alpha`` run (12; 32 in PSA) only strong
    background. As the authors: the label is the low run's class where it finds foreground, background where the
    high run finds background, and 255 (no pair label) elsewhere. With a CRF refiner (PSA's ``crf_inference``) each
    run is PSA's ``crf_with_alpha``.
    """
    if low_alpha > high_alpha:
        raise ValueError(f"low_alpha {low_alpha} exceeds high_alpha {high_alpha}")
    maps, classes_t = sorted_by_label(maps, classes)
    scores = _scores_dtype(maps)
    low = background_argmax(maps, psa_background(scores, low_alpha), refine)
    high = background_argmax(maps, psa_background(scores, high_alpha), refine)
    index = low.masked_fill(low == 0, IGNORE_INDEX).masked_fill(high == 0, 0)
    return channels_to_labels(index, classes_t, background_label)
