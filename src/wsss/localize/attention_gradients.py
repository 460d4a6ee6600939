"""The shared machinery of the class-token-gradient maps (GETAM, ACR): one forward with attention, one batched
backward, and each class's query row of every read block's attention and gradient."""

from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.vit import Capture, ViTOutput
from .base import Footprint, Localizer, batched_grads, class_logits, class_token_logits, query_rows


def attention_rows(attn: Tensor, rows: Tensor) -> Tensor:
    """Each class's query row of one block's attention: ``attn (B,H,T,T)``, ``rows (B,K)`` -> ``(B,K,H,T)``."""
    b_idx = torch.arange(attn.shape[0], device=attn.device)[:, None]
    return attn[b_idx, :, rows]


def gradient_rows(scores: Tensor, attn: Sequence[Tensor], rows: Tensor) -> list[Tensor]:
    """``d scores[b, k] / d attn_l[b, :, rows[b, k]]`` for every read block l, each ``(B, K, H, T)``: the query
    rows of each class's attention gradients, kept as each class's backward pass ends (:func:`batched_grads`)."""
    b_idx = torch.arange(scores.shape[0], device=scores.device)
    grads = batched_grads(scores, attn, select=lambda j, gs: [g[b_idx, :, rows[:, j]] for g in gs])  # (K, B, H, T)
    return [g.transpose(0, 1) for g in grads]


def checked_layer(layer: int, depth: int) -> int:
    """A block index in ``-depth..depth-1`` as a non-negative index; anything else is a :class:`ConfigError`.

    An out-of-range start would read no block at all and give all-zero maps, so it is refused up front.
    """
    if isinstance(layer, bool) or not isinstance(layer, Integral):
        raise ConfigError(f"start_layer must be a block index, got {layer!r}")
    layer = int(layer)
    if not -depth <= layer < depth:
        raise ConfigError(f"start_layer {layer} is out of range for a {depth}-block model (use 0..{depth - 1}, "
                          f"or -{depth}..-1 from the last)")
    return layer % depth


class AttentionGradients(Localizer):
    """Base of the methods that weigh attention by d score / d attention over the blocks from ``start_layer``."""

    needs_grad = True
    start_layer: int

    # Whether the method also reads every block's patch-to-patch attention (ACR's affinity does).
    reads_all_attention: bool = False

    def memory_footprint(self) -> Footprint:
        """The blocks from ``start_layer`` keep their attention and graph and get a gradient per class; reading
        every block (ACR's affinity) keeps them all plus a head-mean stack of them. (Conservative: the classes'
        backward passes run one after the other, see :func:`gradient_rows`, so one class's gradients are alive at
        a time; the estimate counts them for every class of a pass.)"""
        depth = self.model.depth
        n = depth - checked_layer(self.start_layer, depth)
        every = self.reads_all_attention
        return Footprint(self.model.num_heads, self.model.embed_dim, kept_blocks=depth if every else n,
                         grad_blocks=n, graph_blocks=n, headless_maps=depth + 1 if every else 0)

    def class_token_rows(self, images: Tensor, classes: Tensor) -> tuple[ViTOutput, list[tuple[Tensor, Tensor]]]:
        """``(out, rows)``: each read block's ``(attention row, gradient row)`` of each class, ``(B, K, H, T)``."""
        # With a class-token head and the default target nothing reads the last block's patch outputs, so that
        # block computes only the class token; blocks below start_layer skip the attention capture.
        head = getattr(self.model, "head", None)
        prefix_only = (head is not None and not getattr(head, "reads_patches", True)
                       and self.score_fn in (class_logits, class_token_logits) and not self.reads_all_attention)
        capture = Capture(attn=True, grad_from_block=self.start_layer, prefix_only_last=prefix_only,
                          capture_from_block=0 if self.reads_all_attention else self.start_layer)
        out = self.model(images, capture=capture)
        attn = out.attn[self.start_layer :]
        query = query_rows(self.model, classes)
        grads = gradient_rows(self.scores(out, classes), attn, query)
        return out, [(attention_rows(a, query), g) for a, g in zip(attn, grads)]
