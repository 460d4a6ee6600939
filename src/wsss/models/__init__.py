"""Transformer backbones with timm-compatible parameter names, their heads, the segmentation model built on them,
and the one checkpoint format (:mod:`.checkpoint`)."""

from .checkpoint import ModelSpec, load
from .factory import create_model, list_models, load_into
from .heads import HEADS
from .decoders import DECODERS, make_segmenter
from .dpt import DPTSegmentationModel
from .segmenter import SegmentationModel, SegmentationOutput, Segmenter
from .vit import HEAD_TYPES, PRESETS, Capture, VisionTransformer, ViTOutput

__all__ = ["create_model", "list_models", "load_into", "load", "ModelSpec", "VisionTransformer", "ViTOutput",
           "Capture", "Segmenter", "SegmentationModel", "DPTSegmentationModel", "DECODERS", "make_segmenter",
           "SegmentationOutput", "PRESETS", "HEADS", "HEAD_TYPES"]
