"""Average precision (scikit-learn's semantics, worked by hand) and MCTformer's per-image mAP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss.evaluate.classification import average_precision, mean_average_precision


def test_average_precision_by_hand():
    # ranking: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): AP = 0.5 * 1/1 + 0.5 * 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([0, 1], [0.2, 0.9]) == 1.0
    # a tie of a positive and a negative at the top counts as one threshold: recall 1/2 at precision 1/2
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision([0, 0], [0.3, 0.1]))


def test_average_precision_against_a_threshold_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        y = rng.integers(0, 2, 12)
        if not y.any():
            continue
        s = rng.integers(0, 5, 12) / 4  # many ties
        ap, prev_recall = 0.0, 0.0
        for thr in sorted(set(s), reverse=True):  # every distinct threshold, highest first
            chosen = s >= thr
            recall = (y & chosen).sum() / y.sum()
            precision = (y & chosen).sum() / chosen.sum()
            ap += (recall - prev_recall) * precision
            prev_recall = recall
        assert average_precision(y, s) == pytest.approx(ap)


def test_mean_average_precision_per_image_and_per_class():
    labels = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    scores = np.array([[0.2, 0.9, 0.1], [0.8, 0.7, 0.6], [0.5, 0.5, 0.5]])
    # image 0: its class ranked 2nd of 3 -> 1/2; image 1: positives at ranks 2, 3 -> (1/2 + 2/3) / 2; image 2 skipped
    assert mean_average_precision(labels, scores) == pytest.approx((0.5 + (0.5 + 2 / 3) / 2) / 2)
    per_class = [average_precision(labels[:, c], scores[:, c]) for c in range(3)]
    assert mean_average_precision(labels, scores, per="class") == pytest.approx(np.mean(per_class))
    with pytest.raises(ValueError, match="positive"):
        mean_average_precision(np.zeros((2, 3)), scores[:2])
