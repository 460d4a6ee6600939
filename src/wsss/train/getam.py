"""GETAM's end-to-end training objective (methods.md §2): classifier and segmentation head in one model.

Phase 1 (steps < ``cls_steps``): multi-label soft-margin loss (MLSM) of the classifier only.
Phase 2, every step:

1. GETAM maps of every present class of every image, from one batched backward pass of the backbone (no
   parameter gradients, nothing kept), summed over the blocks from ``start_layer`` (default depth / 2);
2. PAMR on the raw 0-255 crop (the batch denormalised with the data mean/std), then each map divided by its
   maximum + 1e-5;
3. activation-aware label completion (with the batch's ``saliency`` when the dataset provides one, see
   ``data.saliency_dir``; else the variant without), giving pseudo labels;
4. a fresh forward pass of classifier + segmentation head: split cross-entropy (background and foreground
   terms averaged separately) + MLSM (+ ``saliency_weight`` x saliency BCE with ``saliency_loss: true``).

Config (``method:``)::

    name: getam
    cls_steps: 0               # phase-1 length in steps (GETAM: half of the run)
    start_layer: null          # first block of the maps (null: depth // 2)
    grad_power: 2              # 2: the authors' extra mean_h ReLU(G) factor; 1: without it
    pamr_iterations: 10
    cut_threshold: 0.9         # label completion percentile (0.95 for COCO)
    bg_power: 32
    opening: 10                # denoising opening size (0: off)
    saliency_loss: false
    saliency_target: intended  # intended: 1 - binary saliency | authors: the released code's degenerate target
    saliency_weight: 1.0
    phase2_lr_scale: 0.1       # GETAM's lr_scale in phase 2, returned by lr_scale(step) for the engine to apply
    levels: null               # decoder (see wsss.segment.model)
    dim: 128
    dropout: 0.1

GETAM's dense-CRF regulariser (weight 1e-7) is not implemented.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.classes import ClassSet
from ..data.io import IGNORE_INDEX
from ..data.transforms import denormalize
from ..errors import ConfigError
from ..localize.getam import GETAM
from ..models.vit import VisionTransformer
from ..pseudo.completion import label_completion_with_saliency
from ..refine.pamr import pamr
from ..segment.losses import SALIENCY_TARGETS, saliency_bce, saliency_target, split_cross_entropy_terms
from ..segment.model import SegmentationModel, unwrap
from ..segment.objective import DECODER_OPTIONS, build_segmenter, check_options

DEFAULTS: dict[str, Any] = {
    "cls_steps": 0, "start_layer": None, "grad_power": 2, "pamr_iterations": 10, "cut_threshold": 0.9,
    "bg_power": 32, "opening": 10, "saliency_loss": False, "saliency_target": "intended", "saliency_weight": 1.0,
    "phase2_lr_scale": 0.1, **DECODER_OPTIONS,
}


def present_classes(labels: Tensor) -> Tensor:
    """Classifier-output indices of each image's classes ``(B, K)``, padded with -1 (K = most classes of an image)."""
    present = labels > 0
    width = max(int(present.sum(dim=1).max()), 1) if labels.numel() else 1
    # A stable sort puts the present outputs first, in ascending order.
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    picked = present.gather(1, order)
    return torch.where(picked, order, torch.full_like(order, -1))


class GETAMObjective:
    """``method.name: getam`` (see the module docstring)."""

    def __init__(self, cfg: dict, classes: ClassSet, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), **_: Any):
        self.options = check_options(cfg, DEFAULTS, "getam")
        o = self.options
        if o["saliency_target"] not in SALIENCY_TARGETS:
            raise ConfigError(f"method.saliency_target must be one of {SALIENCY_TARGETS}, got {o['saliency_target']!r}")
        if o["grad_power"] not in (1, 2):
            raise ConfigError(f"method.grad_power must be 1 or 2, got {o['grad_power']!r}")
        if int(o["cls_steps"]) < 0 or int(o["pamr_iterations"]) < 0 or int(o["opening"]) < 0:
            raise ConfigError("method.cls_steps, pamr_iterations and opening must be >= 0")
        if not 0 < float(o["cut_threshold"]) < 1:
            raise ConfigError(f"method.cut_threshold must lie in (0, 1), got {o['cut_threshold']}")
        if o["saliency_loss"] and not classes.has_background:
            raise ConfigError("method.saliency_loss supervises the background probability; this dataset has no "
                              "background class")
        self.classes = classes
        self.mean, self.std = tuple(mean), tuple(std)
        # Label completion's background: label 0, or ignored on a dataset without a background class.
        self.background_label = 0 if classes.has_background else IGNORE_INDEX
        self.split_background = 0 if classes.has_background else None
        self.cls_steps = int(o["cls_steps"])
        self._to_label = torch.tensor([classes.output_to_label(k) for k in range(classes.num_fg)], dtype=torch.long)

    def build_model(self, backbone: VisionTransformer, spec: dict) -> SegmentationModel:
        """The backbone (classifier kept) plus a decoder with one channel per dataset label."""
        return build_segmenter(backbone, self.classes, spec, self.options, self.mean, self.std)

    def in_segmentation_phase(self, step: int) -> bool:
        return step >= self.cls_steps

    def lr_scale(self, step: int) -> float:
        """Factor on the scheduled learning rate: ``phase2_lr_scale`` in phase 2 (for the engine to apply)."""
        return float(self.options["phase2_lr_scale"]) if self.in_segmentation_phase(step) else 1.0

    def refined_maps(self, backbone: VisionTransformer, images: Tensor, classes: Tensor) -> Tensor:
        """GETAM maps ``(B, K, H, W)`` of ``classes`` (output indices, -1 = none), PAMR-refined, divided by max + 1e-5."""
        o = self.options
        with GETAM(backbone, start_layer=o["start_layer"], grad_power=o["grad_power"]) as localizer:
            raw = localizer(images, classes, normalize=False)
        if o["pamr_iterations"]:
            rgb = denormalize(images.detach().float(), self.mean, self.std) * 255.0
            raw = pamr(rgb, raw.float(), iterations=int(o["pamr_iterations"]))
        return raw / (raw.amax(dim=(2, 3), keepdim=True) + 1e-5)

    @torch.no_grad()
    def complete(self, maps: Tensor, classes: Tensor, saliency: Tensor | None) -> tuple[Tensor, Tensor]:
        """Label completion of every image: pseudo labels ``(B, H, W)`` long and the edited saliency (uint8)."""
        o = self.options
        batch, _, height, width = maps.shape
        labels = torch.full((batch, height, width), self.background_label, dtype=torch.long, device=maps.device)
        edited = torch.zeros((batch, height, width), dtype=torch.uint8, device=maps.device)
        for b in range(batch):
            keep = classes[b] >= 0
            if saliency is not None:
                edited[b] = (saliency[b] > 0).to(torch.uint8)
            if not keep.any():  # no class to localise: the whole crop is background
                continue
            dataset_labels = self._to_label.to(maps.device)[classes[b][keep]]
            labels[b], edited[b] = label_completion_with_saliency(
                maps[b][keep], dataset_labels, None if saliency is None else saliency[b],
                cut_threshold=float(o["cut_threshold"]), bg_power=float(o["bg_power"]), opening=int(o["opening"]),
                background_label=self.background_label)
        return labels, edited

    def pseudo_labels(self, model: nn.Module, images: Tensor, labels: Tensor,
                      saliency: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pseudo labels ``(B, H, W)`` (dataset labels, 255 = ignore) and the edited saliency of a batch."""
        classes = present_classes(labels)
        maps = self.refined_maps(unwrap(model).backbone, images, classes)
        return self.complete(maps, classes, saliency)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch["image"], batch["label"]
        if not self.in_segmentation_phase(step):
            out = model(images)
            cls = F.multilabel_soft_margin_loss(out.vit.logits, labels)
            # The decoder joins the graph with weight 0, so DDP sees every parameter used in phase 1 too.
            return cls + 0.0 * out.logits.sum(), {"cls": float(cls.detach())}
        saliency = batch.get("saliency")
        if self.options["saliency_loss"] and saliency is None:
            raise ConfigError("method.saliency_loss needs saliency maps in the batch: set data.saliency_dir")
        pseudo, edited = self.pseudo_labels(model, images, labels, saliency)
        out = model(images)
        bg, fg = split_cross_entropy_terms(out.logits, pseudo, self.split_background)
        cls = F.multilabel_soft_margin_loss(out.vit.logits, labels)
        loss = bg + fg + cls
        logs = {"cls": float(cls.detach()), "seg_bg": float(bg.detach()), "seg_fg": float(fg.detach()),
                "pseudo_labelled": float((pseudo != IGNORE_INDEX).float().mean())}
        if self.options["saliency_loss"]:
            target = saliency_target(saliency, edited, self.options["saliency_target"])
            sal = saliency_bce(out.logits, target)
            loss = loss + float(self.options["saliency_weight"]) * sal
            logs["saliency"] = float(sal.detach())
        return loss, logs
