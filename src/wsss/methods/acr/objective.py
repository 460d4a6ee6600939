"""ACR's training objective: all-pairs consistency of attention between a crop and its flip (methods.md §3).

With v2 = hflip(v1) and Ā the head-mean post-softmax attention of the chosen blocks (default: all),

    L = MLSM(y1) + MLSM(y2) + alpha * mean|Ā1[prefix, patch] - F(Ā2[prefix, patch])|
                            + alpha * mean|Ā1[patch, patch]  - F(Ā2[patch, patch])|

where F undoes the flip in token space: patch (r, q) of an h x w grid is patch (r, w - 1 - q) of the flipped view.
It acts on the key axis of the class-token rows and on both axes of the patch block. Each term is a plain mean
over its entries; there is no stop-gradient, so both views are pulled towards each other.

The "class-token rows" are all prefix tokens' rows: with one class token (ViT, the paper's setting) that is exactly
Ā[:, :, 0, 1:]; a distilled DeiT adds the distillation token's row, an MCT head its per-class token rows.
The two views go through the network as one batch of 2B; a ViT has no batch statistics, so this equals two
separate forward passes (the authors' code) and costs one call, which also keeps DDP to one forward per step.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ...errors import ConfigError
from ...models.vit import Capture
from ...train.losses import classification_loss
from ..registry import MethodOptions


class ACROptions(MethodOptions):
    """``method.name: acr``."""

    alpha: float = Field(125.0, ge=0.0)  # 125 in the VOC script; 100 for COCO
    layers: list[int] | None = Field(None, min_length=1)  # blocks whose attention is compared (null: all, the paper)


def unflip_index(grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """``(N,)`` token permutation undoing a horizontal flip of an ``h x w`` patch grid (row-major tokens).

    ``tokens_flipped[..., unflip_index(grid)]`` puts each flipped-view token back at its original position; the
    permutation is its own inverse.
    """
    h, w = grid
    return torch.arange(h * w, device=device).view(h, w).flip(1).reshape(-1)


def unflip_attention(attn: Tensor, grid: tuple[int, int], num_prefix: int) -> Tensor:
    """Attention ``(..., T, T)`` of a flipped view with its patch tokens put back in the original order on both the
    query and the key axis; the ``num_prefix`` prefix tokens (class/distillation tokens) stay where they are."""
    patches = unflip_index(grid, attn.device) + num_prefix
    order = torch.cat([torch.arange(num_prefix, device=attn.device), patches])
    return attn.index_select(-2, order).index_select(-1, order)


def consistency_terms(attn1: Tensor, attn2: Tensor, grid: tuple[int, int], num_prefix: int) -> tuple[Tensor, Tensor]:
    """ACR's two consistency terms between ``attn1`` (view 1) and ``attn2`` (its flip), both ``(..., T, T)``.

    Returns ``(class-token term, all-pairs term)``: the mean absolute difference of the prefix-to-patch rows and of
    the patch-to-patch block after un-flipping view 2.
    """
    aligned = unflip_attention(attn2, grid, num_prefix)
    p = num_prefix
    cls_term = (attn1[..., :p, p:] - aligned[..., :p, p:]).abs().mean()
    pair_term = (attn1[..., p:, p:] - aligned[..., p:, p:]).abs().mean()
    return cls_term, pair_term


class ACRObjective:
    """``method.name: acr`` with :class:`ACROptions`."""

    def __init__(self, options: ACROptions, **_: Any):
        self.options = options
        self.alpha = options.alpha
        self.layers = options.layers

    def _chosen(self, attn: list[Tensor]) -> list[Tensor]:
        if self.layers is None:
            return attn
        depth = len(attn)
        bad = [i for i in self.layers if not -depth <= i < depth]
        if bad:
            raise ConfigError(f"method.layers {bad} out of range for a {depth}-block model")
        return [attn[i] for i in self.layers]

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        x, labels = batch["image"], batch["label"]
        b = x.shape[0]
        out = model(torch.cat([x, x.flip(-1)]), capture=Capture(attn=True))
        loss, logs = classification_loss(out, labels, views=2)
        mean_attn = torch.stack([a.float().mean(dim=1) for a in self._chosen(out.attn)], dim=1)  # (2B, L, T, T)
        cls_term, pair_term = consistency_terms(mean_attn[:b], mean_attn[b:], out.grid, out.num_prefix)
        loss = loss + self.alpha * (cls_term + pair_term)
        logs["acr_cls"] = float(cls_term.detach())
        logs["acr_pairs"] = float(pair_term.detach())
        return loss, logs
