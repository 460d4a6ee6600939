"""The dense-CRF regulariser GETAM trains its segmentation head with (rloss's ``DenseEnergyLoss``, methods.md §2).

For softmax probabilities S (B, K, H, W) inside the crop's ROI, with the bilateral kernel
W_ij = exp(-|p_i - p_j|² / (2 σ_xy²) - |I_i - I_j|² / (2 σ_rgb²)) over all pixel pairs (self included), the energy
of image b is -Σ_k S_k · (G ⊙ W S_k), with the gate G = max(0, ROI - max_k S) set to 1 on pixels labelled 255
(confident pixels contribute nothing; unlabelled ones always do), summed over the batch and divided by B. The
authors' backward is kept: d/dS = -2 G ⊙ W S / B inside the ROI (the gate is a constant; their custom function
does the same). GETAM evaluates it at half the crop size with σ_xy halved, weight 1e-7 (:class:`DenseCRFLoss`).

The kernel is exact and dense, computed in tiles of rows in plain PyTorch: no compiled permutohedral lattice, the
most reported install failure of this field. (The lattice approximates the same Gaussian with a constant factor
of its own, so losses are comparable in shape, not to the last digit, with the authors' extension.) The cost is
O(N²) per image for N pixels at the evaluated scale: 128 x 128 for GETAM's 256 crops, 2.7e8 kernel entries per image
(measured on the 2-core CPU: 22 s for a batch of 4 with 21 classes, forward and backward; a GPU has not been
measured). Used by GETAM's objective with `method.dcrf_weight` (1e-7 in `getam_voc`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255


def bilateral_filter(images: Tensor, values: Tensor, sigma_rgb: float, sigma_xy: float,
                     tile: int = 4096) -> Tensor:
    """``W @ values`` per image for the dense bilateral kernel: ``images (B, 3, H, W)`` in 0..255, ``values
    (B, K, H, W)`` -> ``(B, K, H, W)``; ``tile`` rows of W are formed at a time (memory ``tile x N``)."""
    b, k, h, w = values.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=values.device, dtype=values.dtype),
                            torch.arange(w, device=values.device, dtype=values.dtype), indexing="ij")
    position = torch.stack([ys, xs]).flatten(1).T / sigma_xy  # (N, 2)
    out = torch.empty_like(values.flatten(2))
    for i in range(b):
        features = torch.cat([position, images[i].flatten(1).T.to(values.dtype) / sigma_rgb], dim=1)  # (N, 5)
        v = values[i].flatten(1).T  # (N, K)
        for start in range(0, features.shape[0], tile):
            block = features[start : start + tile]
            # |a|² + |b|² - 2ab by a matrix product: fast, and within ~1e-5 of the exact kernel (float32).
            kernel = torch.exp(-0.5 * torch.cdist(block, features).square())  # (tile, N)
            out[i, :, start : start + tile] = (kernel @ v).T
    return out.view(b, k, h, w)


class _DenseEnergy(torch.autograd.Function):
    """The energy with the authors' backward (the gate held constant)."""

    @staticmethod
    def forward(ctx, images: Tensor, probs: Tensor, roi: Tensor, unlabelled: Tensor, sigma_rgb: float,
                sigma_xy: float) -> Tensor:
        gate = (roi - probs.amax(dim=1)).masked_fill(unlabelled, 1.0).clamp_min(0.0)[:, None]
        inside = probs * roi[:, None]
        weighted = bilateral_filter(images, inside, sigma_rgb, sigma_xy) * gate
        ctx.save_for_backward(weighted, roi)
        return -(inside * weighted).sum() / probs.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        weighted, roi = ctx.saved_tensors
        grad_probs = -2.0 * grad * weighted * roi[:, None] / weighted.shape[0]
        return None, grad_probs, None, None, None, None


def dense_crf_energy(images: Tensor, probs: Tensor, roi: Tensor, labels: Tensor | None = None,
                     sigma_rgb: float = 15.0, sigma_xy: float = 100.0) -> Tensor:
    """The gated dense-CRF energy of ``probs (B, K, H, W)`` (softmax) on ``images (B, 3, H, W)`` (0..255) inside
    ``roi (B, H, W)`` (1 inside the crop), at the given size; ``labels (B, H, W)``: 255 marks the pixels whose
    gate is 1."""
    if probs.ndim != 4 or images.shape[0] != probs.shape[0] or images.shape[-2:] != probs.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and probabilities {tuple(probs.shape)} do not match")
    if roi.shape != (probs.shape[0], *probs.shape[-2:]):
        raise ValueError(f"roi must be (B, H, W) = {(probs.shape[0], *probs.shape[-2:])}, got {tuple(roi.shape)}")
    unlabelled = torch.zeros_like(roi, dtype=torch.bool) if labels is None else labels == IGNORE_INDEX
    return _DenseEnergy.apply(images.float(), probs.float(), roi.float(), unlabelled, float(sigma_rgb),
                              float(sigma_xy))


class DenseCRFLoss(nn.Module):
    """GETAM's use of the energy: images, probabilities, ROI and labels resized by ``scale`` (images, ROI and
    labels by nearest neighbours, probabilities bilinearly), σ_xy multiplied by ``scale``, times ``weight``."""

    def __init__(self, weight: float = 1e-7, sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale: float = 0.5):
        super().__init__()
        if not 0 < scale <= 1:
            raise ValueError(f"scale must lie in (0, 1], got {scale}")
        self.weight, self.sigma_rgb, self.sigma_xy, self.scale = weight, sigma_rgb, sigma_xy, scale

    def forward(self, images: Tensor, probs: Tensor, roi: Tensor, labels: Tensor) -> Tensor:
        """``images (B, 3, H, W)`` 0..255, ``probs (B, K, H, W)``, ``roi (B, H, W)``, ``labels (B, H, W)``."""
        s = self.scale
        if s != 1:
            images = F.interpolate(images.float(), scale_factor=s, mode="nearest")
            probs = F.interpolate(probs, scale_factor=s, mode="bilinear", align_corners=False)
            roi = F.interpolate(roi[:, None].float(), scale_factor=s, mode="nearest")[:, 0]
            labels = F.interpolate(labels[:, None].float(), scale_factor=s, mode="nearest")[:, 0].long()
        return self.weight * dense_crf_energy(images, probs, roi, labels, self.sigma_rgb, self.sigma_xy * s)
