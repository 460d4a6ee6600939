"""Localisation maps from transformers: one small class per method on a shared base, and ``localize``."""

from .acr import ACR
from .api import METHODS, localize
from .aream import AReAM
from .base import Localizer, class_logits, normalize_maps
from .cam import CAM
from .getam import GETAM
from .gradcam import GradCAM
from .rollout import Rollout

__all__ = ["localize", "METHODS", "Localizer", "CAM", "GradCAM", "Rollout", "GETAM", "ACR", "AReAM",
           "class_logits", "normalize_maps"]
