"""A dataset of images with image-level labels and no masks, so users can train on their own photos.

Layout: a folder of images (sub-folders allowed) and a labels file, either

* CSV with a header ``image,labels``: one row per image; ``labels`` holds class names or label indices
  separated by ``;`` (or by ``,`` inside a quoted cell, or by spaces when neither occurs). Use ``;`` when a
  class name contains a space;
* JSON: ``{"<image>": ["<label>", ...]}`` with names or integer indices.

``<image>`` is the file name relative to the image folder, with or without its extension. Label indices are
those of ``classes.txt`` (the same numbers a mask would hold): with a ``background`` first class, the
foreground classes are 1..K-1; a ``background`` label is accepted and ignored, as the VOC-layout reader does.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .classes import ClassSet
from .io import IGNORE_INDEX, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# transform(image (3,H,W) float, mask (H,W) long) -> (image, mask)
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def read_label_table(path: str | Path) -> list[tuple[str, list[str | int], str]]:
    """Read a CSV or JSON labels file as ``(image key, labels, where)`` rows; ``where`` names the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "labels file not found")
    if path.suffix.lower() == ".json":
        return _read_json_table(path)
    if path.suffix.lower() == ".csv":
        return _read_csv_table(path)
    raise DataError(path, "labels file must be .csv or .json")


def _read_json_table(path: Path) -> list[tuple[str, list[str | int], str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(path, 'JSON labels must be an object {"image": [labels]}')
    rows = []
    for key, labels in data.items():
        if not isinstance(labels, list):
            raise DataError(path, f"image {key}: labels must be a list, got {labels!r}")
        rows.append((str(key), labels, f"image {key}"))
    return rows


def _read_csv_table(path: Path) -> list[tuple[str, list[str | int], str]]:
    try:
        with path.open(newline="") as f:
            table = list(csv.reader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read CSV ({exc})") from exc
    if not table or [c.strip().lower() for c in table[0][:2]] != ["image", "labels"]:
        raise DataError(path, "CSV must start with the header 'image,labels'")
    rows = []
    for line, row in enumerate(table[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DataError(path, f"row {line}: expected 2 columns (image, labels), got {len(row)}")
        cell = row[1].strip()
        sep = ";" if ";" in cell else "," if "," in cell else None
        tokens = [t.strip() for t in (cell.split(sep) if sep else cell.split()) if t.strip()]
        rows.append((row[0].strip(), tokens, f"row {line} ({row[0].strip()})"))
    return rows


def _find_image(image_dir: Path, key: str) -> Path | None:
    direct = image_dir / key
    if direct.suffix.lower() in IMAGE_EXTENSIONS and direct.is_file():
        return direct
    for ext in IMAGE_EXTENSIONS:
        for cand in (image_dir / f"{key}{ext}", image_dir / f"{key}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _as_class_set(classes: ClassSet | Sequence[str] | str | Path) -> ClassSet:
    if isinstance(classes, ClassSet):
        return classes
    if isinstance(classes, (str, Path)):
        return ClassSet.from_file(classes)
    return ClassSet(tuple(classes))


class LabelledImageFolder(Dataset):
    """Images with image-level labels only, read the way the VOC-layout reader returns samples.

    ``root`` is the image folder, or a folder holding ``images/`` plus the labels file and ``classes.txt``.
    ``labels_file`` defaults to ``root/labels.csv`` then ``root/labels.json``; ``classes`` (a
    :class:`ClassSet`, a list of names or the path of a ``classes.txt``) defaults to ``classes.txt`` in
    ``root`` or beside the labels file. Every row is checked at construction: an unknown class, a missing
    image, an empty label set or a repeated image raises one :class:`DataError` naming the labels file and
    listing each bad row.

    A sample is ``dict(image=float (3, H, W) in [0, 1], mask=long (H, W) all 255, label=float (num_fg,)
    multi-hot in classifier-output order, id=str)``; ``transform(image, mask) -> (image, mask)``, when given,
    is applied to the tensors (normalisation, crops and flips belong there).
    """

    def __init__(
        self,
        root: str | Path,
        labels_file: str | Path | None = None,
        classes: ClassSet | Sequence[str] | str | Path | None = None,
        transform: Transform | None = None,
    ) -> None:
        root = Path(root)
        self.image_dir = root / "images" if (root / "images").is_dir() else root
        if not self.image_dir.is_dir():
            raise DataError(self.image_dir, "image folder not found")
        self.labels_file = Path(labels_file) if labels_file is not None else self._default_labels_file(root)
        if classes is None:
            found = [p for p in (root / "classes.txt", self.labels_file.parent / "classes.txt") if p.is_file()]
            if not found:
                raise DataError(root / "classes.txt", "class list not found (pass classes=...)")
            classes = found[0]
        self.classes = _as_class_set(classes)
        self.transform = transform
        self.ids: list[str] = []
        self.paths: list[Path] = []
        self.labels: list[tuple[int, ...]] = []
        self._load(read_label_table(self.labels_file))

    @staticmethod
    def _default_labels_file(root: Path) -> Path:
        for name in ("labels.csv", "labels.json"):
            if (root / name).is_file():
                return root / name
        raise DataError(root, "no labels.csv or labels.json found (pass labels_file=...)")

    def _load(self, rows: list[tuple[str, list[Any], str]]) -> None:
        problems: list[str] = []
        seen: set[str] = set()
        for key, tokens, where in rows:
            path = _find_image(self.image_dir, key)
            if path is None:
                problems.append(f"{where}: image not found in {self.image_dir}")
                continue
            image_id = path.relative_to(self.image_dir).with_suffix("").as_posix()
            if image_id in seen:
                problems.append(f"{where}: image {image_id} listed twice")
                continue
            seen.add(image_id)
            labels, bad = set(), False
            for token in tokens:
                try:
                    labels.add(self.classes.parse_label(token))
                except ValueError as exc:
                    problems.append(f"{where}: {exc}")
                    bad = True
            labels &= set(self.classes.fg_labels.tolist())  # a background label carries no information
            if not labels and not bad:
                problems.append(f"{where}: empty label set")
            self.ids.append(image_id)
            self.paths.append(path)
            self.labels.append(tuple(sorted(labels)))
        if not rows:
            problems.append("no images listed")
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(self.labels_file, f"{len(problems)} problem(s):\n  {shown}{more}")

    def __len__(self) -> int:
        return len(self.ids)

    def label_vector(self, index: int) -> torch.Tensor:
        """The multi-hot ``(num_fg,)`` float label of sample ``index``, in classifier-output order."""
        label = torch.zeros(self.classes.num_fg, dtype=torch.float32)
        label[[self.classes.label_to_output(k) for k in self.labels[index]]] = 1.0
        return label

    def __getitem__(self, index: int) -> dict[str, Any]:
        array = read_image(self.paths[index])
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)
        mask = torch.full(array.shape[:2], IGNORE_INDEX, dtype=torch.long)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "label": self.label_vector(index), "id": self.ids[index]}
