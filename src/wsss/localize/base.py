"""The shared base of every map method: class handling, multi-scale/flip aggregation, normalisation.

A method implements :meth:`Localizer.token_maps`, which returns raw non-negative maps on the patch grid for one
view. The base class resizes each view to a multiple of the patch size, upsamples its maps to the input size,
un-flips the flipped views, sums the views (as the papers do) and min-max normalises each map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vit import ViTOutput

ScoreFn = Callable[[ViTOutput], Tensor]
"""A target: maps the model's output to per-class scores ``(B, C)`` whose columns the classes index."""


def class_logits(out: ViTOutput) -> Tensor:
    """The default target: the classifier logits."""
    return out.logits


def as_class_tensor(classes: Tensor | Sequence[Sequence[int]], batch: int, device: torch.device) -> Tensor:
    """Classes as a ``(B, K)`` LongTensor; ragged per-image lists are padded with -1 (an empty map)."""
    if isinstance(classes, Tensor):
        if classes.ndim == 1:
            classes = classes[:, None]
        if classes.ndim != 2 or classes.shape[0] != batch:
            raise ValueError(f"classes must be (B, K) with B = {batch}, got {tuple(classes.shape)}")
        return classes.long().to(device)
    lists = [list(c) for c in classes]
    if len(lists) != batch:
        raise ValueError(f"got class lists for {len(lists)} images, but the batch has {batch}")
    width = max((len(c) for c in lists), default=0)
    if width == 0:
        raise ValueError("no image has a class to localise (empty label sets)")
    out = torch.full((batch, width), -1, dtype=torch.long)
    for i, c in enumerate(lists):
        out[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
    return out.to(device)


def normalize_maps(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Min-max normalise each ``(H, W)`` map of a ``(B, K, H, W)`` tensor to [0, 1]."""
    flat = maps.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(maps)


def batched_grads(scores: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of each of the K columns of ``scores (B, K)`` w.r.t. ``inputs`` in ONE batched backward pass.

    Returns one tensor per input with a leading K axis: ``(K, *input.shape)``. Image ``b`` only depends on its own
    row, so row ``b`` of the k-th gradient is d scores[b, k] / d input[b]. No parameter gradients are computed and
    nothing below the earliest input is traversed.
    """
    k = scores.shape[1]
    if k == 1:  # a single product needs no batching machinery
        return [g[None] for g in torch.autograd.grad(scores, list(inputs), grad_outputs=torch.ones_like(scores))]
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grad_out = eye[:, None, :].expand(k, scores.shape[0], k)
    return list(torch.autograd.grad(scores, list(inputs), grad_outputs=grad_out, is_grads_batched=True))


class Localizer(ABC):
    """A localisation-map method bound to a model (use as a context manager, or call :meth:`release`).

    The model exposes its attention as tensors of the autograd graph, so no hooks are installed; ``release``
    drops the reference this object holds to the model, so that nothing outlives the
    ``with`` block.
    """

    needs_grad: bool = False
    align_corners: bool = True

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_logits):
        self.model = model
        self.score_fn = score_fn

    def __enter__(self) -> "Localizer":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Drop the reference to the model."""
        self.model = None

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    @abstractmethod
    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        """Raw non-negative maps ``(B, K, h, w)`` on the patch grid of one view; ``classes`` may hold -1."""

    def scores(self, out: ViTOutput, classes: Tensor) -> Tensor:
        """The target scores of the requested classes, ``(B, K)``; padded slots score 0."""
        logits = self.score_fn(out)
        picked = logits.gather(1, classes.clamp(min=0))
        return picked * (classes >= 0)

    def __call__(self, images: Tensor, classes: Tensor | Sequence[Sequence[int]], scales: Sequence[float] = (1.0,),
                 flip: bool = False, normalize: bool = True) -> Tensor:
        """Maps ``(B, K, H, W)`` at the input size for the given classes.

        Args:
            images: normalised images ``(B, 3, H, W)``.
            classes: ``(B, K)`` class indices (classifier outputs), or per-image lists (padded with empty maps).
            scales: resize factors of the views; each view is rounded to a multiple of the patch size.
            flip: add the horizontally flipped view of each scale.
            normalize: min-max normalise each map to [0, 1]; otherwise the raw non-negative sum over views.
        """
        if self.model is None:
            raise RuntimeError("this localiser was released")
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        b, _, h, w = images.shape
        cls = as_class_tensor(classes, b, images.device)
        total = torch.zeros(b, cls.shape[1], h, w, device=images.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for scale in scales:
                view = self._resize(images, scale)
                # The flipped view rides in the same batch: one forward (and one backward) per scale.
                x, c = (torch.cat([view, view.flip(-1)]), torch.cat([cls, cls])) if flip else (view, cls)
                with torch.set_grad_enabled(self.needs_grad):
                    maps = self.token_maps(x, c).detach()
                maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=self.align_corners)
                total += maps[:b] + maps[b:].flip(-1) if flip else maps
        finally:
            self.model.train(was_training)
        total = total.clamp_min(0) * (cls >= 0)[:, :, None, None]
        return normalize_maps(total) if normalize else total

    def _resize(self, images: Tensor, scale: float) -> Tensor:
        p = self.patch_size
        h, w = images.shape[-2:]
        size = (max(p, round(h * scale / p) * p), max(p, round(w * scale / p) * p))
        if size == (h, w):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def to_grid(row: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(..., N)`` token values to ``(..., h, w)``."""
    return row.reshape(*row.shape[:-1], *grid)


def head_mean_patch_affinity(attn: Sequence[Tensor], num_prefix: int) -> Tensor:
    """Sum over the given blocks of the head-mean patch-to-patch attention, ``(B, N, N)``."""
    return torch.stack([a.mean(dim=1)[:, num_prefix:, num_prefix:] for a in attn]).sum(dim=0)
