"""Scoring a folder of predictions against the ground truth of a dataset split.

For each image id of ``ROOT/ImageSets/Segmentation/<split>.txt`` the prediction is
``PRED/<id>.png`` (a label PNG, scored as it is) or ``PRED/<id>.npz`` (maps saved by
:func:`wsss.data.io.save_maps`, labelled with a background threshold, or swept over many). A missing
prediction is an error naming the image: nothing is ever substituted for it. Images are streamed one
at a time (optionally decoded by a thread pool); only confusion counts are kept.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..data.classes import ClassSet
from ..data.io import IGNORE_INDEX, load_maps, read_mask
from ..data.layout import read_split
from ..errors import ConfigError, DataError
from ..pseudo.labels import maps_to_labels
from .confusion import ConfusionMatrix
from .threshold import DEFAULT_THRESHOLDS, ThresholdSweep

Accumulator = ConfusionMatrix | ThresholdSweep


def read_split_ids(data_root: str | Path, split: str) -> list[str]:
    """The image ids of ``ROOT/ImageSets/Segmentation/<split>.txt``, parsed as the dataset reader does."""
    # The same parser as VOCDataset, so evaluation sees exactly the ids training and inference see.
    return read_split(Path(data_root) / "ImageSets" / "Segmentation" / f"{split}.txt")


@dataclass(frozen=True)
class _ImageScorer:
    """Reads one image's ground truth and prediction and adds them to an accumulator."""

    data_root: Path
    pred_dir: Path
    num_classes: int
    has_background: bool
    threshold: float | None
    thresholds: np.ndarray | None  # set for a sweep

    @property
    def wants_maps(self) -> bool:
        return self.threshold is not None or self.thresholds is not None

    def new_accumulator(self) -> Accumulator:
        if self.thresholds is not None:
            return ThresholdSweep(self.num_classes, self.thresholds, IGNORE_INDEX, self.has_background)
        return ConfusionMatrix(self.num_classes, IGNORE_INDEX)

    def prediction_path(self, image_id: str) -> Path:
        png, npz = self.pred_dir / f"{image_id}.png", self.pred_dir / f"{image_id}.npz"
        if self.wants_maps:
            if npz.is_file():
                return npz
            raise DataError(npz, f"no maps for image {image_id!r} (a threshold evaluation needs <id>.npz)")
        if png.is_file():
            return png
        if npz.is_file():
            if self.has_background:
                raise DataError(
                    npz, f"image {image_id!r} has maps, which need a threshold (or a sweep) on this dataset"
                )
            return npz
        raise DataError(png, f"no prediction for image {image_id!r}: expected {png} or {npz}")

    def add(self, image_id: str, acc: Accumulator) -> None:
        """Score one image into ``acc``; a bad prediction raises :class:`DataError` naming its file."""
        pred_path = self.prediction_path(image_id)
        gt_path = self.data_root / "SegmentationClass" / f"{image_id}.png"
        gt = read_mask(gt_path, self.num_classes)
        if pred_path.suffix == ".png":
            # Values are checked where it matters (non-ignored pixels) when counting.
            pred = read_mask(pred_path)
            size = pred.shape
        else:
            maps, classes = load_maps(pred_path, self.num_classes)
            size = maps.shape[1:]
        if size != gt.shape:
            raise DataError(
                pred_path,
                f"prediction is {size[0]}x{size[1]} but the ground truth {gt_path} is {gt.shape[0]}x{gt.shape[1]}",
            )
        try:
            if isinstance(acc, ThresholdSweep):
                acc.update(maps, classes, gt)
                return
            if pred_path.suffix != ".png":
                threshold = self.threshold if self.has_background else None
                pred = maps_to_labels(torch.from_numpy(maps), classes, threshold).numpy().astype(np.uint8)
            acc.update(pred, gt)
        except ValueError as exc:
            raise DataError(pred_path, str(exc)) from exc

    def __call__(self, image_id: str) -> Accumulator:
        acc = self.new_accumulator()
        self.add(image_id, acc)
        return acc


def _scored(scorer: _ImageScorer, ids: Sequence[str], num_workers: int) -> Iterator[Accumulator]:
    """Per-image accumulators from a thread pool, at most ``2 * num_workers`` images in flight."""
    with ThreadPoolExecutor(num_workers) as pool:
        pending = []
        for image_id in ids:
            pending.append(pool.submit(scorer, image_id))
            if len(pending) >= 2 * num_workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def evaluate_split(
    data_root: str | Path,
    split: str,
    pred_dir: str | Path,
    threshold: float | None = None,
    sweep: bool = False,
    thresholds: Sequence[float] | np.ndarray | None = None,
    num_workers: int = 0,
    absent_as_zero: bool = False,
    progress: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score the predictions in ``pred_dir`` against the ground truth of ``split``.

    Label PNGs are scored directly. Maps (``.npz``) need ``threshold`` or ``sweep`` on a dataset with a
    background class and neither without one. ``sweep`` tries every value of ``thresholds`` (default
    0.00..0.99) and reports the best. ``num_workers > 0`` decodes images in that many threads. ``limit`` scores the
    first N images of the split only. In a label PNG, 255 means "no label" (pseudo labels): the metrics are over the
    labelled pixels and ``coverage`` says which fraction of the ground truth's labelled pixels that is.

    Returns the metrics of :meth:`ConfusionMatrix.compute` (``miou`` etc. as fractions) plus
    ``threshold`` (the one used or the best one, else None), ``num_images``, ``class_names`` and, on a
    sweep, ``curve`` (a ``(T, 2)`` array of ``[threshold, mIoU]``).
    """
    data_root, pred_dir = Path(data_root), Path(pred_dir)
    class_set = ClassSet.from_file(data_root / "classes.txt")
    if threshold is not None and sweep:
        raise ConfigError("give either a threshold or a sweep, not both")
    if thresholds is not None and not sweep:
        raise ConfigError("a list of thresholds is only used by a sweep")
    if (threshold is not None or sweep) and not class_set.has_background:
        raise ConfigError(
            f"{data_root / 'classes.txt'} has no background class: its maps are labelled by argmax, "
            "without a threshold"
        )
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder not found")
    scorer = _ImageScorer(
        data_root=data_root,
        pred_dir=pred_dir,
        num_classes=class_set.num_classes,
        has_background=class_set.has_background,
        threshold=None if threshold is None else float(threshold),
        thresholds=None if not sweep else np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds),
    )
    ids = read_split_ids(data_root, split)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        ids = ids[:limit]
    total = scorer.new_accumulator()
    with tqdm(total=len(ids), desc=f"eval {split}", disable=not progress, unit="img") as bar:
        if num_workers > 0:
            for acc in _scored(scorer, ids, num_workers):
                total.merge(acc)
                bar.update()
        else:
            for image_id in ids:
                scorer.add(image_id, total)
                bar.update()
    if isinstance(total, ThresholdSweep):
        _, metrics = total.best(absent_as_zero)
        metrics["curve"] = total.curve(absent_as_zero)
    else:
        metrics = total.compute(absent_as_zero)
        metrics["threshold"] = scorer.threshold
    metrics["class_names"] = list(class_set.names)
    return metrics
