"""CAM: the classifier weights applied to the patch tokens, or the conv CAM head's output."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.vit import Capture, ViTOutput
from .base import Footprint, Localizer


def class_activation(model, out: ViTOutput, classes: Tensor) -> Tensor:
    """Per-class activation of the patch tokens, ``(B, K, N)`` (not yet rectified)."""
    idx = classes.clamp(min=0)
    if out.cam is not None:  # conv / mct heads: the head's own map
        cam = out.cam.flatten(2)
        return cam.gather(1, idx[:, :, None].expand(-1, -1, cam.shape[2]))
    weight, _ = model.class_weights()
    return torch.einsum("bkd,bnd->bkn", weight[idx], out.patch_tokens)


class CAM(Localizer):
    """Class activation maps of the classifier (Zhou et al.), read off the transformer's patch tokens."""

    def memory_footprint(self) -> Footprint:
        """No attention is kept (the blocks take the fast path): only one block's transient attention counts."""
        return Footprint(self.model.num_heads, self.model.embed_dim)

    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        out = self.model(images, capture=Capture())
        return class_activation(self.model, out, classes).relu().unflatten(2, out.grid)
