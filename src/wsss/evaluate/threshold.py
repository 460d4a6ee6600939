"""Sweeping the background threshold of saved localisation maps: one confusion matrix per threshold.

The labelling rule is :func:`wsss.pseudo.labels.maps_to_labels` (the toolkit's only one): with a background class,
the label of a pixel is the argmax over ``[t, maps]`` with the constant background channel first (background wins
ties, ``t`` is compared in the maps' float dtype) and ties between classes go to the lower label; without a
background class (CamVid) it is the argmax over the stored maps. :class:`ThresholdSweep` computes exactly what that
rule gives at every threshold at once.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..data.io import IGNORE_INDEX
from .confusion import (
    ConfusionMatrix,
    all_reduce_sum,
    check_label_range,
    metrics_from_matrix,
    miou_from_matrix,
    pixel_counts,
)

DEFAULT_THRESHOLDS = np.arange(100) / 100  # 0.00, 0.01, ..., 0.99 as in ACR's eval_cam.py


def threshold_grid(start: float, stop: float, step: float) -> np.ndarray:
    """Thresholds ``start, start+step, ...`` below ``stop`` (exclusive), rounded to 10 decimals.

    ``threshold_grid(0, 1, 0.01)`` gives the 100 values 0.00..0.99; AReAM's 0.01..0.79 is
    ``threshold_grid(0.01, 0.80, 0.01)``.
    """
    if step <= 0 or stop <= start:
        raise ValueError(f"need step > 0 and stop > start, got start={start} stop={stop} step={step}")
    # The small slack keeps float noise in (stop - start) / step from dropping or adding a point.
    count = int(np.ceil((stop - start) / step - 1e-9))
    return np.round(start + step * np.arange(count), 10)


def _check_maps(maps: np.ndarray, classes: np.ndarray, num_classes: int | None, has_background: bool) -> None:
    if maps.ndim != 3 or maps.shape[0] != classes.shape[0]:
        raise ValueError(f"maps {maps.shape} and classes {classes.shape} disagree")
    if classes.size and (classes.min() < 0 or (num_classes is not None and classes.max() >= num_classes)):
        raise ValueError(f"map classes {classes.tolist()} are not label indices of the dataset")
    if has_background and np.any(classes == 0):
        raise ValueError("maps must not include the background class 0 (it is the threshold channel)")
    if not has_background and classes.size == 0:
        raise ValueError("without a background class, at least one map is needed to label the pixels")
    if not np.all(np.isfinite(maps)):
        raise ValueError("maps hold NaN or infinite values")


def _score_dtype(maps: np.ndarray) -> np.dtype:
    """The dtype in which maps are compared with thresholds: their own if floating, else float64."""
    return maps.dtype if np.issubdtype(maps.dtype, np.floating) else np.dtype(np.float64)


class ThresholdSweep:
    """One confusion matrix per background threshold, all updated together from each image's maps.

    For every pixel the best map value ``m`` and its label ``L`` are found once; the pixel is
    foreground (``L``) at the thresholds below ``m`` and background at the others. So the pixels are
    bucketed by how many thresholds lie below ``m``, a single bincount over (bucket, gt, L) is taken
    and cumulative sums over the buckets give every threshold's matrix. Thresholds must be strictly
    increasing. Without a background class every threshold gets the same (argmax) matrix.
    """

    def __init__(
        self,
        num_classes: int,
        thresholds: Sequence[float] | np.ndarray | None = None,
        ignore_index: int = IGNORE_INDEX,
        has_background: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> None:
        thresholds = DEFAULT_THRESHOLDS if thresholds is None else thresholds
        self.thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1).copy()
        if self.thresholds.size == 0 or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be a non-empty, strictly increasing sequence")
        # ConfusionMatrix validates the remaining arguments.
        template = ConfusionMatrix(num_classes, ignore_index, class_names)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.has_background = has_background
        self.class_names = template.class_names
        self.matrices = np.zeros((self.thresholds.size, num_classes, num_classes), dtype=np.int64)
        self.num_images = 0

    def update(self, maps: np.ndarray, classes: Sequence[int] | np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``(K, H, W)`` maps with dataset labels ``classes`` and its ``(H, W)`` ground truth."""
        maps = np.asarray(maps)
        classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        gt = np.asarray(gt)
        _check_maps(maps, classes, self.num_classes, self.has_background)
        if maps.shape[1:] != gt.shape:
            raise ValueError(f"maps of size {maps.shape[1:]} do not match the ground truth size {gt.shape}")
        num_c, num_t = self.num_classes, self.thresholds.size
        keep = gt.reshape(-1) != self.ignore_index
        gt_kept = gt.reshape(-1)[keep].astype(np.int64)
        if classes.size == 0:  # nothing but background at every threshold
            counts = pixel_counts(np.zeros_like(gt_kept), gt_kept, num_c, self.ignore_index)
            self.matrices += counts[None]
            self.num_images += 1
            return
        order = np.argsort(classes, kind="stable")  # ties between classes go to the lower label, as in the rule
        maps, classes = maps[order], classes[order]
        flat = maps.reshape(maps.shape[0], gt.size)[:, keep]
        best = np.argmax(flat, axis=0)
        label = classes[best]
        if not self.has_background:
            self.matrices += pixel_counts(label, gt_kept, num_c, self.ignore_index)[None]
            self.num_images += 1
            return
        check_label_range(gt_kept, num_c, "ground truth")
        dtype = _score_dtype(maps)
        peak = np.take_along_axis(flat, best[None], axis=0)[0].astype(dtype)
        # Bucket = how many thresholds lie strictly below the peak (ties stay background).
        bucket = np.searchsorted(self.thresholds.astype(dtype), peak, side="left")
        hist = np.bincount((bucket * num_c + gt_kept) * num_c + label, minlength=(num_t + 1) * num_c * num_c)
        hist = hist.reshape(num_t + 1, num_c, num_c).astype(np.int64)
        # Foreground at threshold i: buckets > i; background: buckets <= i.
        fg = np.cumsum(hist[::-1], axis=0)[::-1][1:]
        bg = np.cumsum(hist.sum(axis=2), axis=0)[:-1]
        self.matrices += fg
        self.matrices[:, :, 0] += bg
        self.num_images += 1

    def _check_compatible(self, other: "ThresholdSweep") -> None:
        if not isinstance(other, ThresholdSweep) or other.matrices.shape != self.matrices.shape:
            raise ValueError("can only merge sweeps with the same classes and thresholds")
        if not np.array_equal(other.thresholds, self.thresholds) or other.ignore_index != self.ignore_index:
            raise ValueError("can only merge sweeps with the same thresholds and ignore_index")
        if other.has_background != self.has_background:
            raise ValueError("can only merge sweeps that agree on the background class")

    def merge(self, other: "ThresholdSweep") -> "ThresholdSweep":
        """Add another sweep's counts into this one (in place) and return ``self``."""
        self._check_compatible(other)
        self.matrices += other.matrices
        self.num_images += other.num_images
        return self

    def __add__(self, other: "ThresholdSweep") -> "ThresholdSweep":
        self._check_compatible(other)
        total = ThresholdSweep(
            self.num_classes, self.thresholds, self.ignore_index, self.has_background, self.class_names
        )
        return total.merge(self).merge(other)

    def all_reduce(self) -> "ThresholdSweep":
        """Sum the counts over all torch.distributed processes; a no-op when not initialised."""
        packed = all_reduce_sum(np.concatenate([self.matrices.reshape(-1), [self.num_images]]))
        self.matrices = packed[:-1].reshape(self.matrices.shape).astype(np.int64)
        self.num_images = int(packed[-1])
        return self

    def reset(self) -> None:
        """Forget every count."""
        self.matrices[:] = 0
        self.num_images = 0

    def confusion(self, index: int) -> ConfusionMatrix:
        """The confusion matrix at ``self.thresholds[index]`` as a :class:`ConfusionMatrix`."""
        matrix = ConfusionMatrix(self.num_classes, self.ignore_index, self.class_names)
        matrix.matrix = self.matrices[index].copy()
        matrix.num_images = self.num_images
        return matrix

    def curve(self, absent_as_zero: bool = False) -> np.ndarray:
        """A ``(T, 2)`` array of ``[threshold, mIoU]`` rows (mIoU as a fraction)."""
        return np.stack([self.thresholds, miou_from_matrix(self.matrices, absent_as_zero)], axis=1)

    def best(self, absent_as_zero: bool = False) -> tuple[float, dict[str, Any]]:
        """The threshold of highest mIoU over the whole grid (the lowest one on a tie) and its metrics."""
        miou = self.curve(absent_as_zero)[:, 1]
        if np.all(np.isnan(miou)):
            raise ValueError("no labelled pixel has been seen; the sweep has no best threshold")
        index = int(np.nanargmax(miou))
        metrics = metrics_from_matrix(self.matrices[index], absent_as_zero)
        metrics["num_images"] = self.num_images
        metrics["threshold"] = float(self.thresholds[index])
        return float(self.thresholds[index]), metrics
