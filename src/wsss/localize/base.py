"""The shared base of every map method: class handling, multi-scale/flip aggregation, normalisation.

A method implements :meth:`Localizer.token_maps`, which returns raw non-negative maps on the patch grid for one
view. The base class resizes each view to a multiple of the patch size (by a scale, keeping the aspect ratio, or to
a square), upsamples its maps to the input size,
un-flips the flipped views, sums the views (as the papers do, :func:`wsss.models.multiview.sum_over_views`) and
min-max normalises each map.

Memory is bounded: attention holds ``heads x T x T`` floats per block for T tokens, so a large image would ask for
gigabytes. Before each view runs, :func:`plan_view` estimates its peak from the method's :class:`Footprint`
(:func:`estimate_bytes`) and, over the budget (:func:`default_memory_budget`: a quarter of the RAM, or 90% of a CUDA
device's free memory), runs the images and classes in chunks, or else at a reduced size (a warning names both
sizes) whose maps are upsampled back like any view's.
"""

from __future__ import annotations

import logging
import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.multiview import sum_over_views
from ..models.vit import ViTOutput

log = logging.getLogger(__name__)

ScoreFn = Callable[[ViTOutput], Tensor]
"""A target: maps the model's output to per-class scores ``(B, C)`` whose columns the classes index."""


def class_logits(out: ViTOutput) -> Tensor:
    """The default target: the classifier logits."""
    return out.logits


def class_token_logits(out: ViTOutput) -> Tensor:
    """The default target of the class-token-gradient maps (GETAM, ACR): the class token's own logits.

    They equal :func:`class_logits` except in a two-branch model (the Conformer), whose ``logits`` come from the
    CNN head, which the class token reaches only indirectly.
    """
    return out.logits if out.token_logits is None else out.token_logits


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


def batched_grads(scores: Tensor, inputs: Sequence[Tensor],
                  select: Callable[[int, Sequence[Tensor]], Sequence[Tensor]] | None = None) -> list[Tensor]:
    """Gradients of each of the K columns of ``scores (B, K)`` w.r.t. ``inputs``, stacked: ``(K, *input.shape)``.

    One input-only backward pass per column on the kept graph: no parameter gradients, nothing below the earliest
    input traversed. Image ``b`` only depends on its own row, so row ``b`` of the k-th gradient is
    d scores[b, k] / d input[b]. ``select(k, grads)`` keeps a part of each class's gradients (GETAM keeps the
    query rows) before they are stacked, so K full gradients are never alive at once. (``is_grads_batched`` would
    run LayerNorm, GELU and softmax backward through PyTorch's legacy vmap fallback, a per-class loop plus copies:
    1.4x slower at 448 px with K = 10 on the CPU.)
    """
    k = scores.shape[1]
    per_input: list[list[Tensor]] = [[] for _ in inputs]
    for j in range(k):
        grads = torch.autograd.grad(scores[:, j].sum(), list(inputs), retain_graph=j < k - 1)
        for i, g in enumerate(grads if select is None else select(j, grads)):
            per_input[i].append(g)
    return [torch.stack(g) for g in per_input]


# ------------------------------------------------------------------------------------------- memory budget

# (heads, T, T) maps alive while one block computes its attention (the logits q k^T and their softmax), and, in a
# backward pass, the gradients of both.
TRANSIENT_MAPS = 2
# Floats per token and channel one block's activations hold (norms, q/k/v, MLP hidden, residuals) while it runs,
# and for each block whose graph autograd keeps for the backward pass.
ACTIVATIONS_PER_BLOCK = 16
# A reduced view keeps at least this many patches along its shorter side (fewer make flat, meaningless maps).
MIN_GRID_SIDE = 4
CPU_BUDGET_FRACTION = 0.25
CUDA_BUDGET_FRACTION = 0.9
BUDGET_ENV = "WSSS_MEMORY_BUDGET"


@dataclass(frozen=True)
class Footprint:
    """What one pass of a method holds at its peak, per image of a view (see :func:`estimate_bytes`).

    Args:
        heads, embed_dim: the model's attention heads and token width.
        kept_blocks: blocks whose ``(heads, T, T)`` attention stays alive until the maps are formed.
        grad_blocks: blocks whose attention gradient is formed, per class (0: no attention gradient).
        graph_blocks: blocks whose activations autograd keeps for the backward pass.
        headless_maps: further ``(T, T)`` maps without a head axis (rollout's product, head-mean affinities).
        token_grads: per-class gradients of ``(T, D)`` token tensors (Grad-CAM's activations).
    """

    heads: int
    embed_dim: int
    kept_blocks: int = 0
    grad_blocks: int = 0
    graph_blocks: int = 0
    headless_maps: int = 0
    token_grads: int = 0


def estimate_bytes(tokens: int, footprint: Footprint, batch: int = 1, classes: int = 1, itemsize: int = 4) -> int:
    """Estimated peak bytes of one pass over ``batch`` views of ``tokens`` tokens (prefix included) for ``classes``.

    ``itemsize x batch x (per image + classes x per class)``, with T = ``tokens``, D = ``embed_dim``::

        per image = heads (kept_blocks + TRANSIENT_MAPS) T^2 + headless_maps T^2
                    + ACTIVATIONS_PER_BLOCK (graph_blocks + 1) T D
        per class = heads (grad_blocks + TRANSIENT_MAPS) T^2   (only with grad_blocks > 0)
                    + token_grads T D
    """
    f = footprint
    t2 = tokens * tokens
    per_image = ((f.heads * (f.kept_blocks + TRANSIENT_MAPS) + f.headless_maps) * t2
                 + ACTIVATIONS_PER_BLOCK * (f.graph_blocks + 1) * tokens * f.embed_dim)
    per_class = ((f.heads * (f.grad_blocks + TRANSIENT_MAPS) * t2 if f.grad_blocks else 0)
                 + f.token_grads * tokens * f.embed_dim)
    return itemsize * batch * (per_image + classes * per_class)


@dataclass(frozen=True)
class ViewPlan:
    """How one view runs within the budget (see :func:`plan_view`).

    ``size``: the ``(H, W)`` it runs at (the view's own, or a reduced one); ``batch_chunk`` images and
    ``class_chunk`` classes per pass; ``estimate``: bytes of one pass; ``native_estimate``: bytes of one image and
    one class at the view's own size; ``fits``: within the budget (False only when even the smallest size is not).
    """

    size: tuple[int, int]
    batch_chunk: int
    class_chunk: int
    estimate: int
    native_estimate: int
    fits: bool


def plan_view(size: tuple[int, int], patch: int, num_prefix: int, footprint: Footprint, batch: int, classes: int,
              budget: int, itemsize: int = 4) -> ViewPlan:
    """The size and chunking of a view ``size`` (a multiple of ``patch``) whose pass fits in ``budget`` bytes.

    In order of preference: everything at once; fewer images per pass (all classes); one image and fewer classes
    per pass; one image and one class at the largest size of the view's aspect ratio that fits, at least
    :data:`MIN_GRID_SIDE` patches on the shorter side (or the view's own grid, when smaller). Chunks give the
    same maps; only the last choice changes them.
    """
    gh, gw = max(1, size[0] // patch), max(1, size[1] // patch)

    def cost(grid: tuple[int, int], b: int, k: int) -> int:
        return estimate_bytes(grid[0] * grid[1] + num_prefix, footprint, b, k, itemsize)

    def plan(grid: tuple[int, int], b: int, k: int, fits: bool = True) -> ViewPlan:
        return ViewPlan((grid[0] * patch, grid[1] * patch), b, k, cost(grid, b, k), native, fits)

    grid, classes = (gh, gw), max(1, classes)
    native = cost(grid, 1, 1)
    one_image = cost(grid, 1, classes)
    if one_image <= budget:  # cost is linear in the batch
        return plan(grid, max(1, min(batch, budget // one_image)), classes)
    if native <= budget:
        base, per_class = cost(grid, 1, 0), native - cost(grid, 1, 0)
        return plan(grid, 1, max(1, min(classes, (budget - base) // max(per_class, 1))))
    # Walk down the longer side, the shorter following the aspect ratio, to the smallest grid allowed.
    long_, short = (gh, gw) if gh >= gw else (gw, gh)
    min_short = min(short, MIN_GRID_SIDE)
    min_long = max(min_short, round(min_short * long_ / short))
    smallest = grid
    for n in range(long_ - 1, min_long - 1, -1):
        m = max(min_short, round(n * short / long_))
        smallest = (n, m) if gh >= gw else (m, n)
        if cost(smallest, 1, 1) <= budget:
            return plan(smallest, 1, 1)
    return plan(smallest, 1, 1, fits=False)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_memory_size(text: str | int) -> int:
    """Bytes of a size such as ``4G``, ``512MiB``, ``2.5GB`` or ``1073741824`` (K/M/G/T are powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        found = _SIZE.match(str(text))
        if found is None:
            raise ConfigError(f"memory budget {text!r} is not a size such as 4G, 512M or 1073741824 (bytes)")
        value = int(float(found.group(1)) * 1024 ** "_kmgt".index(found.group(2).lower() or "_"))
    if value <= 0:
        raise ConfigError(f"memory budget must be positive, got {text!r}")
    return value


def _ram_bytes() -> int | None:
    """Total RAM, or the container's (cgroup) memory limit when that is lower; ``None`` if unknown."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().strip())  # "max": no limit, a ValueError
        except (OSError, ValueError):
            continue
        total = limit if total is None else min(total, limit)
    return total


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """The default memory budget of one pass, in bytes.

    ``$WSSS_MEMORY_BUDGET`` when set (e.g. ``4G``); on a CUDA device 90% of its free memory (counting what torch's
    allocator caches unused); otherwise a quarter of the RAM (of the container's limit, when lower); 4 GiB when
    neither can be read.
    """
    if os.environ.get(BUDGET_ENV, "").strip():
        return parse_memory_size(os.environ[BUDGET_ENV])
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_BUDGET_FRACTION * (free + cached))
    ram = _ram_bytes()
    return int(CPU_BUDGET_FRACTION * ram) if ram else 4 * 1024**3


def checked_scales(scales: Sequence[float] | float) -> tuple[float, ...]:
    """``scales`` as floats; none, or one that is not a finite positive number, is a :class:`ConfigError`."""
    if isinstance(scales, (int, float)):
        scales = (scales,)
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ConfigError(f"scales must be positive numbers, got {scales!r}") from None
    if not values:
        raise ConfigError("give at least one scale")
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ConfigError(f"scales must be positive (resize factors of the views), got {', '.join(map(str, bad))}")
    return values


def _size(n: int) -> str:
    """Bytes for a message: ``21.32 GiB``, ``5.82 MiB``, ``512 bytes``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} bytes"


class Localizer(ABC):
    """A localisation-map method bound to a model (use as a context manager, or call :meth:`release`).

    The model exposes its attention as tensors of the autograd graph, so no hooks are installed; ``release``
    drops the reference this object holds to the model, so that nothing outlives the
    ``with`` block.
    """

    needs_grad: bool = False
    align_corners: bool = True
    # Bytes one pass may take (None: default_memory_budget of the images' device); a call's memory_budget wins.
    memory_budget: int | str | None = None

    def __init__(self, model: nn.Module, score_fn: ScoreFn = class_logits):
        self.model = model
        self.score_fn = score_fn

    @classmethod
    def applies_to(cls, model: nn.Module) -> bool:
        """Whether this map can be read off ``model`` (the MCTformer map needs one class token per class)."""
        return True

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

    def memory_footprint(self) -> Footprint | None:
        """What one pass holds, for the memory budget; ``None`` (no budget) for a model without the attributes.

        This default is the conservative one for methods that do not say: every block's attention kept, with
        head-mean copies of them stacked and weighted (AReAM's affinity: three (T, T) maps a block), and, for
        gradient methods, every block's gradient.
        """
        depth, heads, width = (getattr(self.model, k, None) for k in ("depth", "num_heads", "embed_dim"))
        if not all(isinstance(v, int) for v in (depth, heads, width)):
            return None
        grads = depth if self.needs_grad else 0
        return Footprint(heads, width, kept_blocks=depth, grad_blocks=grads, graph_blocks=grads,
                         headless_maps=3 * depth + 1, token_grads=1 if self.needs_grad else 0)

    def scores(self, out: ViTOutput, classes: Tensor) -> Tensor:
        """The target scores of the requested classes, ``(B, K)``; padded slots score 0."""
        logits = self.score_fn(out)
        picked = logits.gather(1, classes.clamp(min=0))
        return picked * (classes >= 0)

    def __call__(self, images: Tensor, classes: Tensor | Sequence[Sequence[int]], scales: Sequence[float] = (1.0,),
                 flip: bool = False, normalize: bool = True, eval_mode: bool = True,
                 memory_budget: int | str | None = None, square_sizes: Sequence[int] | None = None) -> Tensor:
        """Maps ``(B, K, H, W)`` at the input size for the given classes.

        Args:
            images: normalised images ``(B, 3, H, W)``.
            classes: ``(B, K)`` class indices (classifier outputs), or per-image lists (padded with empty maps).
            scales: resize factors (> 0) of the views; each view is rounded to a multiple of the patch size.
            flip: add the horizontally flipped view of each scale (or square size).
            normalize: min-max normalise each map to [0, 1]; otherwise the raw non-negative sum over views.
            eval_mode: run the model in eval mode (False keeps its current mode: AReAM's training pass runs with
                drop-path active, as the authors' code does).
            memory_budget: bytes (or a size such as ``"4G"``) one pass may take; None: :attr:`memory_budget`, else
                :func:`default_memory_budget`. A view over it runs in chunks, or at a reduced size (logged).
            square_sizes: instead of ``scales`` (leave them at ``[1]``), views resized to ``S x S`` for each ``S``
                (rounded to a multiple of the patch size; the aspect ratio not kept), as ACR's ``infer_cam.py``
                (384) and GETAM's test do; the maps still come back at ``H x W``.
        """
        if self.model is None:
            raise RuntimeError("this localiser was released")
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        scales = checked_scales(scales)
        cls = as_class_tensor(classes, images.shape[0], images.device)
        budget = memory_budget if memory_budget is not None else self.memory_budget
        budget = default_memory_budget(images.device) if budget is None else parse_memory_size(budget)
        footprint = self.memory_footprint()
        num_prefix = int(getattr(self.model, "num_prefix", 1))
        height, width = images.shape[-2:]

        def view_maps(x: Tensor) -> Tensor:
            rows = cls.repeat(x.shape[0] // cls.shape[0], 1)
            b_chunk, k_chunk = x.shape[0], rows.shape[1]
            if footprint is not None:
                view = tuple(x.shape[-2:])
                plan = plan_view(view, self.patch_size, num_prefix, footprint, x.shape[0], rows.shape[1], budget,
                                 x.element_size())
                b_chunk, k_chunk = plan.batch_chunk, plan.class_chunk
                if plan.size != view:
                    short = "" if plan.fits else f"; even that needs {_size(plan.estimate)}, the smallest size allowed"
                    log.warning(
                        "localisation maps of a %dx%d image (view %dx%d, %d tokens) would need about %s per pass, "
                        "over the memory budget of %s: computed at %dx%d (%d tokens) and upsampled to %dx%d%s",
                        width, height, view[1], view[0], (view[0] // self.patch_size) * (view[1] // self.patch_size)
                        + num_prefix, _size(plan.native_estimate), _size(budget), plan.size[1], plan.size[0],
                        (plan.size[0] // self.patch_size) * (plan.size[1] // self.patch_size) + num_prefix,
                        width, height, short)
                    # Antialiased, so a large reduction averages the pixels instead of sampling a few.
                    x = F.interpolate(x, size=plan.size, mode="bilinear", align_corners=False, antialias=True)
                elif (b_chunk, k_chunk) != (x.shape[0], rows.shape[1]):
                    log.info("maps of a %dx%d image (view %dx%d) computed %d image(s) x %d class(es) per pass to fit "
                             "the memory budget of %s", width, height, view[1], view[0], b_chunk, k_chunk,
                             _size(budget))
            parts = []
            with torch.set_grad_enabled(self.needs_grad):
                for b0 in range(0, x.shape[0], b_chunk):
                    xb, rb = x[b0 : b0 + b_chunk], rows[b0 : b0 + b_chunk]
                    parts.append(torch.cat([self.token_maps(xb, rb[:, k0 : k0 + k_chunk]).detach()
                                            for k0 in range(0, rb.shape[1], k_chunk)], dim=1))
            return torch.cat(parts)

        was_training = self.model.training
        if eval_mode:
            self.model.eval()
        try:
            total = sum_over_views(view_maps, images, scales, flip, self.patch_size, self.align_corners,
                                   square_sizes)
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
