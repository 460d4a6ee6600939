"""The shared base of every map method: class handling, multi-scale/flip aggregation, normalisation.

A method implements :meth:`Localizer.token_maps`, which returns raw non-negative maps on the patch grid for one
view. The base class resizes each view to a multiple of the patch size, upsamples its maps to the input size,
un-flips the flipped views, sums the views (as the papers do, :func:`wsss.models.multiview.sum_over_views`) and
min-max normalises each map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..models.multiview import sum_over_views
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


def present_classes(labels: Tensor) -> Tensor:
    """Classifier-output indices of each image's classes ``(B, K)``, padded with -1 (K = most classes of an image)."""
    present = labels > 0
    width = max(int(present.sum(dim=1).max()), 1) if labels.numel() else 1
    # A stable sort puts the present outputs first, in ascending order.
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    picked = present.gather(1, order)
    return torch.where(picked, order, torch.full_like(order, -1))


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
                 flip: bool = False, normalize: bool = True, eval_mode: bool = True) -> Tensor:
        """Maps ``(B, K, H, W)`` at the input size for the given classes.

        Args:
            images: normalised images ``(B, 3, H, W)``.
            classes: ``(B, K)`` class indices (classifier outputs), or per-image lists (padded with empty maps).
            scales: resize factors of the views; each view is rounded to a multiple of the patch size.
            flip: add the horizontally flipped view of each scale.
            normalize: min-max normalise each map to [0, 1]; otherwise the raw non-negative sum over views.
            eval_mode: run the model in eval mode (False keeps its current mode: AReAM's training pass runs with
                drop-path active, as the authors' code does).
        """
        if self.model is None:
            raise RuntimeError("this localiser was released")
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        cls = as_class_tensor(classes, images.shape[0], images.device)

        def view_maps(x: Tensor) -> Tensor:
            with torch.set_grad_enabled(self.needs_grad):
                return self.token_maps(x, cls.repeat(x.shape[0] // cls.shape[0], 1)).detach()

        was_training = self.model.training
        if eval_mode:
            self.model.eval()
        try:
            total = sum_over_views(view_maps, images, scales, flip, self.patch_size, self.align_corners)
        finally:
            self.model.train(was_training)
        total = total.clamp_min(0) * (cls >= 0)[:, :, None, None]
        return normalize_maps(total) if normalize else total


def to_grid(row: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(..., N)`` token values to ``(..., h, w)``."""
    return row.reshape(*row.shape[:-1], *grid)


def query_rows(model: nn.Module, classes: Tensor) -> Tensor:
    """The token whose attention row localises each class: the class token (one per class for MCT heads)."""
    if getattr(model, "tokens_per_class", False):
        return classes.clamp(min=0)
    return torch.zeros_like(classes)


def head_mean_patch_affinity(attn: Sequence[Tensor], num_prefix: int) -> Tensor:
    """Sum over the given blocks of the head-mean patch-to-patch attention, ``(B, N, N)``."""
    return torch.stack([a.mean(dim=1)[:, num_prefix:, num_prefix:] for a in attn]).sum(dim=0)
