"""Evaluation: streaming confusion matrices, background-threshold sweeps over saved maps, reports.

``miou`` and every other metric are fractions in [0, 1]; the CLI prints them as percentages.
"""

from .confusion import ConfusionMatrix, iou_from_matrix, metrics_from_matrix, miou_from_matrix, pixel_counts
from .report import format_table, metrics_to_json_dict, write_metrics_json
from .split import evaluate_split, read_split_ids
from .threshold import DEFAULT_THRESHOLDS, ThresholdSweep, threshold_grid

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ConfusionMatrix",
    "ThresholdSweep",
    "evaluate_split",
    "format_table",
    "iou_from_matrix",
    "metrics_from_matrix",
    "metrics_to_json_dict",
    "miou_from_matrix",
    "pixel_counts",
    "read_split_ids",
    "threshold_grid",
    "write_metrics_json",
]
