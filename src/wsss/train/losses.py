"""The classification term every method's objective shares."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..models.vit import ViTOutput


def classification_loss(out: ViTOutput, labels: Tensor, views: int = 1) -> tuple[Tensor, dict[str, float]]:
    """MultiLabelSoftMarginLoss of the logits, plus that of each second set a model has: the patch logits of the
    MCT head, the class-token logits of the Conformer's transformer branch (TransCAM sums both branches' losses).

    ``out`` holds ``views`` stacked views of the ``(B, C)`` multi-hot ``labels`` (ACR: a crop and its flip); the
    loss is the sum over the views of each view's mean, as the papers add their per-view terms. Logs ``cls`` (and
    ``cls_patch``, ``cls_token``).
    """
    b = labels.shape[0]
    if out.logits.shape[0] != views * b:
        raise ValueError(f"{out.logits.shape[0]} logit rows for {views} view(s) of {b} images")

    def term(logits: Tensor) -> Tensor:
        return sum(F.multilabel_soft_margin_loss(logits[v * b : (v + 1) * b], labels) for v in range(views))

    total = term(out.logits)
    logs = {"cls": float(total.detach())}
    for name, extra in (("cls_patch", out.patch_logits), ("cls_token", out.token_logits)):
        if extra is not None:
            loss = term(extra)
            logs[name] = float(loss.detach())
            total = total + loss
    return total, logs
