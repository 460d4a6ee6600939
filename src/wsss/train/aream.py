"""AReAM's training objective: shallow attention supervises deep attention through pseudo labels (methods.md §4).

After ``warmup_steps`` of classification only (the paper's ``cls_epochs``, expressed in steps because the engine
counts steps: cls_epochs x images per epoch / global batch), every step:

1. **Re-activated CAM**, without gradients, on the batch and its flip: the CAM (x the class-to-patch attention
   averaged over all blocks, MCT head only) refined by the shallow affinity (1/k) sum_{l<k} w_l mean_h P_l[patch,
   patch] (k = ``layer_index``, P the post-softmax attention), upsampled, un-flipped and summed over the views,
   ReLU, min-max normalised per map, multiplied by the image labels.
2. **Pseudo segmentation** with two thresholds (0.55 / 0.35) and PAR at half resolution
   (:func:`wsss.pseudo.two_threshold_labels`, batched over images and thresholds).
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
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.classes import ClassSet
from ..data.io import IGNORE_INDEX
from ..errors import ConfigError
from ..localize.aream import shallow_affinity
from ..localize.base import normalize_maps
from ..localize.cam import class_activation
from ..refine.par import par

AREAM_OPTIONS = {
    "name": "aream",
    "warmup_steps": 0,  # classification-only steps first (the paper's cls_epochs, in steps)
    "layer_index": 7,  # k: blocks l < k refine the CAM, blocks l >= k are supervised (MCTformer 7, Conformer 9)
    "layer_weights": None,  # null/'uniform', a list of per-block entropies, or a JSON file from `wsss entropy`
    "aff_weight": 0.1,
    "high": 0.55,
    "low": 0.35,
    "scale": 0.5,  # PAR runs at this fraction of the crop size
    "par_iterations": 10,
    "cam_eval_mode": False,
}


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
                      shallow_weights: Tensor | None = None) -> Tensor:
    """Step 1: the re-activated CAMs ``(B, C, H, W)`` in [0, 1] of all C classes, zero for absent classes.

    ``model`` is the bare network (not a DDP wrapper); ``labels`` the ``(B, C)`` multi-hot image labels;
    ``shallow_weights`` the per-block w_l of the shallow affinity (None = 1).
    """
    b, _, h, w = images.shape
    out = model(torch.cat([images, images.flip(-1)]), attn=True)
    classes = torch.arange(labels.shape[1], device=images.device).expand(2 * b, -1)
    cam = class_activation(model, out, classes).relu()  # (2B, C, N)
    p = out.num_prefix
    if getattr(model, "head_type", None) == "mct":  # MCTformer: x class-to-patch attention of all blocks
        cam = cam * torch.stack([a.mean(dim=1)[:, :p, p:] for a in out.attn]).mean(0)
    affinity = shallow_affinity(out.attn, p, layer_index, shallow_weights)
    cam = torch.einsum("bmn,bkn->bkm", affinity, cam).unflatten(2, out.grid)
    cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
    cam = (cam[:b] + cam[b:].flip(-1)).relu()
    return normalize_maps(cam) * labels[:, :, None, None].to(cam.dtype)


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised ``(B, 3, H, W)`` images back to RGB in [0, 1]."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


@torch.no_grad()
def pseudo_segmentation(cams: Tensor, labels: Tensor, images_0_1: Tensor, classes: ClassSet, high: float = 0.55,
                        low: float = 0.35, scale: float = 0.5, par_iterations: int = 10,
                        chunk_size: int | None = None) -> Tensor:
    """Step 2: two-threshold PAR labels ``(B, H, W)`` (dataset label indices, 255 = ignore), batched.

    Per threshold t, as :func:`wsss.pseudo.two_threshold_labels` does for one image: stack a constant background t
    before the image's own class maps (ascending), resize by ``scale``, softmax, PAR, resize back, argmax. Here
    each image's classes are packed into the first K slots (K = the most classes of any image in the batch); the
    unused slots get probability 0, which PAR keeps at 0, so the argmax never picks them. One PAR call then serves
    the whole batch and both thresholds. The label is the high run's; pixels the high run calls background but the
    low run foreground become 255. Background is label 0 on a dataset with a background class and 255 (ignore) on
    one without.

    ``chunk_size`` images go through PAR together (None = the whole batch, best on a GPU; on a CPU one image at a
    time keeps PAR's working set in cache and runs about twice as fast).
    """
    if chunk_size is not None and chunk_size < cams.shape[0]:
        return torch.cat([pseudo_segmentation(cams[i : i + chunk_size], labels[i : i + chunk_size],
                                              images_0_1[i : i + chunk_size], classes, high, low, scale,
                                              par_iterations) for i in range(0, cams.shape[0], chunk_size)])
    cams = cams.float()  # PAR's ten propagation steps are not for bfloat16 (autocast)
    b, _, height, width = cams.shape
    present = labels > 0
    k = max(1, int(present.sum(dim=1).max()))
    # Present classes first, in ascending order (a stable sort), so ties go to the lower class as per image.
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # (B, K)
    used = present.gather(1, order)
    packed = cams.gather(1, order[:, :, None, None].expand(-1, -1, height, width))
    keep = torch.cat([torch.ones_like(used[:, :1]), used], dim=1)[:, :, None, None]  # background always kept
    size = (max(1, int(height * scale)), max(1, int(width * scale)))
    runs = []
    for t in (high, low):
        scores = F.interpolate(torch.cat([torch.full_like(packed[:, :1], t), packed], dim=1), size=size,
                               mode="bilinear", align_corners=False)
        runs.append(scores.masked_fill(~keep, float("-inf")).softmax(dim=1))
    guide = F.interpolate(images_0_1.float(), size=size, mode="bilinear", align_corners=False)
    refined = par(guide, torch.cat(runs, dim=1), iterations=par_iterations)
    refined = F.interpolate(refined, size=(height, width), mode="bilinear", align_corners=False)
    index_high, index_low = refined[:, : k + 1].argmax(dim=1), refined[:, k + 1 :].argmax(dim=1)
    background = 0 if classes.has_background else IGNORE_INDEX
    fg = torch.as_tensor(classes.fg_labels, device=cams.device)[order]  # (B, K) dataset label of each slot
    lookup = torch.cat([torch.full_like(fg[:, :1], background), fg], dim=1)
    seg = lookup.gather(1, index_high.flatten(1)).view_as(index_high)
    seg[(index_high == 0) & (index_low != 0)] = IGNORE_INDEX
    return seg


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
    out = model(images, attn=True)
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
    """``method.name: aream``; options and defaults in :data:`AREAM_OPTIONS`."""

    def __init__(self, cfg: dict, classes: ClassSet | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), **_: Any):
        unknown = set(cfg) - set(AREAM_OPTIONS)
        if unknown:
            raise ConfigError(f"method 'aream' takes {', '.join(list(AREAM_OPTIONS)[1:])}; unknown {sorted(unknown)}")
        if classes is None:
            raise ConfigError("method 'aream' needs the dataset's class set")
        opts = {**AREAM_OPTIONS, **cfg}
        self.classes = classes
        self.mean, self.std = list(mean), list(std)
        self.warmup_steps = int(opts["warmup_steps"])
        self.layer_index = int(opts["layer_index"])
        if self.layer_index < 1:
            raise ConfigError(f"method.layer_index must be >= 1 (the blocks below it refine the CAM), "
                              f"got {self.layer_index}")
        self.entropy = entropy_weights(opts["layer_weights"])
        self.aff_weight = float(opts["aff_weight"])
        self.high, self.low = float(opts["high"]), float(opts["low"])
        if not 0 <= self.low <= self.high <= 1:
            raise ConfigError(f"method thresholds need 0 <= low <= high <= 1, got low={self.low} high={self.high}")
        self.scale = float(opts["scale"])
        self.par_iterations = int(opts["par_iterations"])
        self.cam_eval_mode = bool(opts["cam_eval_mode"])

    def _check_depth(self, depth: int) -> None:
        if self.layer_index >= depth:
            raise ConfigError(f"method.layer_index {self.layer_index} leaves no deep block in a {depth}-block model")
        if self.entropy is not None and self.entropy.numel() != depth:
            raise ConfigError(f"method.layer_weights has {self.entropy.numel()} values for a {depth}-block model")

    def pseudo_labels(self, net: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Steps 1-2 for a batch: the ``(B, H, W)`` two-threshold PAR labels of the re-activated CAMs."""
        shallow = None if self.entropy is None else 1 - self.entropy[: self.layer_index]
        was_training = net.training
        if self.cam_eval_mode:
            net.eval()
        try:
            cams = reactivation_cams(net, images, labels, self.layer_index, shallow)
        finally:
            net.train(was_training)
        return pseudo_segmentation(cams, labels, denormalize(images, self.mean, self.std), self.classes,
                                   self.high, self.low, self.scale, self.par_iterations,
                                   chunk_size=None if images.is_cuda else 1)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        x, labels = batch["image"], batch["label"]
        reactivate = step >= self.warmup_steps
        out = model(x, attn_logits=reactivate)
        loss = F.multilabel_soft_margin_loss(out.logits, labels)
        logs = {"cls": float(loss.detach())}
        if out.patch_logits is not None:
            patch = F.multilabel_soft_margin_loss(out.patch_logits, labels)
            logs["cls_patch"] = float(patch.detach())
            loss = loss + patch
        if not reactivate:
            return loss, logs
        net = getattr(model, "module", model)  # the no-grad pass needs no DDP gradient sync
        self._check_depth(len(out.attn_logits))
        seg = self.pseudo_labels(net, x, labels)
        targets = affinity_labels(seg, out.grid)
        p = out.num_prefix
        per_layer = torch.stack([balanced_affinity_loss(torch.sigmoid(lg.float().mean(dim=1)[:, p:, p:]), targets)
                                 for lg in out.attn_logits[self.layer_index:]])
        if self.entropy is not None:
            per_layer = per_layer * self.entropy[self.layer_index:].to(per_layer)
        aff = per_layer.mean()
        logs["aff"] = float(aff.detach())
        logs["pseudo_ignored"] = float((seg == IGNORE_INDEX).float().mean())
        return loss + self.aff_weight * aff, logs
