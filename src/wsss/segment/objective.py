"""The ``segmentation`` training objective: a segmentation model trained on (pseudo) label masks.

The masks are the batch's ``mask`` (255 = ignore): point ``data.mask_dir`` at a pseudo-label folder, or use a
dataset root whose ``SegmentationClass`` holds them. Config (``method:``)::

    name: segmentation
    loss: ce          # ce | split_ce (GETAM: background and foreground terms averaged separately)
    levels: null      # decoder blocks (default 3, 5, 8, 11 of 12, scaled to the depth)
    dim: 128          # decoder width
    dropout: 0.1
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..data.classes import ClassSet
from ..data.io import IGNORE_INDEX
from ..errors import ConfigError
from ..models.vit import VisionTransformer
from .losses import cross_entropy, split_cross_entropy_terms
from .model import SegmentationModel, add_to_spec

LOSSES = ("ce", "split_ce")
DECODER_OPTIONS = {"levels": None, "dim": 128, "dropout": 0.1}


def check_options(cfg: dict, defaults: dict, method: str) -> dict:
    """``cfg`` (a ``method`` section) merged over ``defaults``; unknown keys are a ConfigError."""
    unknown = set(cfg) - set(defaults) - {"name"}
    if unknown:
        raise ConfigError(f"method {method!r}: unknown options {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in cfg.items() if k != "name"}}


def build_segmenter(backbone: VisionTransformer, classes: ClassSet, spec: dict, options: dict,
                    mean: Sequence[float], std: Sequence[float]) -> SegmentationModel:
    """A :class:`SegmentationModel` with one channel per dataset label, recorded (with mean/std) in ``spec``."""
    try:
        model = SegmentationModel(backbone, classes.num_classes, levels=options["levels"], dim=int(options["dim"]),
                                  dropout=float(options["dropout"]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad segmentation decoder settings: {exc}") from exc
    add_to_spec(model, spec, mean=[float(m) for m in mean], std=[float(s) for s in std])
    return model


class SegmentationObjective:
    """Cross-entropy (or GETAM's split cross-entropy) of the decoder's logits against the batch masks."""

    def __init__(self, cfg: dict, classes: ClassSet, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), **_: Any):
        self.options = check_options(cfg, {"loss": "ce", **DECODER_OPTIONS}, "segmentation")
        if self.options["loss"] not in LOSSES:
            raise ConfigError(f"method.loss must be one of {LOSSES}, got {self.options['loss']!r}")
        self.classes = classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.background_label = 0 if classes.has_background else None

    def build_model(self, backbone: VisionTransformer, spec: dict) -> SegmentationModel:
        """Drop the classifier (this stage does not train it, and DDP wants every parameter used), add the decoder."""
        if backbone.head_type != "mct":
            backbone.reset_classifier(0)
            spec["num_classes"] = 0
        return build_segmenter(backbone, self.classes, spec, self.options, self.mean, self.std)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["image"]).logits
        target = batch["mask"]
        labelled = float((target != IGNORE_INDEX).float().mean())
        if self.options["loss"] == "ce":
            loss = cross_entropy(logits, target)
            return loss, {"seg": float(loss.detach()), "labelled": labelled}
        bg, fg = split_cross_entropy_terms(logits, target, self.background_label)
        return bg + fg, {"seg_bg": float(bg.detach()), "seg_fg": float(fg.detach()), "labelled": labelled}
