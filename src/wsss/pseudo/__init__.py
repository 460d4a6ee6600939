"""Turning (refined) localisation maps into pseudo segmentation labels.

All functions are pure: thresholds and settings are arguments, tensors go in and ``(H, W)`` int64 label
tensors come out (255 = ignore).
"""

from ..refine.background import psa_background, with_background
from .completion import label_completion, label_completion_with_saliency, percentile_threshold
from .labels import (
    background_argmax,
    channels_to_labels,
    maps_to_labels,
    psa_confident_labels,
    psa_labels,
    sorted_by_label,
    two_threshold_labels,
)
from .generate import RULES
from .random_walk import WalkSettings, walk_label, walk_settings_of, walk_split
from .morphology import binary_opening

__all__ = [
    "background_argmax",
    "binary_opening",
    "channels_to_labels",
    "label_completion",
    "label_completion_with_saliency",
    "maps_to_labels",
    "percentile_threshold",
    "RULES",
    "psa_background",
    "psa_confident_labels",
    "psa_labels",
    "sorted_by_label",
    "two_threshold_labels",
    "walk_label",
    "walk_settings_of",
    "walk_split",
    "WalkSettings",
    "with_background",
]
