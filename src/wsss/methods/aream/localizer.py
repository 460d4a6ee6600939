"""AReAM's inference map (He et al., arXiv 2305.03112): the CAM refined by patch-to-patch attention affinity.

cam'_m = sum_n A_mn cam_n with A the mean over the chosen blocks of the head-mean post-softmax patch-to-patch
attention (all blocks at inference, the shallow blocks l < k during training), optionally weighted per block. With an
MCT head the CAM is first multiplied by the class-to-patch attention averaged over all blocks, as MCTformer does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ...localize.base import Localizer, ScoreFn, class_logits
from ...localize.cam import class_activation
from ...models.vit import Capture


def shallow_affinity(attn: Sequence[Tensor], num_prefix: int, layers: int | None = None,
                     weights: Sequence[float] | Tensor | None = None) -> Tensor:
    """(1/k) sum_{l<k} w_l mean_h A_l[patch, patch], ``(B, N, N)``; ``layers=None`` uses every block."""
    chosen = attn if layers is None else attn[:layers]
    if not chosen:
        raise ValueError("no attention blocks chosen for the affinity")
    w = torch.ones(len(chosen)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)[: len(chosen)]
    if w.numel() != len(chosen):
        raise ValueError(f"{w.numel()} layer weights for {len(chosen)} blocks")
    stacked = torch.stack([a.mean(dim=1)[:, num_prefix:, num_prefix:] for a in chosen])
    return (stacked * w.to(stacked)[:, None, None, None]).sum(0) / len(chosen)


class AReAM(Localizer):
    """CAM x (MCT: class attention) refined by the mean attention affinity of ``layers`` blocks (None = all)."""

    align_corners = False

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_logits, layers: int | None = None,
                 layer_weights: Sequence[float] | Tensor | None = None):
        super().__init__(model, score_fn)
        self.layers = layers
        self.layer_weights = layer_weights

    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        out = self.model(images, capture=Capture(attn=True))
        cam = class_activation(self.model, out, classes).relu()  # (B, K, N)
        p = out.num_prefix
        if getattr(self.model, "tokens_per_class", False):
            cls_attn = torch.stack([a.mean(dim=1)[:, :p, p:] for a in out.attn]).mean(0)  # (B, C, N)
            idx = classes.clamp(min=0)[:, :, None].expand(-1, -1, cls_attn.shape[2])
            cam = cam * cls_attn.gather(1, idx)
        affinity = shallow_affinity(out.attn, p, self.layers, self.layer_weights)
        return torch.einsum("bmn,bkn->bkm", affinity, cam).unflatten(2, out.grid)
