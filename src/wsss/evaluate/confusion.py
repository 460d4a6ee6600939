"""A streaming confusion matrix and the segmentation metrics derived from it.

Rows are ground-truth classes, columns predicted classes; counts are int64. Pixels whose ground truth
equals ``ignore_index`` are skipped. A prediction of ``ignore_index`` means "no label" (pseudo labels leave the
pixels they are unsure of unlabelled): such pixels are left out of the matrix and counted apart, so that
:meth:`ConfusionMatrix.compute` reports the mIoU over the labelled pixels and the ``coverage``, the fraction of the
ground truth's labelled pixels the prediction labels. Any other value outside ``0..C-1`` is an error.

Classes absent from both the ground truth and the prediction have an undefined IoU. By default
(the mmsegmentation convention) it is NaN and left out of the mean. The PSA/ACR/AReAM evaluation
scripts divide by ``union + 1e-10`` instead, which counts such a class as 0 in the mean; pass
``absent_as_zero=True`` to :meth:`ConfusionMatrix.compute` to reproduce their numbers. The two agree
whenever every class occurs somewhere in the evaluated set.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..data.io import IGNORE_INDEX


def _safe_ratio(num: np.ndarray, den: np.ndarray, absent_as_zero: bool) -> np.ndarray:
    """``num / den`` elementwise, NaN (or 0) where ``den`` is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, 0.0 if absent_as_zero else np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (without a warning) where every entry is NaN."""
    finite = ~np.isnan(values)
    total = np.where(finite, values, 0.0).sum(-1)
    return _safe_ratio(total, finite.sum(-1), absent_as_zero=False)


def iou_from_matrix(matrix: np.ndarray, absent_as_zero: bool = False) -> np.ndarray:
    """Per-class IoU of one ``(C, C)`` matrix or a stack ``(..., C, C)``; see the module doc for NaN."""
    matrix = np.asarray(matrix)
    tp = np.diagonal(matrix, axis1=-2, axis2=-1)
    union = matrix.sum(-1) + matrix.sum(-2) - tp
    return _safe_ratio(tp, union, absent_as_zero)


def miou_from_matrix(matrix: np.ndarray, absent_as_zero: bool = False) -> np.ndarray:
    """Mean IoU (a fraction) of one matrix or of each matrix in a stack."""
    return _mean(iou_from_matrix(matrix, absent_as_zero))


def metrics_from_matrix(matrix: np.ndarray, absent_as_zero: bool = False) -> dict[str, Any]:
    """All metrics of a ``(C, C)`` confusion matrix (rows = ground truth, columns = prediction).

    Returns ``miou`` (fraction in [0, 1]), per-class ``iou``, ``precision`` and ``recall`` arrays,
    ``pixel_accuracy``, ``mean_accuracy`` (mean per-class recall) and ``confusion_matrix``. Undefined
    per-class values are NaN, or 0 with ``absent_as_zero`` (the PSA/ACR/AReAM convention).
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    tp = np.diagonal(matrix)
    iou = iou_from_matrix(matrix, absent_as_zero)
    recall = _safe_ratio(tp, matrix.sum(1), absent_as_zero)
    precision = _safe_ratio(tp, matrix.sum(0), absent_as_zero)
    return {
        "miou": float(_mean(iou)),
        "iou": iou,
        "pixel_accuracy": float(_safe_ratio(tp.sum(), matrix.sum(), absent_as_zero=False)),
        "mean_accuracy": float(_mean(recall)),
        "precision": precision,
        "recall": recall,
        "confusion_matrix": matrix.copy(),
    }


def check_label_range(values: np.ndarray | torch.Tensor, num_classes: int, what: str) -> None:
    """Raise ``ValueError`` if ``values`` (already free of ignored pixels) leave ``0..num_classes-1``."""
    if values.numel() if isinstance(values, torch.Tensor) else values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{what} holds values outside 0..{num_classes - 1} at non-ignored pixels "
                f"(min {low}, max {high})"
            )


def _uint8_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """:func:`pixel_counts` of flat uint8 arrays via a joint 256x256 histogram.

    Selecting the non-ignored pixels with a boolean mask costs ~10x more than this single bincount of
    ``gt * 256 + pred`` over every pixel; the ranges are then checked on the histogram itself.
    """
    joint = np.bincount((gt.astype(np.uint16) << 8) | pred, minlength=256 * 256).reshape(256, 256)
    joint[ignore_index] = 0
    joint[:, ignore_index] = 0  # "no label" predictions (counted by unlabelled_count)
    if joint[num_classes:].any():
        bad = np.flatnonzero(joint[num_classes:].sum(1)) + num_classes
        raise ValueError(f"ground truth holds values {bad.tolist()} outside 0..{num_classes - 1} (and ignore)")
    if joint[:, num_classes:].any():
        bad = np.flatnonzero(joint[:, num_classes:].sum(0)) + num_classes
        raise ValueError(
            f"prediction holds values {bad.tolist()} outside 0..{num_classes - 1} at non-ignored pixels"
        )
    return joint[:num_classes, :num_classes].astype(np.int64)


def pixel_counts(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """The ``(C, C)`` int64 confusion counts of one prediction against its ground truth.

    Both arrays may have any (equal) shape and be numpy arrays or torch tensors (on any device; only
    the ``C*C`` counts come back to the host). Pixels predicted ``ignore_index`` ("no label") are left out. A
    prediction or ground-truth value outside ``0..num_classes-1`` (other than ``ignore_index``) at a pixel whose
    ground truth is not ``ignore_index`` raises ``ValueError``.
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        device = pred.device if isinstance(pred, torch.Tensor) else gt.device
        pred_t = torch.as_tensor(pred, device=device).reshape(-1)
        gt_t = torch.as_tensor(gt, device=device).reshape(-1)
        keep = (gt_t != ignore_index) & (pred_t != ignore_index)
        g, p = gt_t[keep].long(), pred_t[keep].long()
        check_label_range(g, num_classes, "ground truth")
        check_label_range(p, num_classes, "prediction")
        counts = torch.bincount(g * num_classes + p, minlength=num_classes * num_classes)
        return counts.cpu().numpy().astype(np.int64).reshape(num_classes, num_classes)
    pred_a, gt_a = np.asarray(pred).reshape(-1), np.asarray(gt).reshape(-1)
    if pred_a.dtype == np.uint8 and gt_a.dtype == np.uint8 and 0 <= ignore_index <= 255:
        return _uint8_counts(pred_a, gt_a, num_classes, ignore_index)
    keep = (gt_a != ignore_index) & (pred_a != ignore_index)
    g, p = gt_a[keep].astype(np.int64), pred_a[keep].astype(np.int64)
    check_label_range(g, num_classes, "ground truth")
    check_label_range(p, num_classes, "prediction")
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.astype(np.int64).reshape(num_classes, num_classes)


def unlabelled_count(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor,
                     ignore_index: int = IGNORE_INDEX) -> int:
    """How many pixels with a ground-truth label the prediction leaves unlabelled (``ignore_index``)."""
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        pred, gt = torch.as_tensor(pred), torch.as_tensor(gt, device=torch.as_tensor(pred).device)
        return int(((gt != ignore_index) & (pred == ignore_index)).sum())
    return int(np.count_nonzero((np.asarray(gt) != ignore_index) & (np.asarray(pred) == ignore_index)))


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Sum an int64 array over the processes of the default torch.distributed group (if any)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return array
    device = torch.device("cpu")
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.cpu().numpy()


class ConfusionMatrix:
    """Accumulates a ``(C, C)`` int64 confusion matrix over images (rows = ground truth)."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is one of the {num_classes} class labels")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = None if class_names is None else tuple(class_names)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.unlabelled = 0  # ground-truth pixels the predictions left without a label
        self.num_images = 0

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        """Add one prediction / ground-truth pair (any equal shapes; see :func:`pixel_counts`)."""
        self.matrix += pixel_counts(pred, gt, self.num_classes, self.ignore_index)
        self.unlabelled += unlabelled_count(pred, gt, self.ignore_index)
        self.num_images += 1

    def _check_compatible(self, other: "ConfusionMatrix") -> None:
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            raise ValueError("can only merge confusion matrices with the same number of classes")
        if other.ignore_index != self.ignore_index:
            raise ValueError("can only merge confusion matrices with the same ignore_index")

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts into this one (in place) and return ``self``."""
        self._check_compatible(other)
        self.matrix += other.matrix
        self.unlabelled += other.unlabelled
        self.num_images += other.num_images
        return self

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self._check_compatible(other)
        total = ConfusionMatrix(self.num_classes, self.ignore_index, self.class_names)
        return total.merge(self).merge(other)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts over all torch.distributed processes; a no-op when not initialised."""
        packed = np.concatenate([self.matrix.reshape(-1), [self.unlabelled, self.num_images]])
        packed = all_reduce_sum(packed)
        self.matrix = packed[:-2].reshape(self.num_classes, self.num_classes).astype(np.int64)
        self.unlabelled, self.num_images = int(packed[-2]), int(packed[-1])
        return self

    def reset(self) -> None:
        """Forget every count."""
        self.matrix[:] = 0
        self.unlabelled = 0
        self.num_images = 0

    def compute(self, absent_as_zero: bool = False) -> dict[str, Any]:
        """The metrics of :func:`metrics_from_matrix` (over the labelled pixels), ``coverage`` (the fraction of the
        ground truth's labelled pixels that the predictions label; 1 for full label maps) and ``num_images``."""
        metrics = metrics_from_matrix(self.matrix, absent_as_zero)
        labelled = int(self.matrix.sum())
        metrics["coverage"] = labelled / (labelled + self.unlabelled) if labelled + self.unlabelled else float("nan")
        metrics["num_images"] = self.num_images
        return metrics
