"""Build the PASCAL VOC 2012 + SBD ``train_aug`` dataset in the VOC layout the toolkit reads.

Inputs are the two official downloads, unchanged:

* VOC: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt}``;
* SBD: ``benchmark_RELEASE/dataset/{cls/<id>.mat, train.txt, val.txt}``. Each ``.mat`` holds a struct
  ``GTcls`` whose ``Segmentation`` field is an ``(H, W)`` array where a pixel of category ``k`` (1..20, VOC's
  order) has value ``k`` and every other pixel is 0. SBD has no 255 (void) boundary band.

``train_aug`` = (SBD train + SBD val + VOC train) minus VOC val: 10,582 ids. The output root holds
``SegmentationClass/<id>.png`` for every id of ``train_aug``, ``train`` and ``val``: VOC's own mask where VOC
has one (it is finer and carries the 255 boundary band, and it is the ground truth every paper evaluates on),
otherwise the SBD mask converted to a VOC-palette PNG. ``JPEGImages`` is a symlink to VOC's folder (or a copy
of the images used). ``classes.txt`` lists the 21 classes, background first, and ``labels.json`` maps each id
to the sorted foreground label indices present in its mask (the image-level labels).

Finished masks are skipped on a second run (every write is atomic, so an existing file is complete).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .io import IGNORE_INDEX, check_labels, read_mask, write_bytes_atomic, write_mask
from .layout import ImageFolder, read_split

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Sizes of the standard splits; anything else means an incomplete download or a wrong folder.
EXPECTED_COUNTS: dict[str, int] = {"train_aug": 10582, "train": 1464, "val": 1449}


@dataclass(frozen=True)
class VocSummary:
    """What :func:`prepare_voc` produced."""

    out: Path
    split_sizes: dict[str, int]
    num_from_voc: int
    num_from_sbd: int
    num_written: int
    num_skipped: int


def find_voc_root(root: str | Path) -> Path:
    """Return the folder holding ``JPEGImages`` given VOC2012, VOCdevkit or the folder above VOCdevkit."""
    root = Path(root)
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise DataError(root, "not a VOC 2012 folder (expected JPEGImages/ and ImageSets/Segmentation/ in it, "
                          "in VOC2012/ or in VOCdevkit/VOC2012/)")


def find_sbd_root(root: str | Path) -> Path:
    """Return the SBD ``dataset`` folder (holding ``cls/``) given it, or ``benchmark_RELEASE`` or its parent."""
    root = Path(root)
    for cand in (root, root / "dataset", root / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir():
            return cand
    raise DataError(root, "not an SBD folder (expected cls/ in it, in dataset/ or in benchmark_RELEASE/dataset/)")


def write_id_list(path: str | Path, ids: list[str]) -> None:
    """Write a split list atomically, one id per line."""
    write_bytes_atomic(path, "".join(f"{i}\n" for i in ids).encode())


def write_labels_json(path: str | Path, labels: dict[str, list[int]]) -> None:
    """Write image-level labels ``{id: [label indices]}`` atomically, one image per line, ids sorted."""
    lines = [f"{json.dumps(k)}: {json.dumps([int(v) for v in labels[k]])}" for k in sorted(labels)]
    write_bytes_atomic(path, ("{\n" + ",\n".join(lines) + "\n}\n").encode())


def train_aug_ids(sbd_train: list[str], sbd_val: list[str], voc_train: list[str], voc_val: list[str]) -> list[str]:
    """The sorted ``train_aug`` ids: SBD train and val plus VOC train, with every VOC val id removed."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """Read the class segmentation ``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` as ``(H, W)`` uint8."""
    from scipy.io import loadmat  # optional dependency (extra ``data``), needed only here

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "SBD annotation not found")
    try:
        # No squeeze_me: it would also squeeze a 1-pixel-high segmentation to 1-D.
        mat = loadmat(path, struct_as_record=False)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(path, f"cannot read .mat file ({exc})") from exc
    gt = mat.get("GTcls")
    if isinstance(gt, np.ndarray) and gt.size == 1:  # MATLAB stores the struct as a 1x1 array
        gt = gt.flat[0]
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise DataError(path, "no GTcls.Segmentation in the .mat file")
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise DataError(path, f"GTcls.Segmentation must be 2-D, got shape {seg.shape}")
    if seg.size and (seg.min() < 0 or seg.max() > IGNORE_INDEX):
        raise DataError(path, f"GTcls.Segmentation values outside 0..255 ({seg.min()}..{seg.max()})")
    seg = seg.astype(np.uint8)
    check_labels(seg, len(VOC_CLASSES), path)
    return seg


def mask_labels(mask: np.ndarray) -> list[int]:
    """Sorted foreground labels present in a mask (0 = background and 255 = ignore left out)."""
    values = np.unique(mask)
    return [int(v) for v in values if v != 0 and v != IGNORE_INDEX]


@dataclass(frozen=True)
class _MaskJob:
    image_id: str
    source: Path  # VOC PNG or SBD .mat
    target: Path
    overwrite: bool


def _make_mask(job: _MaskJob) -> tuple[str, list[int] | None, bool, str | None]:
    """Write one output mask; return (id, its labels, whether it was written, error message)."""
    try:
        if job.target.is_file() and not job.overwrite:
            mask = read_mask(job.target, len(VOC_CLASSES))
            return job.image_id, mask_labels(mask), False, None
        if job.source.suffix == ".mat":
            mask = read_sbd_mat(job.source)
        else:
            mask = read_mask(job.source, len(VOC_CLASSES))
        write_mask(job.target, mask)
        return job.image_id, mask_labels(mask), True, None
    except DataError as exc:
        return job.image_id, None, False, str(exc)


def _link_or_copy_images(voc: Path, out: Path, ids: list[str], copy: bool) -> list[str]:
    """Give ``out`` a ``JPEGImages`` folder; return a problem for each id whose image is missing or ambiguous."""
    src = voc / "JPEGImages"
    images = ImageFolder(src)
    found: dict[str, Path] = {}
    problems = []
    for i in ids:
        try:
            found[i] = images.find(i)
        except DataError as exc:
            problems.append(f"{i}: {exc}")
    dst = out / "JPEGImages"
    if not copy:
        if dst.is_symlink() or dst.exists():
            if dst.resolve() != src.resolve():
                raise DataError(dst, f"exists and is not a link to {src}; remove it or use --copy-images")
        else:
            dst.symlink_to(src.resolve(), target_is_directory=True)
        return problems
    if dst.is_symlink():
        raise DataError(dst, "is a symlink; remove it to copy the images instead")
    dst.mkdir(parents=True, exist_ok=True)
    for path in tqdm(found.values(), desc="copy images", unit="img"):
        if not (dst / path.name).is_file():
            shutil.copyfile(path, dst / path.name)
    return problems


def raise_problems(where: Path, problems: list[str], task: str, shown: int = 20) -> None:
    """Raise one :class:`DataError` listing the first ``shown`` problems, if there are any."""
    if not problems:
        return
    listed = "\n  ".join(problems[:shown])
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    raise DataError(where, f"{len(problems)} problem(s) while {task}:\n  {listed}{more}")


def check_counts(sizes: dict[str, int], expected: dict[str, int], strict: bool, where: Path) -> None:
    """Compare split sizes with the standard ones: an error when ``strict``, else a logged warning."""
    wrong = {k: (sizes.get(k), n) for k, n in expected.items() if sizes.get(k) != n}
    if not wrong:
        return
    text = ", ".join(f"{k} has {got} ids, expected {n}" for k, (got, n) in wrong.items())
    if strict:
        raise DataError(where, f"{text} (incomplete download or wrong folder? pass --no-strict for a subset)")
    log.warning("%s: %s", where, text)


def prepare_voc(
    voc_root: str | Path,
    sbd_root: str | Path,
    out: str | Path,
    *,
    copy_images: bool = False,
    workers: int = 0,
    strict: bool = True,
    overwrite: bool = False,
) -> VocSummary:
    """Build the VOC + SBD ``train_aug`` dataset at ``out`` (see the module docstring for the layout).

    ``workers`` > 0 converts masks in that many processes. With ``strict`` a split size other than the
    standard 10,582 / 1,464 / 1,449 is an error, otherwise a warning (for subsets). Existing masks are kept
    unless ``overwrite``. Every mask problem is collected and raised together in one :class:`DataError`.
    """
    voc, sbd, out = find_voc_root(voc_root), find_sbd_root(sbd_root), Path(out)
    if out.resolve() == voc.resolve():
        raise DataError(out, "the output folder must differ from the VOC folder")
    seg_lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_split(seg_lists / "train.txt"), read_split(seg_lists / "val.txt")
    sbd_train, sbd_val = read_split(sbd / "train.txt"), read_split(sbd / "val.txt")
    splits = {"train_aug": train_aug_ids(sbd_train, sbd_val, voc_train, voc_val), "train": voc_train,
              "val": voc_val}
    sizes = {name: len(ids) for name, ids in splits.items()}
    check_counts(sizes, EXPECTED_COUNTS, strict, out)

    all_ids = sorted(set().union(*splits.values()))
    voc_masks = voc / "SegmentationClass"
    jobs, problems = [], []
    for i in all_ids:
        src = voc_masks / f"{i}.png"
        if not src.is_file():
            src = sbd / "cls" / f"{i}.mat"
        if not src.is_file():
            problems.append(f"{i}: no mask in {voc_masks} nor {sbd / 'cls'}")
            continue
        jobs.append(_MaskJob(i, src, out / "SegmentationClass" / f"{i}.png", overwrite))
    from_sbd = sum(job.source.suffix == ".mat" for job in jobs)

    out.mkdir(parents=True, exist_ok=True)
    problems += _link_or_copy_images(voc, out, all_ids, copy_images)

    labels: dict[str, list[int]] = {}
    written = 0
    for image_id, lab, was_written, error in parallel_map(_make_mask, jobs, workers, "VOC masks"):
        if error is not None:
            problems.append(error)
        else:
            labels[image_id] = lab
            written += was_written
    raise_problems(out, problems, "preparing VOC")

    for name, ids in splits.items():
        write_id_list(out / "ImageSets" / "Segmentation" / f"{name}.txt", ids)
    write_bytes_atomic(out / "classes.txt", "".join(f"{n}\n" for n in VOC_CLASSES).encode())
    write_labels_json(out / "labels.json", labels)
    return VocSummary(out=out, split_sizes=sizes, num_from_voc=len(jobs) - from_sbd, num_from_sbd=from_sbd,
                      num_written=written, num_skipped=len(jobs) - written)


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in any order, with a progress bar.

    ``workers`` <= 0 runs in this process; otherwise in a pool of that many processes (``fn`` and the items
    must then be picklable: a module-level function and plain data).
    """
    with tqdm(total=len(items), desc=desc, unit="item") as bar:
        if workers <= 0:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with multiprocessing.Pool(workers) as pool:
            for result in pool.imap_unordered(fn, items, chunksize=max(1, min(64, len(items) // (4 * workers)))):
                yield result
                bar.update()
