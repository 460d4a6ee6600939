"""ACR's class-wise localisation (Sun et al., arXiv 2308.04321) from class-token gradients.

g = ReLU(class-token row of sum_{l >= start_layer} mean_h ReLU(G_l)) with G_l = d score / d A_l (the gradient alone,
no product with A), then refined by R = sum over ALL blocks of the head-mean patch-to-patch attention: g' = R g.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...localize.attention_gradients import AttentionGradients, checked_layer
from ...localize.base import ScoreFn, class_token_logits, head_mean_patch_affinity


class ACR(AttentionGradients):
    """Class-token-gradient maps over the last blocks (default depth-2, i.e. 10 of 12) plus affinity refinement."""

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_token_logits, start_layer: int | None = None,
                 refine: bool = True):
        super().__init__(model, score_fn)
        self.reads_all_attention = refine
        self.start_layer = model.depth - 2 if start_layer is None else checked_layer(start_layer, model.depth)
        self.refine = refine

    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        out, rows = self.class_token_rows(images, classes)
        total = 0.0
        for _, g_row in rows:
            total = total + g_row.relu().mean(dim=2)
        g = total[:, :, out.num_prefix :].relu()  # (B, K, N)
        if self.refine:
            affinity = head_mean_patch_affinity(out.attn, out.num_prefix).detach()
            g = torch.einsum("bmn,bkn->bkm", affinity, g)
        return g.unflatten(2, out.grid)
