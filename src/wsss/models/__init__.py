"""Transformer backbones with timm-compatible parameter names."""

from .factory import create_model, list_models, load_into
from .vit import HEAD_TYPES, PRESETS, VisionTransformer, ViTOutput

__all__ = ["create_model", "list_models", "load_into", "VisionTransformer", "ViTOutput", "PRESETS", "HEAD_TYPES"]
