"""GETAM: gradient-weighted element-wise transformer attention maps (Sun et al., arXiv 2112.02841).

Per block l >= ``start_layer``: M_l = mean_h ReLU(G_l * A_l) * mean_h ReLU(G_l), with A_l the post-softmax
attention and G_l = d score / d A_l. The map is ReLU of the class-token row of sum_l M_l over the patch columns.
``grad_power=1`` drops the extra mean_h ReLU(G_l) factor (methods.md §6.3: the paper may not have it).
The classes come from one backward pass each on one forward graph, stopped at ``start_layer``
(:func:`~wsss.localize.attention_gradients.gradient_rows`).
"""

from __future__ import annotations

from torch import Tensor, nn

from ...localize.attention_gradients import AttentionGradients, checked_layer
from ...localize.base import ScoreFn, class_token_logits


class GETAM(AttentionGradients):
    """Gradient-weighted element-wise attention, summed over the blocks from ``start_layer`` (default depth/2)."""

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_token_logits, start_layer: int | None = None,
                 grad_power: int = 2):
        super().__init__(model, score_fn)
        if grad_power not in (1, 2):
            raise ValueError(f"grad_power must be 1 or 2, got {grad_power}")
        self.start_layer = model.depth // 2 if start_layer is None else checked_layer(start_layer, model.depth)
        self.grad_power = grad_power

    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        out, rows = self.class_token_rows(images, classes)
        total = 0.0
        for a_row, g_row in rows:  # (B, K, H, T) each
            m = (g_row * a_row).relu().mean(dim=2)
            if self.grad_power == 2:
                m = m * g_row.relu().mean(dim=2)
            total = total + m
        return total[:, :, out.num_prefix :].relu().unflatten(2, out.grid)

