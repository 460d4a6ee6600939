"""GETAM: gradient-weighted element-wise transformer attention maps (Sun et al., arXiv 2112.02841).

Per block l >= ``start_layer``: M_l = mean_h ReLU(G_l * A_l) * mean_h ReLU(G_l), with A_l the post-softmax
attention and G_l = d score / d A_l. The map is ReLU of the class-token row of sum_l M_l over the patch columns.
``grad_power=1`` drops the extra mean_h ReLU(G_l) factor (methods.md §6.3: the paper may not have it).
All classes of the batch come from one batched backward pass that stops at ``start_layer``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Localizer, ScoreFn, batched_grads, class_logits
from .rollout import query_rows


def class_rows(attn: Tensor, grads: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Select each class's query row: ``attn (B,H,T,T)`` -> ``(B,K,H,T)``; ``grads (K,B,H,T,T)`` -> ``(B,K,H,T)``."""
    b_idx = torch.arange(attn.shape[0], device=attn.device)[:, None]
    k_idx = torch.arange(rows.shape[1], device=attn.device)[None, :]
    a = attn[b_idx, :, rows]
    g = grads.transpose(0, 1)[b_idx, k_idx, :, rows]
    return a, g


class AttentionGradients(Localizer):
    """Shared by the class-token-gradient methods: one forward with attention, one batched backward."""

    needs_grad = True
    start_layer: int

    # Whether the method also reads the last block's patch-to-patch attention (ACR's affinity does).
    reads_all_attention: bool = False

    def class_token_rows(self, images: Tensor, classes: Tensor):
        """``(out, rows)``: each read block's ``(attention row, gradient row)`` of each class, ``(B, K, H, T)``."""
        # With a class-token head and the default target nothing reads the last block's patch outputs, so that
        # block computes only the class token; blocks below start_layer skip the attention capture.
        prefix_only = (getattr(self.model, "head_type", None) == "token" and self.score_fn is class_logits
                       and not self.reads_all_attention)
        out = self.model(images, attn=True, grad_from_block=self.start_layer, prefix_only_last=prefix_only,
                         capture_from_block=0 if self.reads_all_attention else self.start_layer)
        attn = out.attn[self.start_layer :]
        grads = batched_grads(self.scores(out, classes), attn)
        query = query_rows(self.model, classes)
        return out, [class_rows(a, g, query) for a, g in zip(attn, grads)]


class GETAM(AttentionGradients):
    """Gradient-weighted element-wise attention, summed over the blocks from ``start_layer`` (default depth/2)."""

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_logits, start_layer: int | None = None,
                 grad_power: int = 2):
        super().__init__(model, score_fn)
        if grad_power not in (1, 2):
            raise ValueError(f"grad_power must be 1 or 2, got {grad_power}")
        self.start_layer = model.depth // 2 if start_layer is None else start_layer % model.depth
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
