"""The segmentation decoders by name, and the one function that builds a segmentation model from its settings."""

from __future__ import annotations

from typing import Any, Mapping

from .dpt import DPTSegmentationModel
from .segmenter import SegmentationModel, Segmenter
from .vit import VisionTransformer

DECODERS: dict[str, type[Segmenter]] = {"light": SegmentationModel, "dpt": DPTSegmentationModel}


def make_segmenter(backbone: VisionTransformer, config: Mapping[str, Any]) -> Segmenter:
    """The segmentation model ``config`` describes (a spec's ``segmenter``: ``decoder``, ``num_classes``,
    ``levels``, ``dim``, ``dropout``; a spec without ``decoder`` is the light one, as before it existed).

    Raises:
        ValueError: an unknown decoder or settings it cannot be built with.
    """
    name = config.get("decoder", "light")
    if name not in DECODERS:
        raise ValueError(f"unknown segmentation decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[name](backbone, int(config["num_classes"]), levels=config.get("levels"),
                          dim=int(config["dim"]), dropout=float(config.get("dropout", 0.1)))
