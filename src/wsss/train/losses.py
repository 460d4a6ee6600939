"""The classification term every method's objective shares."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..models.vit import ViTOutput


def classification_loss(out: ViTOutput, labels: Tensor, views: int = 1) -> tuple[Tensor, dict[str, float]]:
    """MultiLabelSoftMarginLoss of the logits, plus that of the patch logits of heads that have them (MCT).

    ``out`` holds ``views`` stacked views of the ``(B, C)`` multi-hot ``labels`` (ACR: a crop and its flip); the
    loss is the sum over the views of each view's mean, as the papers add their per-view terms. Logs ``cls`` (and
    ``cls_patch``).
    """
    b = labels.shape[0]
    if out.logits.shape[0] != views * b:
        raise ValueError(f"{out.logits.shape[0]} logit rows for {views} view(s) of {b} images")
    cls = sum(F.multilabel_soft_margin_loss(out.logits[v * b : (v + 1) * b], labels) for v in range(views))
    logs = {"cls": float(cls.detach())}
    if out.patch_logits is None:
        return cls, logs
    patch = sum(F.multilabel_soft_margin_loss(out.patch_logits[v * b : (v + 1) * b], labels) for v in range(views))
    logs["cls_patch"] = float(patch.detach())
    return cls + patch, logs
