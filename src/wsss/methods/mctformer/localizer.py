"""MCTformer-V2's fused map (Xu et al., CVPR 2022; ``generate_attention_maps_ms`` of xulianuwa/MCTformer).

cam_c = ReLU(3x3 conv CAM)_c x (class-to-patch attention of class token c, head-mean, summed over all blocks),
then refined by the patch-to-patch attention summed over all blocks: cam'_m = sum_n A_mn cam_n. The authors sum
over blocks where AReAM averages; the min-max normalisation of every map removes the difference. This is AReAM's
inference map on an MCT model, so AReAM is measured against exactly this map on a model trained without its loss.
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ...localize.base import ScoreFn, class_logits
from ..aream.localizer import AReAM


class MCTformerV2(AReAM):
    """The fused MCTformer-V2 map of a model with the ``mct`` head (one class token per class)."""

    @classmethod
    def applies_to(cls, model: nn.Module) -> bool:
        return bool(getattr(model, "tokens_per_class", False))

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_logits):
        if not self.applies_to(model):
            raise ConfigError("the mctformer map reads one class token per class: train or load the model with "
                              f"model.head=mct (this one has head {getattr(model, 'head_type', '?')!r})")
        super().__init__(model, score_fn, layers=None)
