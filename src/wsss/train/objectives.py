"""Training objectives. Each maps (model, batch, step) to a loss and scalars to log.

The classification baseline is here; the methods' objectives (ACR, AReAM, GETAM) register in
:data:`OBJECTIVES` the same way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..segment.objective import SegmentationObjective
from .acr import ACRObjective
from .aream import AReAMObjective
from .getam import GETAMObjective


def multilabel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """MultiLabelSoftMarginLoss, as every method's classification term."""
    return F.multilabel_soft_margin_loss(logits, labels)


class Classification:
    """Multi-label classification fine-tuning: MLSM on the logits (and on the patch logits of conv/mct heads)."""

    def __init__(self, cfg: dict, **_: Any):
        unknown = set(cfg) - {"name"}
        if unknown:
            raise ConfigError(f"method 'classification' takes no options, got {sorted(unknown)}")

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        out = model(batch["image"])
        loss = multilabel_loss(out.logits, batch["label"])
        logs = {"cls": float(loss.detach())}
        if out.patch_logits is not None:
            patch = multilabel_loss(out.patch_logits, batch["label"])
            logs["cls_patch"] = float(patch.detach())
            loss = loss + patch
        return loss, logs


OBJECTIVES: dict[str, Callable[..., Any]] = {
    "classification": Classification,
    "segmentation": SegmentationObjective,
    "getam": GETAMObjective,
    "acr": ACRObjective,
    "aream": AReAMObjective,
}


def build_objective(cfg: dict, **context: Any):
    """The objective named by ``cfg['name']``; ``context`` carries what some objectives need (class set, ...)."""
    name = cfg.get("name", "classification")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](cfg, **context)
