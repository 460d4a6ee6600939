"""AReAM's training objective: shallow attention supervises deep attention through pseudo labels (methods.md §4).

After ``warmup_steps`` of classification only (the paper's ``cls_epochs``, expressed in steps because the engine
counts steps: cls_epochs x images per epoch / global batch), every step:

1. **Re-activated CAM**, without gradients, on the batch and its flip: the AReAM localiser
   (:class:`~wsss.methods.aream.localizer.AReAM`) with the shallow blocks only: the CAM (x the class-to-patch
   attention averaged over all blocks, MCT head only) refined by the shallow affinity (1/k) sum_{l<k} w_l mean_h
   P_l[patch, patch] (k = ``layer_index``, P the post-softmax attention), upsampled, un-flipped and summed over the
   views, ReLU, min-max normalised per map, for the image's classes.
2. **Pseudo segmentation** with two thresholds (0.55 / 0.35) and PAR at half resolution
   (:func:`wsss.pseudo.two_threshold_labels`, the same batched rule ``wsss pseudo`` uses).
3. **Affinity labels** on the token grid: Y_ij = 1 same label, 0 different, 255 if either pixel is ignored.
4. **Balanced affinity loss** on S_l = sigmoid(mean_h of the PRE-softmax logits[patch, patch]) of each deep block
   l >= k: L_l = 0.5 sum_{Y=1}(1 - S)/(n+ + 1) + 0.5 sum_{Y=0} S/(n- + 1); L_aff = mean_l (e_l L_l).
5. L = MLSM(logits) [+ MLSM(patch logits) for conv/mct heads] + ``aff_weight`` (0.1) L_aff.

Layer weights: uniform (w_l = e_l = 1), or the per-layer entropies e written by ``wsss entropy`` (min-max normalised
to [0, 1]); the shallow refinement then uses w_l = 1 - e_l and the deep loss e_l, as the authors' ``--use_ent``.

Datasets without a background class (CamVid): the two-threshold rule needs a background, so here every pixel the
high-threshold run does not give to a class is *ignored* rather than labelled background; the affinity labels then
only relate confidently labelled pixels (same class = 1, different classes = 0).

As in the authors' code the CAM pass runs with the model in its current (training) mode, so drop-path noise is
active in it; ``cam_eval_mode: true`` runs it in eval mode instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...data.classes import ClassSet
from ...data.io import IGNORE_INDEX
from ...data.transforms import denormalize
from ...errors import ConfigError
from ...localize.base import present_classes
from ...localize.cam import class_activation
from ...models.vit import Capture
from ...pseudo.labels import two_threshold_labels
from ...refine.refiner import make_refiner
from ...train.distributed import unwrap
from ...train.losses import classification_loss
from ..registry import MethodOptions
from .localizer import AReAM


class AReAMOptions(MethodOptions):
    """``method.name: aream``."""

    warmup_steps: int = Field(0, ge=0)  # classification-only steps first (the paper's cls_epochs, in steps)
    layer_index: int = Field(7, ge=1)  # k: blocks l < k refine the CAM, l >= k are supervised (MCTformer 7, Conformer 9)
    layer_weights: str | list[float] | None = None  # null/'uniform', per-block entropies, or a `wsss entropy` JSON
    aff_weight: float = Field(0.1, ge=0.0)
    high: float = Field(0.55, ge=0.0, le=1.0)
    low: float = Field(0.35, ge=0.0, le=1.0)
    scale: float = Field(0.5, gt=0.0, le=1.0)  # PAR runs at this fraction of the crop size
    par_iterations: int = Field(10, ge=0)
    cam_eval_mode: bool = False
    # Scales of the no-grad CAM pass (each with its flip): [1.0] for MCTformer, [0.5, 1, 1.5] for the Conformer.
    cam_scales: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: [1.0], min_length=1)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "AReAMOptions":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


# ------------------------------------------------------------------------------------------- layer weights


def read_entropy_file(path: str | Path) -> list[float]:
    """The per-layer entropies of a JSON file written by ``wsss entropy`` (``{"entropy": [...]}``, or a bare list)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read layer weights ({exc})") from exc
    values = data.get("entropy") if isinstance(data, dict) else data
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{path}: expected a list of numbers or {{\"entropy\": [...]}}")
    return [float(v) for v in values]


def entropy_weights(spec: str | Sequence[float] | None) -> Tensor | None:
    """Min-max normalised per-layer entropies e in [0, 1] (None = uniform weights).

    ``spec`` is None / ``'uniform'``, a list of numbers, or the path of a JSON file from ``wsss entropy``. A
    constant vector carries no preference between layers and gives uniform weights.
    """
    if spec is None or spec == "uniform":
        return None
    values = read_entropy_file(spec) if isinstance(spec, (str, Path)) else spec
    try:
        e = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method.layer_weights must be numbers, got {spec!r}") from exc
    if e.numel() == 0 or not torch.isfinite(e).all():
        raise ConfigError(f"method.layer_weights must be finite numbers, got {spec!r}")
    span = e.max() - e.min()
    if span <= 0:
        return None
    return (e - e.min()) / span


# ------------------------------------------------------------------------------------------- the four steps


@torch.no_grad()
def reactivation_cams(model: nn.Module, images: Tensor, labels: Tensor, layer_index: int,
                      shallow_weights: Tensor | None = None, eval_mode: bool = False,
                      scales: Sequence[float] = (1.0,)) -> tuple[Tensor, Tensor]:
    """Step 1: the re-activated CAMs ``(B, K, H, W)`` in [0, 1] of each image's classes and those classes ``(B, K)``
    (classifier outputs, -1 for unused slots).

    ``model`` is the bare network (not a DDP wrapper); ``labels`` the ``(B, C)`` multi-hot image labels;
    ``shallow_weights`` the per-block w_l of the shallow affinity (None = 1); ``eval_mode`` runs the pass in eval
    mode (the authors' code runs it in training mode, drop-path active); ``scales`` are the views' resize factors,
    each with its flip (``gen_msf_cam``).
    """
    classes = present_classes(labels)
    with AReAM(model, layers=layer_index, layer_weights=shallow_weights) as localizer:
        cams = localizer(images, classes, scales=scales, flip=True, eval_mode=eval_mode)
    return cams, classes


@torch.no_grad()
def pseudo_segmentation(cams: Tensor, classes: Tensor, images_0_1: Tensor, class_set: ClassSet, high: float = 0.55,
                        low: float = 0.35, scale: float = 0.5, par_iterations: int = 10,
                        chunk_size: int | None = None) -> Tensor:
    """Step 2: two-threshold PAR labels ``(B, H, W)`` (dataset label indices, 255 = ignore).

    ``cams (B, K, H, W)`` are the maps of the classifier outputs ``classes (B, K)`` (-1: unused). The rule is
    :func:`wsss.pseudo.two_threshold_labels` with PAR (``par_iterations``) on the de-normalised crop at ``scale``;
    the background is label 0 on a dataset with a background class and 255 (ignore) on one without.
    ``chunk_size`` images go through PAR together (None = the whole batch, best on a GPU; on a CPU one image at a
    time keeps PAR's working set in cache and runs about twice as fast).
    """
    if chunk_size is not None and chunk_size < cams.shape[0]:
        return torch.cat([pseudo_segmentation(cams[i : i + chunk_size], classes[i : i + chunk_size],
                                              images_0_1[i : i + chunk_size], class_set, high, low, scale,
                                              par_iterations) for i in range(0, cams.shape[0], chunk_size)])
    to_label = torch.as_tensor(class_set.fg_labels, device=classes.device)
    dataset_labels = torch.where(classes >= 0, to_label[classes.clamp(min=0)], -1)
    refine = make_refiner("par", images_0_1.float() * 255.0, iterations=par_iterations) if par_iterations else None
    background = 0 if class_set.has_background else IGNORE_INDEX
    # PAR's ten propagation steps are not for bfloat16 (autocast).
    return two_threshold_labels(cams.float(), dataset_labels, high, low, refine=refine, softmax=True, scale=scale,
                                background_label=background)


def affinity_labels(seg: Tensor, grid: tuple[int, int]) -> Tensor:
    """Step 3: pairwise labels ``(B, N, N)`` on the ``h x w`` token grid from a ``(B, H, W)`` segmentation.

    The segmentation is nearest-downsampled (``mode='nearest'``, as the authors' ``seg_to_aff``); Y_ij = 1 where
    tokens i and j have the same label, 0 where they differ, 255 where either is ignored.
    """
    tokens = F.interpolate(seg[:, None].float(), size=grid, mode="nearest")[:, 0].long().flatten(1)  # (B, N)
    same = (tokens[:, :, None] == tokens[:, None, :]).long()
    ignored = tokens == IGNORE_INDEX
    return same.masked_fill(ignored[:, :, None] | ignored[:, None, :], IGNORE_INDEX)


def balanced_affinity_loss(affinity: Tensor, labels: Tensor) -> Tensor:
    """Step 4: 0.5 sum_{Y=1}(1 - S)/(n+ + 1) + 0.5 sum_{Y=0} S/(n- + 1), counts over the whole batch.

    ``affinity`` holds S in [0, 1] (sigmoid of attention logits), ``labels`` the Y of :func:`affinity_labels`.
    """
    pos = (labels == 1).to(affinity.dtype)
    neg = (labels == 0).to(affinity.dtype)
    pos_loss = (pos * (1 - affinity)).sum() / (pos.sum() + 1)
    neg_loss = (neg * affinity).sum() / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss


# ------------------------------------------------------------------------------------------- entropies


@torch.no_grad()
def layer_entropies(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Per-image, per-block entropy ``(B, L)`` in bits of the CAM refined with that block's attention.

    For block l: s = sum over the present classes of ReLU(CAM) (no class-attention factor), r = mean_h P_l[patch,
    patch] s, and H_l = -sum_n p_n log2 p_n with p = softmax over the N positions of r (the authors'
    ``ent_voc_*.py``). Images without a label give NaN rows; leave them out of averages.
    """
    out = model(images, capture=Capture(attn=True))
    classes = torch.arange(labels.shape[1], device=images.device).expand(images.shape[0], -1)
    cam = class_activation(model, out, classes).relu()  # (B, C, N)
    summed = (cam * labels[:, :, None].to(cam.dtype)).sum(dim=1)  # refinement is linear: refine the sum
    p = out.num_prefix
    attn = torch.stack([a.mean(dim=1)[:, p:, p:] for a in out.attn])  # (L, B, N, N)
    refined = torch.einsum("lbmn,bn->blm", attn, summed)
    log_prob = refined.log_softmax(dim=-1)
    entropy = -(log_prob.exp() * log_prob).sum(dim=-1) / torch.log(torch.tensor(2.0))
    return entropy.masked_fill(labels.sum(dim=1, keepdim=True) == 0, float("nan"))


# ------------------------------------------------------------------------------------------- objective


class AReAMObjective:
    """``method.name: aream`` with :class:`AReAMOptions`."""

    def __init__(self, options: AReAMOptions, classes: ClassSet | None = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5), **_: Any):
        if classes is None:
            raise ConfigError("method 'aream' needs the dataset's class set")
        self.options = options
        self.classes = classes
        self.mean, self.std = list(mean), list(std)
        self.warmup_steps = options.warmup_steps
        self.layer_index = options.layer_index
        self.entropy = entropy_weights(options.layer_weights)

    def _check_depth(self, depth: int) -> None:
        if self.layer_index >= depth:
            raise ConfigError(f"method.layer_index {self.layer_index} leaves no deep block in a {depth}-block model")
        if self.entropy is not None and self.entropy.numel() != depth:
            raise ConfigError(f"method.layer_weights has {self.entropy.numel()} values for a {depth}-block model")

    def pseudo_labels(self, net: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Steps 1-2 for a batch: the ``(B, H, W)`` two-threshold PAR labels of the re-activated CAMs."""
        o = self.options
        shallow = None if self.entropy is None else 1 - self.entropy[: self.layer_index]
        cams, classes = reactivation_cams(net, images, labels, self.layer_index, shallow, eval_mode=o.cam_eval_mode,
                                          scales=tuple(o.cam_scales))
        return pseudo_segmentation(cams, classes, denormalize(images, self.mean, self.std), self.classes, o.high,
                                   o.low, o.scale, o.par_iterations, chunk_size=None if images.is_cuda else 1)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        x, labels = batch["image"], batch["label"]
        reactivate = step >= self.warmup_steps
        out = model(x, capture=Capture(attn_logits=reactivate))
        loss, logs = classification_loss(out, labels)
        if not reactivate:
            return loss, logs
        self._check_depth(len(out.attn_logits))
        seg = self.pseudo_labels(unwrap(model), x, labels)  # the no-grad pass needs no DDP gradient sync
        targets = affinity_labels(seg, out.grid)
        p = out.num_prefix
        per_layer = torch.stack([balanced_affinity_loss(torch.sigmoid(lg.float().mean(dim=1)[:, p:, p:]), targets)
                                 for lg in out.attn_logits[self.layer_index:]])
        if self.entropy is not None:
            per_layer = per_layer * self.entropy[self.layer_index:].to(per_layer)
        aff = per_layer.mean()
        logs["aff"] = float(aff.detach())
        logs["pseudo_ignored"] = float((seg == IGNORE_INDEX).float().mean())
        return loss + self.options.aff_weight * aff, logs
