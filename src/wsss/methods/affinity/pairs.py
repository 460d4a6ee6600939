"""AffinityNet's training targets: pair labels within a radius, from a label map with an ignore value.

PSA (``ExtractAffinityLabelInRadius``) labels every pair of :func:`wsss.models.affinitynet.pair_indices`: a pair is
*valid* where neither end is ignored (255); it is a background-positive pair where both ends are background (0), a
foreground-positive pair where both ends have the same foreground class, and a negative pair where the two valid
ends differ. Its loss (``train_aff.py``) averages ``-log a`` over each positive kind and ``-log(1 - a)`` over the
negatives, and weights them 1/4, 1/4, 1/2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ...data.io import IGNORE_INDEX
from ...models.affinitynet import PSA_RADIUS, pair_indices

LOG_EPS = 1e-5  # PSA's: log(a + 1e-5), log(1 + 1e-5 - a), counts + 1e-5


class PairLabels(NamedTuple):
    """Boolean ``(B, P, M)`` masks over the pairs of :func:`~wsss.models.affinitynet.pair_indices`."""

    background: Tensor  # both ends background
    foreground: Tensor  # both ends the same foreground class
    negative: Tensor  # two valid ends with different labels


def pair_labels(labels: Tensor, radius: int = PSA_RADIUS, background_label: int = 0) -> PairLabels:
    """The pair labels of ``(B, h, w)`` integer label maps (255 = ignore) on the feature grid;
    ``background_label=-1`` on a dataset without a background class (every valid equal pair is foreground)."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, h, w), got {tuple(labels.shape)}")
    source, targets = pair_indices(radius, labels.shape[-2:], labels.device)
    flat = labels.flatten(1).long()
    start = flat[:, source].unsqueeze(1)  # (B, 1, M)
    end = flat[:, targets.reshape(-1)].view(flat.shape[0], *targets.shape)  # (B, P, M)
    valid = (start != IGNORE_INDEX) & (end != IGNORE_INDEX)
    same = (start == end) & valid
    is_background = start == background_label
    return PairLabels(background=same & is_background, foreground=same & ~is_background, negative=valid & ~same)


def affinity_loss(affinity: Tensor, targets: PairLabels) -> tuple[Tensor, dict[str, float]]:
    """PSA's loss ``bg/4 + fg/4 + neg/2`` of pair affinities ``(B, P, M)`` in (0, 1], each term averaged over its
    pairs in the whole batch; also the three terms and pair counts for the log."""
    positive_log = torch.log(affinity + LOG_EPS)
    negative_log = torch.log(1.0 + LOG_EPS - affinity)
    terms = {}
    for name, mask, logs in (("bg", targets.background, positive_log), ("fg", targets.foreground, positive_log),
                             ("neg", targets.negative, negative_log)):
        weight = mask.to(affinity.dtype)
        terms[name] = -(weight * logs).sum() / (weight.sum() + LOG_EPS)
    loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    logs = {f"aff_{k}": float(v.detach()) for k, v in terms.items()}
    total = max(1, targets.background.numel())
    logs["pairs_labelled"] = float((targets.background | targets.foreground | targets.negative).sum()) / total
    return loss, logs
