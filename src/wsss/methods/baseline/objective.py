"""The baseline objective: multi-label classification fine-tuning (MLSM on the logits, and on the patch logits of
heads that have them)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...models.vit import Capture
from ...train.losses import classification_loss
from ..registry import NoOptions


class Classification:
    """``method.name: baseline`` (formerly ``classification``); no options."""

    def __init__(self, options: NoOptions, **_: Any):
        self.options = options

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        return classification_loss(model(batch["image"], capture=Capture()), batch["label"])
