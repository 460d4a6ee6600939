"""The class list of a dataset and the mapping between label indices and classifier outputs.

A dataset whose first class is ``background`` (VOC, COCO, the horses) has a background label 0 that no
classifier output stands for: foreground label ``k`` is classifier output ``k - 1``. A dataset without one
(CamVid) maps label ``k`` to output ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class ClassSet:
    """Names of a dataset's classes in label-index order."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise DataError(None, "the class list is empty")
        if len(set(self.names)) != len(self.names):
            raise DataError(None, f"the class list has duplicate names: {list(self.names)}")
        if len(self.names) > 255:
            raise DataError(None, "at most 255 classes fit in a label PNG (255 is ignore)")

    @classmethod
    def from_file(cls, path: str | Path) -> "ClassSet":
        """Read ``classes.txt``: one class name per line, in index order."""
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "class list not found")
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not names:
            raise DataError(path, "class list is empty")
        return cls(names)

    @property
    def num_classes(self) -> int:
        """Number of label indices, background included."""
        return len(self.names)

    @property
    def has_background(self) -> bool:
        return self.names[0].lower() in ("background", "bg", "_background_")

    @property
    def fg_labels(self) -> np.ndarray:
        """Label indices of the classes a classifier predicts, in output order."""
        start = 1 if self.has_background else 0
        return np.arange(start, self.num_classes, dtype=np.int64)

    @property
    def num_fg(self) -> int:
        """Number of classifier outputs."""
        return len(self.fg_labels)

    @property
    def fg_names(self) -> tuple[str, ...]:
        return self.names[1:] if self.has_background else self.names

    def parse_label(self, token: str | int) -> int:
        """A class name (case-insensitive) or label index as a label index; ``ValueError`` says why not."""
        if isinstance(token, bool):
            raise ValueError(f"label {token!r} is neither a class name nor an index")
        if isinstance(token, int) or (isinstance(token, str) and token.strip().isdigit()):
            label = int(token)
            if not 0 <= label < self.num_classes:
                raise ValueError(f"label index {label} is outside the classes 0..{self.num_classes - 1}")
            return label
        if not isinstance(token, str):
            raise ValueError(f"label {token!r} is neither a class name nor an index")
        lowered = [n.lower() for n in self.names]
        if token.strip().lower() not in lowered:
            raise ValueError(f"unknown class {token!r}; classes are {list(self.names)}")
        return lowered.index(token.strip().lower())

    def label_to_output(self, label: int) -> int:
        """Classifier output index of a foreground label index."""
        out = int(label) - (1 if self.has_background else 0)
        if not 0 <= out < self.num_fg:
            raise ValueError(f"label {label} is not a foreground class of {self.names}")
        return out

    def output_to_label(self, output: int) -> int:
        """Label index of a classifier output index."""
        return int(self.fg_labels[int(output)])
