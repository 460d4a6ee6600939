"""A dataset of images with image-level labels and no masks, so users can train on their own photos.

Layout: a folder of images (sub-folders allowed) and a labels file, CSV (``image,labels`` rows) or JSON
(``{"<image>": [labels]}``), read by :func:`wsss.data.layout.read_labels_file` (see there for the formats).

``<image>`` is the file name relative to the image folder, with or without its extension. Label indices are
those of ``classes.txt`` (the same numbers a mask would hold): with a ``background`` first class, the
foreground classes are 1..K-1; a ``background`` label is accepted and ignored, as the VOC-layout reader does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .classes import ClassSet
from .io import IGNORE_INDEX, read_image
from .layout import ImageFolder, find_labels_file, read_labels_file
from .prepare_voc import raise_problems

# transform(image (3,H,W) float, mask (H,W) long) -> (image, mask)
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _as_class_set(classes: ClassSet | Sequence[str] | str | Path) -> ClassSet:
    if isinstance(classes, ClassSet):
        return classes
    if isinstance(classes, (str, Path)):
        return ClassSet.from_file(classes)
    return ClassSet(tuple(classes))


class LabelledImageFolder(Dataset):
    """Images with image-level labels only, read the way the VOC-layout reader returns samples.

    ``root`` is the image folder, or a folder holding ``images/`` plus the labels file and ``classes.txt``.
    ``labels_file`` defaults to ``root/labels.csv`` or ``root/labels.json`` (not both); ``classes`` (a
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
        self._load()

    @staticmethod
    def _default_labels_file(root: Path) -> Path:
        path = find_labels_file(root)
        if path is None:
            raise DataError(root, "no labels.csv or labels.json found (pass labels_file=...)")
        return path

    def _load(self) -> None:
        found: list[tuple[str | None, str]] = []
        table = read_labels_file(self.labels_file, self.classes, found)
        problems = [message for _, message in found]
        images = ImageFolder(self.image_dir)
        for image_id, labels in table.items():
            try:
                path = images.find(image_id)
            except DataError as exc:
                problems.append(f"{exc.problem} in {exc.path}")
                continue
            if not labels:
                problems.append(f"image {image_id!r}: empty label set")
                continue
            self.ids.append(image_id)
            self.paths.append(path)
            self.labels.append(labels)
        if not table and not found:
            problems.append("no images listed")
        raise_problems(self.labels_file, problems, "reading the labels")

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
