"""The segmentation stage: losses on pseudo labels, the training objective and inference (the model itself is
:class:`wsss.models.SegmentationModel`)."""

from .losses import cross_entropy, saliency_bce, saliency_target, split_cross_entropy, split_cross_entropy_terms
from .objective import DecoderOptions, SegmentationObjective, SegmentationOptions
from .predict import predict_probs, predict_split, probs_to_labels

__all__ = [
    "DecoderOptions",
    "SegmentationObjective",
    "SegmentationOptions",
    "cross_entropy",
    "predict_probs",
    "predict_split",
    "probs_to_labels",
    "saliency_bce",
    "saliency_target",
    "split_cross_entropy",
    "split_cross_entropy_terms",
]
