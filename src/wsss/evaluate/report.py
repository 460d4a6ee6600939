"""Human-readable tables and the ``metrics.json`` file of an evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.io import write_bytes_atomic


def _percent(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def _per_class(values: Any, class_names: Sequence[str]) -> dict[str, float | None]:
    """``{name: value}`` with NaN turned into None (JSON has no NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(class_names),):
        raise ValueError(f"{values.shape[0]} per-class values for {len(class_names)} class names")
    return {name: (None if math.isnan(v) else float(v)) for name, v in zip(class_names, values)}


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def format_table(metrics: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """A per-class table of IoU, precision and recall (in %) followed by the summary lines.

    Undefined values (a class absent from both ground truth and prediction) are shown as ``-``.
    """
    width = max(len("class"), *(len(name) for name in class_names))
    rows = [f"{'class':<{width}}  {'IoU %':>7}  {'prec. %':>7}  {'recall %':>8}", "-" * (width + 28)]
    for i, name in enumerate(class_names):
        iou, prec, rec = (float(metrics[key][i]) for key in ("iou", "precision", "recall"))
        rows.append(f"{name:<{width}}  {_percent(iou):>7}  {_percent(prec):>7}  {_percent(rec):>8}")
    rows.append("-" * (width + 28))
    rows.append(f"mIoU:           {_percent(metrics['miou'])}")
    rows.append(f"pixel accuracy: {_percent(metrics['pixel_accuracy'])}")
    if "mean_accuracy" in metrics:
        rows.append(f"mean accuracy:  {_percent(metrics['mean_accuracy'])}")
    if metrics.get("coverage") is not None and metrics["coverage"] < 1:
        rows.append(f"coverage:       {_percent(metrics['coverage'])} of the labelled pixels (255 = no label)")
    if metrics.get("threshold") is not None:
        rows.append(f"threshold:      {float(metrics['threshold']):.2f}")
    if "num_images" in metrics:
        rows.append(f"images:         {int(metrics['num_images'])}")
    return "\n".join(rows)


def metrics_to_json_dict(
    metrics: Mapping[str, Any], class_names: Sequence[str], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON-ready form of ``metrics``: fractions, per-class dicts keyed by name, None for NaN."""
    out: dict[str, Any] = {
        "miou": _scalar(metrics["miou"]),
        "iou": _per_class(metrics["iou"], class_names),
        "pixel_accuracy": _scalar(metrics["pixel_accuracy"]),
        "precision": _per_class(metrics["precision"], class_names),
        "recall": _per_class(metrics["recall"], class_names),
    }
    if "mean_accuracy" in metrics:
        out["mean_accuracy"] = _scalar(metrics["mean_accuracy"])
    if "coverage" in metrics:
        out["coverage"] = _scalar(metrics["coverage"])
    if metrics.get("threshold") is not None:
        out["threshold"] = float(metrics["threshold"])
    if "num_images" in metrics:
        out["num_images"] = int(metrics["num_images"])
    if metrics.get("curve") is not None:
        out["curve"] = [[float(t), _scalar(m)] for t, m in np.asarray(metrics["curve"], dtype=np.float64)]
    if metrics.get("confusion_matrix") is not None:
        out["confusion_matrix"] = np.asarray(metrics["confusion_matrix"]).astype(np.int64).tolist()
    out["class_names"] = list(class_names)
    out.update(extra or {})
    return out


def write_metrics_json(
    path: str | Path,
    metrics: Mapping[str, Any],
    class_names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write :func:`metrics_to_json_dict` to ``path`` atomically (keys of ``extra`` are added last)."""
    data = metrics_to_json_dict(metrics, class_names, extra)
    text = json.dumps(data, indent=2, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))
