"""Attention rollout (Abnar & Zuidema): head-mean attention plus identity, row-normalised, multiplied through."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.vit import Capture
from .base import Footprint, Localizer, query_rows


class Rollout(Localizer):
    """Class-agnostic: every class of an image gets its class-token row (MCT heads: the class's own token)."""

    def memory_footprint(self) -> Footprint:
        """Every block's attention, plus the identity, the running product and one step, each (T, T)."""
        return Footprint(self.model.num_heads, self.model.embed_dim, kept_blocks=self.model.depth, headless_maps=3)

    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        out = self.model(images, capture=Capture(attn=True))
        t = out.attn[0].shape[-1]
        eye = torch.eye(t, device=images.device)
        rollout = eye.expand(images.shape[0], t, t)
        for a in out.attn:
            step = a.mean(dim=1) + eye
            step = step / step.sum(dim=-1, keepdim=True)
            rollout = step @ rollout
        rows = query_rows(self.model, classes)
        picked = rollout[torch.arange(rollout.shape[0])[:, None], rows]  # (B, K, T)
        return picked[:, :, out.num_prefix :].unflatten(2, out.grid)

