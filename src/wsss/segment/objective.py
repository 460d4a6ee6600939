"""The ``segmentation`` training objective: a segmentation model trained on (pseudo) label masks.

The masks are the batch's ``mask`` (255 = ignore): point ``data.mask_dir`` at a pseudo-label folder, or use a
dataset root whose ``SegmentationClass`` holds them. Options (``method:``) are :class:`SegmentationOptions`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from ..data.classes import ClassSet
from ..data.io import IGNORE_INDEX
from ..errors import ConfigError
from ..methods.registry import MethodOptions
from ..models.decoders import DECODERS, make_segmenter
from ..models.vit import VisionTransformer
from .losses import cross_entropy, split_cross_entropy_terms


class DecoderOptions(MethodOptions):
    """The segmentation decoder (:mod:`wsss.models.decoders`): on a ViT ``light``
    (:class:`~wsss.models.segmenter.SegmentationModel`, stride 16) or ``dpt`` (GETAM's,
    :class:`~wsss.models.dpt.DPTSegmentationModel`, fusing down to stride 2); on ``model.name: resnet101``
    ``deeplabv2`` (ASPP, stride 8), on ``model.name: resnet38d`` ``deeplab_resnet38`` (AReAM's, stride 8). The
    DeepLabs have no ``levels``, ``dim`` or ``dropout``: changing one is an error."""

    decoder: Literal["light", "dpt", "deeplabv2", "deeplab_resnet38"] = "light"
    # blocks feeding the decoder (light: 3, 5, 8, 11 of 12; dpt: 2, 5, 8, 11, or 8, 11 on the hybrid; scaled)
    levels: list[int] | None = None
    dim: int = Field(128, ge=1)  # decoder width (the DPT's ``features``: 256 in GETAM)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class SegmentationOptions(DecoderOptions):
    """``method.name: segmentation``."""

    loss: Literal["ce", "split_ce"] = "ce"  # split_ce: GETAM's, background and foreground averaged separately


def build_segmenter(backbone: nn.Module, classes: ClassSet, options: DecoderOptions) -> nn.Module:
    """The ``options.decoder`` segmentation model with one channel per dataset label.

    The decoder gets the options it has; one it does not have (``dim`` for a DeepLab) reaches it only when changed
    from its default, so that it is refused rather than ignored.
    """
    takes = DECODERS[options.decoder].settings
    config: dict[str, Any] = {"decoder": options.decoder, "num_classes": classes.num_classes}
    for key in ("levels", "dim", "dropout"):
        value = getattr(options, key)
        if key in takes or value != type(options).model_fields[key].default:
            config[key] = value
    try:
        return make_segmenter(backbone, config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad segmentation decoder settings: {exc}") from exc


class SegmentationObjective:
    """Cross-entropy (or GETAM's split cross-entropy) of the decoder's logits against the batch masks."""

    def __init__(self, options: SegmentationOptions, classes: ClassSet, **_: Any):
        self.options = options
        self.classes = classes
        self.background_label = 0 if classes.has_background else None

    def build_model(self, backbone: nn.Module) -> nn.Module:
        """Drop a ViT's classifier (this stage does not train it, and DDP wants every parameter used; the CNN
        backbones have none), add the decoder."""
        if isinstance(backbone, VisionTransformer) and not backbone.tokens_per_class:
            backbone.reset_classifier(0)
        return build_segmenter(backbone, self.classes, self.options)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["image"])
        target = batch["mask"]
        labelled = float((target != IGNORE_INDEX).float().mean())
        if self.options.loss == "ce":
            loss = cross_entropy(logits, target)
            return loss, {"seg": float(loss.detach()), "labelled": labelled}
        bg, fg = split_cross_entropy_terms(logits, target, self.background_label)
        return bg + fg, {"seg_bg": float(bg.detach()), "seg_fg": float(fg.detach()), "labelled": labelled}
