"""Segmentation losses on pseudo labels (255 = ignore).

Every loss averages over the pixels it counts and returns an exact 0 *with a graph* when there are none, so a
crop that is entirely ignored gives a zero gradient instead of the NaN that ``F.cross_entropy(..., mean)`` gives.
Logits at another size than the labels are first upsampled bilinearly to the labels (as GETAM does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.io import IGNORE_INDEX
from ..errors import ConfigError

SALIENCY_TARGETS = ("intended", "authors")


def match_size(logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """``logits`` ``(B, C, h, w)`` upsampled bilinearly to ``size`` if they are not already that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (still attached to the graph) when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def pixel_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-pixel cross-entropy ``(B, H, W)``, 0 at ignored pixels."""
    logits = match_size(logits, target.shape[-2:])
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy averaged over the labelled pixels of the whole batch (0 if none)."""
    return _masked_mean(pixel_cross_entropy(logits, target, ignore_index), target != ignore_index)


def split_cross_entropy_terms(logits: Tensor, target: Tensor, background_label: int | None = 0,
                              ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """GETAM's split cross-entropy: ``(bg, fg)``, each averaged over its own pixels of the batch (0 if none).

    ``bg`` covers the pixels labelled ``background_label``, ``fg`` every other labelled pixel. With
    ``background_label=None`` (a dataset without a background class) ``bg`` is 0 and ``fg`` is the plain mean.
    """
    ce = pixel_cross_entropy(logits, target, ignore_index)
    labelled = target != ignore_index
    if background_label is None:
        return ce.sum() * 0.0, _masked_mean(ce, labelled)
    background = target == background_label
    return _masked_mean(ce, background), _masked_mean(ce, labelled & ~background)


def split_cross_entropy(logits: Tensor, target: Tensor, background_label: int | None = 0,
                        ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``bg + fg`` of :func:`split_cross_entropy_terms`."""
    bg, fg = split_cross_entropy_terms(logits, target, background_label, ignore_index)
    return bg + fg


def saliency_target(saliency: Tensor, edited: Tensor, mode: str = "intended") -> Tensor:
    """The background-probability target of GETAM's saliency loss, float ``(B, H, W)``.

    ``intended``: ``1 - (saliency > 0)``, background where the saliency map says so. ``authors``: the released
    code's ``1 - int(s / 255)`` on the *edited* saliency (values 0, 1 and 255 at label-completed pixels), which
    is 1 everywhere except at the completed pixels (methods.md §2: almost certainly unintended).
    """
    if mode == "intended":
        return 1.0 - (saliency > 0).float()
    if mode == "authors":
        return 1.0 - torch.div(edited.long(), 255, rounding_mode="floor").float()
    raise ConfigError(f"saliency_target must be one of {SALIENCY_TARGETS}, got {mode!r}")


def saliency_bce(logits: Tensor, target: Tensor, background_channel: int = 0) -> Tensor:
    """BCE between the softmax background probability and ``target`` ``(B, H, W)`` in [0, 1], over all pixels."""
    probs = match_size(logits, target.shape[-2:]).float().softmax(dim=1)[:, background_channel]
    return F.binary_cross_entropy(probs, target.float())
