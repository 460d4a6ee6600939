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
   terms averaged separately) + MLSM (+ ``saliency_weight`` x saliency BCE with ``saliency_loss: true``)
   (+ ``dcrf_weight`` x the dense-CRF energy of the softmax on the raw crop inside its ROI, gated by the pseudo
   labels' 255 pixels: :class:`~wsss.train.dense_crf_loss.DenseCRFLoss`; GETAM: 1e-7. It is O(N²) per crop: a
   GPU loss, off in the CPU presets).

Options (``method:``) are :class:`GETAMOptions`.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...data.classes import ClassSet
from ...data.io import IGNORE_INDEX
from ...data.transforms import denormalize
from ...localize.base import present_classes
from ...errors import ConfigError
from ...models.segmenter import Segmenter
from ...models.vit import Capture, VisionTransformer
from ...pseudo.completion import label_completion_with_saliency
from ...refine.pamr import pamr
from ...segment.losses import saliency_bce, saliency_target, split_cross_entropy_terms
from ...segment.objective import DecoderOptions, build_segmenter
from ...train.dense_crf_loss import DenseCRFLoss
from ...train.distributed import unwrap
from ...train.losses import classification_loss
from .localizer import GETAM


class GETAMOptions(DecoderOptions):
    """``method.name: getam`` (the decoder options come from :class:`~wsss.segment.DecoderOptions`)."""

    cls_steps: int = Field(0, ge=0)  # phase-1 length in steps (GETAM: half of the run)
    start_layer: int | None = None  # first block of the maps (null: depth // 2)
    grad_power: Literal[1, 2] = 2  # 2: the authors' extra mean_h ReLU(G) factor; 1: without it
    pamr_iterations: int = Field(10, ge=0)
    cut_threshold: float = Field(0.9, gt=0.0, lt=1.0)  # label completion percentile (0.95 for COCO)
    bg_power: float = Field(32.0, gt=0.0)
    opening: int = Field(10, ge=0)  # denoising opening size (0: off)
    saliency_loss: bool = False
    saliency_target: Literal["intended", "authors"] = "intended"  # authors: the released code's degenerate target
    saliency_weight: float = Field(1.0, ge=0.0)
    phase2_lr_scale: float = Field(0.1, gt=0.0)  # GETAM's lr_scale in phase 2 (applied through lr_scale(step))
    dcrf_weight: float = Field(0.0, ge=0.0)  # GETAM: 1e-7 (sigma_rgb 15, sigma_xy 100, at 0.5 scale)
    dcrf_scale: float = Field(0.5, gt=0.0, le=1.0)


class GETAMObjective:
    """``method.name: getam`` (see the module docstring)."""

    def __init__(self, options: GETAMOptions, classes: ClassSet, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), **_: Any):
        self.options = options
        if options.saliency_loss and not classes.has_background:
            raise ConfigError("method.saliency_loss supervises the background probability; this dataset has no "
                              "background class")
        self.classes = classes
        self.mean, self.std = tuple(mean), tuple(std)
        # Label completion's background: label 0, or ignored on a dataset without a background class.
        self.background_label = 0 if classes.has_background else IGNORE_INDEX
        self.split_background = 0 if classes.has_background else None
        self.cls_steps = options.cls_steps
        self._to_label = torch.tensor([classes.output_to_label(k) for k in range(classes.num_fg)], dtype=torch.long)
        self.dense_crf = DenseCRFLoss(options.dcrf_weight, scale=options.dcrf_scale) if options.dcrf_weight else None

    @property
    def needs_saliency(self) -> bool:
        """The saliency loss reads ``batch["saliency"]`` (``data.saliency_dir``)."""
        return self.options.saliency_loss

    @property
    def needs_roi(self) -> bool:
        """The dense-CRF loss needs each crop's ROI (``batch["roi"]``, see ``VOCDataset.with_roi``)."""
        return self.dense_crf is not None

    def build_model(self, backbone: VisionTransformer) -> Segmenter:
        """The backbone (classifier kept) plus a decoder with one channel per dataset label."""
        layer = self.options.start_layer
        if layer is not None and not -backbone.depth <= layer < backbone.depth:
            raise ConfigError(f"method.start_layer {layer} is out of range for a {backbone.depth}-block model "
                              f"(use 0..{backbone.depth - 1})")
        return build_segmenter(backbone, self.classes, self.options)

    def in_segmentation_phase(self, step: int) -> bool:
        return step >= self.cls_steps

    def lr_scale(self, step: int) -> float:
        """Factor on the scheduled learning rate: ``phase2_lr_scale`` in phase 2 (for the engine to apply)."""
        return self.options.phase2_lr_scale if self.in_segmentation_phase(step) else 1.0

    def refined_maps(self, backbone: VisionTransformer, images: Tensor, classes: Tensor) -> Tensor:
        """GETAM maps ``(B, K, H, W)`` of ``classes`` (output indices, -1 = none), PAMR-refined, divided by max + 1e-5."""
        o = self.options
        with GETAM(backbone, start_layer=o.start_layer, grad_power=o.grad_power) as localizer:
            raw = localizer(images, classes, normalize=False)
        if o.pamr_iterations:
            rgb = denormalize(images.detach().float(), self.mean, self.std) * 255.0
            raw = pamr(rgb, raw.float(), iterations=o.pamr_iterations)
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
                cut_threshold=o.cut_threshold, bg_power=o.bg_power, opening=o.opening,
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
            out = model(images, capture=Capture())
            loss, logs = classification_loss(out.vit, labels)
            # The decoder joins the graph with weight 0, so DDP sees every parameter used in phase 1 too.
            return loss + 0.0 * out.logits.sum(), logs
        saliency = batch.get("saliency")
        if self.options.saliency_loss and saliency is None:
            raise ConfigError("method.saliency_loss needs saliency maps in the batch: set data.saliency_dir")
        pseudo, edited = self.pseudo_labels(model, images, labels, saliency)
        out = model(images, capture=Capture())
        bg, fg = split_cross_entropy_terms(out.logits, pseudo, self.split_background)
        cls, logs = classification_loss(out.vit, labels)
        loss = bg + fg + cls
        logs.update({"seg_bg": float(bg.detach()), "seg_fg": float(fg.detach()),
                     "pseudo_labelled": float((pseudo != IGNORE_INDEX).float().mean())})
        if self.dense_crf is not None:
            if "roi" not in batch:
                raise ConfigError("method.dcrf_weight needs each crop's ROI in the batch (the training engine adds "
                                  "it); got a batch without 'roi'")
            probs = F.interpolate(out.logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
            raw = denormalize(images, self.mean, self.std) * 255.0
            dcrf = self.dense_crf(raw, probs.softmax(dim=1), batch["roi"].to(images.device).float(), pseudo)
            loss = loss + dcrf
            logs["dcrf"] = float(dcrf.detach())
        if self.options.saliency_loss:
            target = saliency_target(saliency, edited, self.options.saliency_target)
            sal = saliency_bce(out.logits, target)
            loss = loss + self.options.saliency_weight * sal
            logs["saliency"] = float(sal.detach())
        return loss, logs
