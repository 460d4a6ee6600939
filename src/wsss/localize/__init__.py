"""Localisation maps from transformers: one small class per method on a shared base, and ``localize``.

The generic building blocks live here (the base, CAM, Grad-CAM, attention rollout, the class-token-gradient
machinery); each paper's own formula lives in its method folder (:mod:`wsss.methods`), and ``localize`` finds every
map through the registry.
"""

from .api import localize
from .attention_gradients import AttentionGradients
from .base import Localizer, class_logits, class_token_logits, normalize_maps
from .cam import CAM
from .gradcam import GradCAM
from .rollout import Rollout

__all__ = ["localize", "Localizer", "AttentionGradients", "CAM", "GradCAM", "Rollout", "class_logits",
           "class_token_logits", "normalize_maps"]
