"""The segmentation stage: a decoder on the ViT backbone, losses on pseudo labels, training objective, inference."""

from .losses import cross_entropy, saliency_bce, saliency_target, split_cross_entropy, split_cross_entropy_terms
from .model import SegmentationModel, SegmentationOutput, default_levels, load_segmenter
from .objective import SegmentationObjective
from .predict import predict_probs, predict_split, probs_to_labels

__all__ = [
    "SegmentationModel",
    "SegmentationObjective",
    "SegmentationOutput",
    "cross_entropy",
    "default_levels",
    "load_segmenter",
    "predict_probs",
    "predict_split",
    "probs_to_labels",
    "saliency_bce",
    "saliency_target",
    "split_cross_entropy",
    "split_cross_entropy_terms",
]
