"""Check a VOC-layout dataset split and gather class statistics, reporting every problem found.

Checked: the class list, the split list (present, non-empty, no duplicate ids), and for each id the image
(present, decodable), the mask (present, decodable, no label outside the class list, same size as the image,
at least one foreground class) and, when ``labels.json`` exists, its entry (present, known label indices or
class names, at least one foreground class; a background label is allowed). ``labels.csv`` is not checked.
A dataset without ``SegmentationClass/`` but with ``labels.json`` is an image-label-only dataset: its masks
are not required. Nothing stops at the first problem: the report lists them all.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .classes import ClassSet
from .io import IGNORE_INDEX, read_image, read_mask
from .prepare_voc import parallel_map

_NO_ENTRY = object()  # an id with no entry in labels.json (distinct from an empty entry)


@dataclass
class Report:
    """Outcome of :func:`check_dataset`.

    ``images_per_class[k]``: images whose mask (or, without masks, whose ``labels.json`` entry) holds label
    ``k``; ``pixels_per_class[k]``: pixels of label ``k`` over the split; ``label_set_sizes[n]``: images with
    ``n`` foreground classes.
    """

    root: Path
    split: str
    class_names: tuple[str, ...] = ()
    num_images: int = 0
    has_masks: bool = True
    problems: list[tuple[str, str]] = field(default_factory=list)
    images_per_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pixels_per_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignore_pixels: int = 0
    label_set_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def pixel_fraction(self) -> np.ndarray:
        """Share of each class among the labelled (non-ignore) pixels of the split."""
        total = self.pixels_per_class.sum()
        return self.pixels_per_class / total if total else np.zeros(len(self.pixels_per_class))

    def format(self, max_problems: int = 20) -> str:
        """A human-readable summary: counts, the first ``max_problems`` problems and the class table."""
        lines = [f"dataset {self.root}, split '{self.split}': {self.num_images} images, "
                 f"{len(self.class_names)} classes, {'masks' if self.has_masks else 'image labels only'}, "
                 f"{len(self.problems)} problem(s)"]
        if self.problems:
            lines.append(f"problems (first {min(max_problems, len(self.problems))} of {len(self.problems)}):")
            lines += [f"  {path}: {problem}" for path, problem in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        if self.class_names:
            lines.append("class statistics:")
            lines.append(f"  {'label':>5}  {'name':<20} {'images':>7} {'pixels %':>9}")
            fraction = self.pixel_fraction
            for k, name in enumerate(self.class_names):
                pct = f"{100 * fraction[k]:9.2f}" if self.has_masks else f"{'-':>9}"
                lines.append(f"  {k:>5}  {name:<20} {int(self.images_per_class[k]):>7} {pct}")
            if self.has_masks:
                total = int(self.pixels_per_class.sum()) + self.ignore_pixels
                share = 100 * self.ignore_pixels / total if total else 0.0
                lines.append(f"  ignore (255): {share:.2f}% of all pixels")
        if self.label_set_sizes:
            sizes = ", ".join(f"{n}: {c}" for n, c in sorted(self.label_set_sizes.items()))
            lines.append(f"foreground classes per image -> images: {sizes}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    image: Path
    mask: Path | None
    labels_entry: Any  # the labels.json entry, or _NO_ENTRY / None when there is no labels.json
    labels_path: Path | None
    num_classes: int | None
    fg_labels: tuple[int, ...] | None  # None when the class list is unreadable: labels are not validated
    class_names: tuple[str, ...]


@dataclass
class _Result:
    problems: list[tuple[str, str]]
    counts: np.ndarray | None = None  # (256,) pixel counts of the mask
    labels: tuple[int, ...] | None = None  # foreground labels of the image


def _problem(exc: DataError) -> tuple[str, str]:
    return str(exc.path), exc.problem


def _check_entry(job: _Job, image_id: str) -> tuple[list[tuple[str, str]], tuple[int, ...] | None]:
    """Validate the ``labels.json`` entry of one image."""
    where = f"{job.labels_path} [{image_id}]"
    entry = job.labels_entry
    if entry is _NO_ENTRY:
        return [(where, "no entry for this image")], None
    if not isinstance(entry, list) or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in entry):
        return [(where, f"entry must be a list of label indices or class names, got {entry!r}")], None
    names = {n.lower(): k for k, n in enumerate(job.class_names)}
    unknown_names = sorted(v for v in entry if isinstance(v, str) and v.lower() not in names)
    if unknown_names:
        return [(where, f"unknown class names {unknown_names}")], None
    entry = [names[v.lower()] if isinstance(v, str) else v for v in entry]
    known = range(job.num_classes) if job.num_classes is not None else range(IGNORE_INDEX)
    unknown = sorted(v for v in set(entry) if v not in known)
    if unknown:
        return [(where, f"labels {unknown} are outside the class list")], None
    # A background label is allowed (and ignored), as the dataset reader does.
    fg = sorted(set(entry) & set(job.fg_labels)) if job.fg_labels is not None else sorted(set(entry) - {0})
    if not fg:
        return [(where, "empty label set")], ()
    return [], tuple(fg)


def _check_one(job: _Job) -> _Result:
    """Check one image, its mask and its labels entry, collecting every problem."""
    image_id = job.image.stem
    result = _Result(problems=[])
    image = mask = None
    try:
        image = read_image(job.image)
    except DataError as exc:
        result.problems.append(_problem(exc))
    if job.mask is not None:
        try:
            mask = read_mask(job.mask, job.num_classes)
        except DataError as exc:
            result.problems.append(_problem(exc))
    if image is not None and mask is not None and image.shape[:2] != mask.shape:
        result.problems.append((str(job.mask), f"size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                                               f"{image.shape[1]}x{image.shape[0]}"))
    if mask is not None:
        result.counts = np.bincount(mask.ravel(), minlength=256).astype(np.int64)
        fg = job.fg_labels if job.fg_labels is not None else [k for k in range(IGNORE_INDEX) if k]
        result.labels = tuple(k for k in fg if result.counts[k])
        if not result.labels:
            result.problems.append((str(job.mask), "no foreground class in the mask (empty label set)"))
    if job.labels_entry is not None:
        entry_problems, entry_labels = _check_entry(job, image_id)
        result.problems += entry_problems
        if job.mask is None:
            result.labels = entry_labels
    return result


def _read_labels_json(path: Path, report: Report) -> dict[str, Any] | None:
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        report.problems.append((str(path), f"cannot read labels file ({exc})"))
        return None
    if not isinstance(labels, dict):
        report.problems.append((str(path), "labels file must map image ids to label lists"))
        return None
    return labels


def check_dataset(root: str | Path, split: str, num_workers: int = 0) -> Report:
    """Check the split ``split`` of the VOC-layout dataset at ``root``; return a :class:`Report`.

    ``num_workers`` > 0 reads the images in that many processes.
    """
    root = Path(root)
    report = Report(root=root, split=split)
    if not root.is_dir():
        report.problems.append((str(root), "dataset folder not found"))
        return report
    classes = None
    try:
        classes = ClassSet.from_file(root / "classes.txt")
        report.class_names = classes.names
    except DataError as exc:
        report.problems.append((str(root / "classes.txt"), exc.problem))

    split_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_path.is_file():
        report.problems.append((str(split_path), "split list not found"))
        return report
    ids = [line.strip() for line in split_path.read_text().splitlines() if line.strip()]
    if not ids:
        report.problems.append((str(split_path), "split list is empty"))
    for image_id, n in sorted(Counter(ids).items()):
        if n > 1:
            report.problems.append((str(split_path), f"id {image_id} listed {n} times"))
    ids = list(dict.fromkeys(ids))
    report.num_images = len(ids)

    labels_path = root / "labels.json"
    labels = _read_labels_json(labels_path, report) if labels_path.is_file() else None
    # Without SegmentationClass/, labels.json alone is the supervision (an image-label-only dataset).
    report.has_masks = (root / "SegmentationClass").is_dir()
    if not report.has_masks and not labels_path.is_file():
        report.problems.append((str(root / "SegmentationClass"), "mask folder not found (and no labels.json)"))

    fg = tuple(int(k) for k in classes.fg_labels) if classes else None
    jobs = [
        _Job(image=root / "JPEGImages" / f"{i}.jpg",
             mask=root / "SegmentationClass" / f"{i}.png" if report.has_masks else None,
             labels_entry=None if labels is None else labels.get(i, _NO_ENTRY),
             labels_path=labels_path if labels is not None else None,
             num_classes=classes.num_classes if classes else None, fg_labels=fg,
             class_names=classes.names if classes else ())
        for i in ids
    ]
    num_classes = classes.num_classes if classes else 0
    report.images_per_class = np.zeros(num_classes, dtype=np.int64)
    report.pixels_per_class = np.zeros(num_classes, dtype=np.int64)
    sizes: Counter[int] = Counter()
    for result in parallel_map(_check_one, jobs, num_workers, f"check {split}"):
        report.problems += result.problems
        if result.counts is not None and classes is not None:
            report.pixels_per_class += result.counts[:num_classes]
            report.ignore_pixels += int(result.counts[IGNORE_INDEX])
            report.images_per_class += result.counts[:num_classes] > 0
        elif result.labels is not None and classes is not None:
            report.images_per_class[list(result.labels)] += 1
        if result.labels is not None:
            sizes[len(result.labels)] += 1
    report.label_set_sizes = dict(sorted(sizes.items()))
    report.problems.sort()
    return report
