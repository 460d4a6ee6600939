"""Build VOC-style semantic masks for MS COCO (80 classes + background) from the instance annotations.

Input: ``COCO_ROOT/annotations/instances_{split}{year}.json`` and ``COCO_ROOT/{split}{year}/*.jpg``.
Output, a VOC-layout root the toolkit reads directly:

* ``SegmentationClass/<stem>.png``: VOC-palette label PNG per image (``<stem>`` = the image file name without
  its extension, e.g. ``COCO_train2014_000000000009``);
* ``classes.txt``: ``background`` then the 80 category names;
* ``category_map.json``: ``{label: {"coco_id": id, "name": name}}``. COCO's category ids run 1..90 with gaps;
  label ``k`` (1..80) is the ``k``-th category in increasing COCO id order, label 0 is the background;
* ``labels.json``: ``{stem: [labels]}``, the categories of all the image's annotations, crowd ones included
  (images without annotations have no entry: an empty label set is an error for the dataset readers);
* ``ImageSets/Segmentation/{split}.txt``: the images with at least one annotation (the filtered lists WSSS
  papers use; for 2014 they should hold 82,081 / 40,137 ids) and ``{split}_full.txt``: every image;
* ``JPEGImages/<stem>.jpg``: a symlink to (or a copy of) the COCO image.

Painting rule (overlaps and crowds): each annotation is decoded to a binary mask; annotations are painted in
decreasing order of their decoded pixel area (ties: increasing annotation id), each one overwriting what is
already there. So where instances overlap, the smaller one stays on top: the smaller object is usually in
front of the larger one. A non-crowd annotation paints its label; a crowd annotation (``iscrowd=1``) paints
255 (ignore), because its region mixes objects and background. Crowd regions take part in the same area
order, so a small non-crowd instance inside a large crowd region keeps its label. Pixels no annotation
covers are background (0); an image without annotations gets an all-background mask.

Existing masks are skipped on a second run (writes are atomic, so an existing file is complete).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .classes import ClassSet
from .io import IGNORE_INDEX, write_bytes_atomic, write_mask
from .layout import read_labels_file
from .prepare_voc import check_counts, parallel_map, raise_problems, write_id_list, write_labels_json

log = logging.getLogger(__name__)

# Number of images per split of the official releases, to catch truncated downloads.
EXPECTED_COUNTS: dict[int, dict[str, int]] = {
    2014: {"train": 82783, "val": 40504},
    2017: {"train": 118287, "val": 5000},
}


@dataclass(frozen=True)
class CocoSummary:
    """What :func:`prepare_coco` produced."""

    out: Path
    split_sizes: dict[str, int]
    labelled_sizes: dict[str, int]
    num_written: int
    num_skipped: int
    unlabelled: dict[str, list[str]] = field(default_factory=dict)


def _mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError as exc:  # optional dependency (extra ``data``)
        raise DataError(None, "pycocotools is needed to prepare COCO: pip install 'wsss[data]'") from exc
    return mask_api


def category_map(categories: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Map label ``1 + rank of the COCO category id`` to ``{"coco_id", "name"}``, in label order."""
    ids = [int(c["id"]) for c in categories]
    if len(set(ids)) != len(ids):
        raise DataError(None, f"duplicate category ids in the annotation file: {sorted(ids)}")
    by_id = {int(c["id"]): str(c["name"]) for c in categories}
    return {label: {"coco_id": cid, "name": by_id[cid]} for label, cid in enumerate(sorted(by_id), start=1)}


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as an ``(H, W)`` bool mask."""
    mask_api = _mask_api()
    if isinstance(segmentation, list):
        # Polygons with fewer than 3 points have no area, and pycocotools reads a 4-number list as a box.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_api.merge(mask_api.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_api.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        counts = segmentation["counts"]
        rle = {"size": list(segmentation["size"]),
               "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"segmentation size {list(rle['size'])} differs from the image's {[height, width]}")
    with warnings.catch_warnings():
        # pycocotools' Cython decoder trips numpy 2's __array__(copy=...) deprecation; the result is correct.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_api.decode(rle).astype(bool)


def paint_mask(height: int, width: int, annotations: Sequence[tuple[int, int, Any]]) -> np.ndarray:
    """Paint ``(annotation id, value, segmentation)`` triples into an ``(H, W)`` uint8 label mask.

    ``value`` is the label to paint (255 for a crowd). Larger regions are painted first, so smaller ones
    stay on top; ties go by annotation id (see the module docstring).
    """
    decoded = [(ann_id, value, decode_segmentation(seg, height, width)) for ann_id, value, seg in annotations]
    decoded.sort(key=lambda item: (-int(item[2].sum()), item[0]))
    mask = np.zeros((height, width), dtype=np.uint8)
    for _, value, region in decoded:
        mask[region] = value
    return mask


@dataclass(frozen=True)
class _MaskJob:
    stem: str
    height: int
    width: int
    annotations: tuple[tuple[int, int, Any], ...]
    target: Path


def _make_mask(job: _MaskJob) -> tuple[str, str | None]:
    """Write one mask; return (stem, error message or None)."""
    try:
        write_mask(job.target, paint_mask(job.height, job.width, job.annotations))
        return job.stem, None
    except (ValueError, TypeError, KeyError) as exc:
        return job.stem, f"{job.stem}: {exc}"


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(path, "annotation file not found")
    try:
        with path.open() as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read annotation file ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(path, f"not a COCO instances file (no '{key}')")
    return data


def _merge_labels(path: Path, labels: dict[str, list[int]], classes: ClassSet) -> dict[str, list[int]]:
    """Entries of an existing labels file for other splits, plus the non-empty new ones."""
    kept: dict[str, list[int]] = {}
    if path.is_file():
        try:
            kept = {k: list(v) for k, v in read_labels_file(path, classes).items() if k not in labels}
        except DataError as exc:
            raise DataError(path, f"the existing labels file is unusable ({exc.problem}); remove it") from exc
    kept.update({i: lab for i, lab in labels.items() if lab})
    return kept


def _place_image(src: Path, dst: Path, copy: bool) -> None:
    if dst.is_symlink() or dst.exists():
        return
    if copy:
        shutil.copyfile(src, dst)
    else:
        dst.symlink_to(src.resolve())


def prepare_coco(
    coco_root: str | Path,
    year: int = 2014,
    out: str | Path | None = None,
    *,
    splits: Sequence[str] = ("train", "val"),
    copy_images: bool = False,
    workers: int = 0,
    strict: bool = True,
    overwrite: bool = False,
) -> CocoSummary:
    """Build the VOC-layout COCO dataset at ``out`` (default ``COCO_ROOT/voc_layout``); see the module docstring.

    ``workers`` > 0 paints masks in that many processes. With ``strict`` a split whose image count differs
    from the official release is an error, otherwise a warning. Existing masks are kept unless
    ``overwrite``. Every problem is collected and raised together in one :class:`DataError`.
    """
    _mask_api()  # fail early when pycocotools is missing
    if not splits:
        raise DataError(None, "no split to prepare")
    root = Path(coco_root)
    out = Path(out) if out is not None else root / "voc_layout"
    classes: dict[int, dict[str, Any]] | None = None
    jobs: list[_MaskJob] = []
    labels: dict[str, list[int]] = {}
    split_ids: dict[str, list[str]] = {}
    expected = EXPECTED_COUNTS.get(int(year), {})
    problems: list[str] = []
    images_dir = out / "JPEGImages"
    images_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        ann_path = root / "annotations" / f"instances_{split}{year}.json"
        data = _load_json(ann_path)
        split_classes = category_map(data["categories"])
        if classes is not None and split_classes != classes:
            raise DataError(ann_path, "its categories differ from those of the other split")
        classes = split_classes
        to_label = {v["coco_id"]: label for label, v in classes.items()}
        if split in expected:  # the official image count catches a truncated or wrong annotation file
            check_counts({split: len(data["images"])}, {split: expected[split]}, strict, ann_path)
        per_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            per_image.setdefault(int(ann["image_id"]), []).append(ann)

        ids = []
        for im in tqdm(data["images"], desc=f"index {split}{year}", unit="img"):
            stem = Path(im["file_name"]).stem
            if stem in labels:
                problems.append(f"{ann_path}: image {stem} appears twice")
                continue
            src = root / f"{split}{year}" / im["file_name"]
            if not src.is_file():
                problems.append(f"{stem}: image {src} not found")
                continue
            anns = per_image.get(int(im["id"]), [])
            unknown = sorted({int(a["category_id"]) for a in anns} - set(to_label))
            if unknown:
                problems.append(f"{ann_path}: image {stem} has annotations of unknown category ids {unknown}")
                continue
            _place_image(src, images_dir / f"{stem}.jpg", copy_images)
            ids.append(stem)
            labels[stem] = sorted({to_label[int(a["category_id"])] for a in anns})
            target = out / "SegmentationClass" / f"{stem}.png"
            if target.is_file() and not overwrite:
                continue
            painted = tuple(
                (int(a["id"]), IGNORE_INDEX if a.get("iscrowd", 0) else to_label[int(a["category_id"])],
                 a["segmentation"])
                for a in anns
            )
            jobs.append(_MaskJob(stem, int(im["height"]), int(im["width"]), painted, target))
        split_ids[split] = sorted(ids)
        del data, per_image  # the train JSON is large: drop what the jobs do not need before the next split

    sizes = {s: len(ids) for s, ids in split_ids.items()}
    for stem, error in parallel_map(_make_mask, jobs, workers, "COCO masks"):
        if error is not None:
            problems.append(error)
    raise_problems(out, problems, "preparing COCO")

    unlabelled = {s: [i for i in ids if not labels[i]] for s, ids in split_ids.items()}
    for split, ids in split_ids.items():
        write_id_list(out / "ImageSets" / "Segmentation" / f"{split}_full.txt", ids)
        write_id_list(out / "ImageSets" / "Segmentation" / f"{split}.txt", [i for i in ids if labels[i]])
        if unlabelled[split]:
            log.info("%s: %d images without annotations (background-only masks, left out of %s.txt)",
                     split, len(unlabelled[split]), split)
    assert classes is not None
    names = ["background"] + [v["name"] for v in classes.values()]
    write_bytes_atomic(out / "classes.txt", "".join(f"{n}\n" for n in names).encode())
    write_bytes_atomic(out / "category_map.json",
                       json.dumps({str(k): v for k, v in classes.items()}, indent=1).encode())
    write_labels_json(out / "labels.json", _merge_labels(out / "labels.json", labels, ClassSet(tuple(names))))
    return CocoSummary(out=out, split_sizes=sizes,
                       labelled_sizes={s: len(ids) - len(unlabelled[s]) for s, ids in split_ids.items()},
                       num_written=len(jobs), num_skipped=sum(sizes.values()) - len(jobs), unlabelled=unlabelled)
