"""Check a VOC-layout dataset split and gather class statistics, reporting every problem found.

Checked, with the readers training uses (:mod:`wsss.data.layout`): the class list; the split list (present,
non-empty, one id per line, no duplicate ids); for each id the image (present under any supported extension,
unambiguous, decodable, within ``PIL.Image.MAX_IMAGE_PIXELS``: a larger one may be a decompression bomb) and the
mask (present, decodable, within the pixel limit, no label outside the class list, same size as the image, at
least one foreground class); and every image-level labels file present (``labels.json`` /
``labels.csv`` at the root, or the one named): readable, known class names or label indices, no image listed
twice, an image file for every entry. The labels file the dataset would use must also label every image of the
split with at least one foreground class (a background label is allowed). A dataset without
``SegmentationClass/`` but with a labels file is an image-label-only dataset: its masks are not required.
Nothing stops at the first problem: the report lists them all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .classes import ClassSet
from .io import IGNORE_INDEX, read_image, read_mask
from .layout import (ALL_IMAGES, LABEL_FILE_NAMES, ImageFolder, find_labels_file, image_folder_classes,
                     is_image_folder_dataset, read_labels_file, read_split)
from .prepare_voc import parallel_map


@dataclass
class Report:
    """Outcome of :func:`check_dataset`.

    ``images_per_class[k]``: images whose mask (or, without masks, whose labels file entry) holds label
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
    image: Path | None  # None when no image file was found (already reported)
    mask: Path | None
    num_classes: int | None
    fg_labels: tuple[int, ...] | None  # None when the class list is unreadable
    max_pixels: int | None = None  # None: PIL.Image.MAX_IMAGE_PIXELS of the reading process


@dataclass
class _Result:
    problems: list[tuple[str, str]]
    counts: np.ndarray | None = None  # (256,) pixel counts of the mask
    labels: tuple[int, ...] | None = None  # foreground labels of the mask


def _problem(exc: DataError) -> tuple[str, str]:
    return str(exc.path), exc.problem


def _check_one(job: _Job) -> _Result:
    """Check one image and its mask, collecting every problem."""
    result = _Result(problems=[])
    image = mask = None
    if job.image is not None:
        try:
            image = read_image(job.image, job.max_pixels)
        except DataError as exc:
            result.problems.append(_problem(exc))
    if job.mask is not None:
        try:
            mask = read_mask(job.mask, job.num_classes, job.max_pixels)
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
    return result


def _check_labels_file(
    path: Path, classes: ClassSet, images: ImageFolder, report: Report
) -> tuple[dict[str, tuple[int, ...]], set[str | None]]:
    """Report the problems of one labels file; return its readable entries and the keys that had problems."""
    found: list[tuple[str | None, str]] = []
    table = read_labels_file(path, classes, found)
    report.problems += [(str(path), message) for _, message in found]
    for image_id in table:
        try:  # an entry without an image: a typo, or an image that was never copied
            images.find(image_id)
        except DataError as exc:
            report.problems.append((str(path), f"{exc.problem} in {exc.path}"))
    return table, {image_id for image_id, _ in found}


def _check_image_folder(root: Path, split: str | None, num_workers: int, labels_file: str | Path | None,
                        limit: int, background: bool) -> Report:
    """A folder of your own images: the labels file (every row), the class list and every labelled image."""
    report = Report(root=root, split=ALL_IMAGES)
    report.has_masks = False
    if split not in (None, ALL_IMAGES):
        report.problems.append((str(root), f"a folder of images without split lists has one split, every labelled "
                                           f"image ({ALL_IMAGES!r}); there is no split {split!r}"))
        return report
    try:
        path = Path(labels_file) if labels_file is not None else find_labels_file(root)
        classes = image_folder_classes(root, path, background=background)
    except DataError as exc:
        report.problems.append(_problem(exc))
        return report
    report.class_names = classes.names
    report.images_per_class = np.zeros(classes.num_classes, dtype=np.int64)
    report.pixels_per_class = np.zeros(classes.num_classes, dtype=np.int64)
    images = ImageFolder(root)
    table, bad_keys = _check_labels_file(path, classes, images, report)
    report.num_images = len(table)
    jobs, sizes = [], Counter()
    for image_id, labels in table.items():
        if not labels:
            report.problems.append((str(path), f"image {image_id!r}: empty label set"))
        report.images_per_class[list(labels)] += 1
        sizes[len(labels)] += 1
        try:
            jobs.append(_Job(image=images.find(image_id), mask=None, num_classes=None, fg_labels=None,
                             max_pixels=limit))
        except DataError:
            pass  # reported with the labels file
    for result in parallel_map(_check_one, jobs, num_workers, "check images"):
        report.problems += result.problems
    report.label_set_sizes = dict(sorted(sizes.items()))
    report.problems.sort()
    return report


def check_dataset(root: str | Path, split: str | None, num_workers: int = 0, labels_file: str | Path | None = None,
                  max_pixels: int | None = None, background: bool = True) -> Report:
    """Check the split ``split`` of the VOC-layout dataset at ``root``; return a :class:`Report`.

    ``labels_file`` names the image-level labels file training uses (default: ``ROOT/labels.json`` or
    ``ROOT/labels.csv``). ``num_workers`` > 0 reads the images in that many processes. An image or mask of more
    than ``max_pixels`` pixels (default ``PIL.Image.MAX_IMAGE_PIXELS``) is a problem: a possible decompression
    bomb, which training's reader refuses too. A folder of your own images with a labels file (no ``ImageSets``)
    is checked as the dataset reader opens it: every labelled image, the classes from ``classes.txt`` or the labels
    file (after a ``background`` class unless ``background`` is False).
    """
    root = Path(root)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if root.is_dir() and is_image_folder_dataset(root):
        return _check_image_folder(root, split, num_workers, labels_file, limit, background)
    if split is None:
        report = Report(root=root, split="")
        report.problems.append((str(root / "ImageSets" / "Segmentation"), "name the split to check (--split)"))
        return report
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
    num_classes = classes.num_classes if classes else 0
    report.images_per_class = np.zeros(num_classes, dtype=np.int64)
    report.pixels_per_class = np.zeros(num_classes, dtype=np.int64)

    split_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    split_problems: list[str] = []
    ids = read_split(split_path, split_problems)
    report.problems += [(str(split_path), problem) for problem in split_problems]
    report.num_images = len(ids)
    if not ids:
        return report

    # Without SegmentationClass/, a labels file alone is the supervision (an image-label-only dataset).
    report.has_masks = (root / "SegmentationClass").is_dir()
    images = ImageFolder(root / "JPEGImages")
    used = Path(labels_file) if labels_file is not None else None  # the labels file training would read
    if used is None:
        try:
            used = find_labels_file(root)
        except DataError as exc:
            if not report.has_masks:  # only then does the dataset read one, and it could not choose
                report.problems.append(_problem(exc))
        else:
            if used is None and not report.has_masks:
                report.problems.append((str(root / "SegmentationClass"),
                                        "mask folder not found (and no labels.json or labels.csv)"))
    present = [root / name for name in LABEL_FILE_NAMES if (root / name).is_file()]
    to_check = ([used] if used is not None else []) + [
        p for p in present if used is None or p.resolve() != used.resolve()]
    entries: dict[str, tuple[int, ...]] | None = None
    if classes is not None:  # without a class list no label can be checked
        for path in to_check:
            table, bad_keys = _check_labels_file(path, classes, images, report)
            if path is not used or None in bad_keys:  # an unreadable file would flag every image again
                continue
            entries = table
            for image_id in ids:
                if image_id in bad_keys:
                    continue  # its row is already reported
                if image_id not in table:
                    report.problems.append((str(path), f"no entry for image {image_id!r} of split {split!r}"))
                elif not table[image_id]:
                    report.problems.append((str(path), f"image {image_id!r}: empty label set"))

    jobs = []
    # The pixel limit is resolved above: worker processes that do not fork would not see one set on PIL here.
    fg = tuple(int(k) for k in classes.fg_labels) if classes else None
    for image_id in ids:
        try:
            image: Path | None = images.find(image_id)
        except DataError as exc:
            report.problems.append(_problem(exc))
            image = None  # its mask is still checked and counted
        mask = root / "SegmentationClass" / f"{image_id}.png" if report.has_masks else None
        jobs.append(_Job(image=image, mask=mask, num_classes=classes.num_classes if classes else None, fg_labels=fg,
                         max_pixels=limit))
    sizes: Counter[int] = Counter()
    for result in parallel_map(_check_one, jobs, num_workers, f"check {split}"):
        report.problems += result.problems
        if result.counts is not None and classes is not None:
            report.pixels_per_class += result.counts[:num_classes]
            report.ignore_pixels += int(result.counts[IGNORE_INDEX])
            report.images_per_class += result.counts[:num_classes] > 0
        if result.labels is not None:
            sizes[len(result.labels)] += 1
    if not report.has_masks and entries is not None:
        for image_id in ids:  # image-label-only: the statistics come from the labels file
            if image_id in entries:
                report.images_per_class[list(entries[image_id])] += 1
                sizes[len(entries[image_id])] += 1
    report.label_set_sizes = dict(sorted(sizes.items()))
    report.problems.sort()
    return report
