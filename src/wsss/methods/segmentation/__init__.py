"""The segmentation stage as a trainable method: a decoder on the ViT trained on (pseudo) label masks."""

from ...segment.objective import SegmentationObjective, SegmentationOptions
from ..registry import Method, preset_folder, register_method

METHOD = register_method(Method(
    name="segmentation",
    summary="the second stage: a segmentation decoder on the ViT, trained on (pseudo) label masks",
    objective=SegmentationObjective,
    options=SegmentationOptions,
    presets=preset_folder(__name__),
))
