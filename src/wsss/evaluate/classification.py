"""Multi-label classification metrics: average precision, and mAP as MCTformer and AReAM choose their checkpoint.

:func:`average_precision` has scikit-learn's ``average_precision_score`` semantics (a step-wise sum over the distinct
score thresholds, tied scores taken together). :func:`mean_average_precision` averages it per image over the
classes (MCTformer's ``compute_mAP``, which scores each image's ranking of its classes; images without a positive
are skipped) or per class over the images.
"""

from __future__ import annotations

import numpy as np


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over the distinct thresholds, descending; NaN without a positive."""
    y_true = np.asarray(y_true).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if y_true.shape != scores.shape:
        raise ValueError(f"labels {y_true.shape} and scores {scores.shape} differ in shape")
    positives = int(y_true.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], y_true[order]
    # The last index of each run of tied scores: a threshold admits a whole tie group at once.
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(t)[ends]
    precision = tp / (ends + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray, per: str = "image") -> float:
    """Mean AP of ``(N, C)`` multi-hot ``labels`` and ``scores``: ``per="image"`` (MCTformer) or ``"class"``."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be the same (N, C)")
    if per not in ("image", "class"):
        raise ValueError(f"per must be 'image' or 'class', got {per!r}")
    pairs = zip(labels, scores) if per == "image" else zip(labels.T, scores.T)
    aps = [average_precision(y, s) for y, s in pairs if np.asarray(y).any()]
    if not aps:
        raise ValueError("no image (or class) has a positive label: mAP is undefined")
    return float(np.mean(aps))
