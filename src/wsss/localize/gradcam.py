"""Grad-CAM on the tokens that enter the last transformer block.

As pytorch-grad-cam recommends for ViTs (``blocks[-1].norm1``), the activations are the tokens entering the last
block: with a class-token classifier the last block's own patch outputs do not reach the logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..models.vit import Capture
from .base import Footprint, Localizer, ScoreFn, batched_grads, class_logits


class GradCAM(Localizer):
    """Grad-CAM: channel weights are the spatial mean of the class-score gradient."""

    needs_grad = True

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_logits, block: int = -1):
        super().__init__(model, score_fn)
        self.block = block % model.depth
        if self.block == 0:
            raise ValueError("gradcam needs a block with a block before it (the tokens entering it)")

    def memory_footprint(self) -> Footprint:
        """No attention is kept (fast path); the blocks from the one before ``block`` keep a graph, and the tokens
        entering ``block`` get a gradient per class."""
        n = self.model.depth - (self.block - 1)
        return Footprint(self.model.num_heads, self.model.embed_dim, graph_blocks=n, token_grads=1)

    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        src = self.block - 1  # the block whose output enters self.block
        out = self.model(images, capture=Capture(hidden=True, grad_from_block=src))
        (grads,) = batched_grads(self.scores(out, classes), [out.hidden[src]])  # (K, B, T, D)
        acts = out.hidden[src][:, out.num_prefix :]
        weights = grads[:, :, out.num_prefix :].mean(dim=2)  # (K, B, D)
        cam = (weights.transpose(0, 1)[:, :, None, :] * acts[:, None]).sum(-1)  # (B, K, N)
        return cam.relu().unflatten(2, out.grid)
