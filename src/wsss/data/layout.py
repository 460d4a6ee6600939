"""The one reader of each index file of a dataset: split lists, image files and image-level labels files.

The dataset (:class:`~wsss.data.voc.VOCDataset`, :class:`~wsss.data.labels_only.LabelledImageFolder`),
``wsss check-data`` and the converters all read these files through the functions here, so a file that one of
them accepts means the same thing to all of them.

* Split list (``ROOT/ImageSets/Segmentation/<split>.txt``): :func:`read_split`.
* Image of an id (``ROOT/JPEGImages/<id>.<ext>``, any of :data:`IMAGE_EXTENSIONS` in any letter case):
  :class:`ImageFolder` (many look-ups, one folder listing) or :func:`find_image` (one look-up).
* Image-level labels (``labels.json`` or ``labels.csv``): :func:`find_labels_file` and
  :func:`read_labels_file`; the class names a labels file uses: :func:`label_names`.
* A folder of your own images (no ``ImageSets``, a labels file at its root): :func:`is_image_folder_dataset`.

Every reader raises :class:`~wsss.errors.DataError` naming the file and, for a problem in one line or row,
that line or row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from ..errors import DataError
from .classes import ClassSet

# Matched case-insensitively: ``a.JPG`` is the image of id ``a``.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES: tuple[str, ...] = ("labels.json", "labels.csv")
# First cells that mark the first row of a labels CSV as a header rather than an image.
_CSV_HEADER_WORDS = frozenset({"id", "image", "image_id", "name", "file", "filename"})
_SHOWN = 20  # problems listed in one error message


def _raise_if_any(path: Path, found: Sequence[str]) -> None:
    """One :class:`DataError` for ``path`` listing ``found`` (the problem alone when there is one)."""
    if len(found) == 1:
        raise DataError(path, found[0])
    if found:
        listed = "\n  ".join(found[:_SHOWN])
        more = f"\n  ... and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
        raise DataError(path, f"{len(found)} problem(s):\n  {listed}{more}")


def _read_text(path: Path, what: str, found: list[str]) -> str | None:
    """The text of ``path``, or ``None`` with the reason appended to ``found``."""
    if not path.is_file():
        found.append(f"{what} not found")
        return None
    try:
        return path.read_text(encoding="utf-8-sig")  # files saved by spreadsheets and Windows editors start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        found.append(f"cannot read {what} ({exc})")
        return None


def _image_stem(name: str) -> str:
    """``name`` without an image extension (``a.JPG`` -> ``a``); other suffixes are part of the id."""
    suffix = PurePosixPath(name).suffix
    return name[: -len(suffix)] if suffix.lower() in IMAGE_EXTENSIONS else name


# -------------------------------------------------------------------------------------------- split lists


def _line_id(tokens: list[str]) -> str | None:
    """The id a split-list line names, or ``None`` when the line is not one id."""
    if len(tokens) == 1:
        token = tokens[0]
        # A path (``/JPEGImages/x.jpg``) or a file name (``x.jpg``) names the id of its stem.
        return PurePosixPath(_image_stem(token)).name if "/" in token else _image_stem(token)
    if len(tokens) == 2 and all("/" in t for t in tokens):
        # SegmentationClassAug lists pair the image and mask paths: ``/JPEGImages/x.jpg /SegClsAug/x.png``.
        stems = {PurePosixPath(t).stem for t in tokens}
        return stems.pop() if len(stems) == 1 else None
    return None


def read_split(path: str | Path, problems: list[str] | None = None) -> list[str]:
    """The image ids of a split list, in file order.

    One id per line; blank lines and lines starting with ``#`` are skipped. A line may also be an image path
    (``/JPEGImages/x.jpg`` or ``x.jpg`` names ``x``) or a SegmentationClassAug pair of image and mask paths of
    the same id. Anything else with whitespace in it (``my image 1``, or VOC's ``ImageSets/Main`` class-list
    lines ``id  1`` / ``id -1``) is an error naming the line, never cut to its first word; so are an id listed
    twice, an empty list and a missing or unreadable file.

    Without ``problems`` any problem raises one :class:`DataError` naming the file and listing every problem
    (with its line number). With a list given, the problems are appended to it instead and the ids that
    could be read are returned, each once (for ``check-data``, which reports everything it finds).
    """
    path = Path(path)
    found: list[str] = []
    ids: dict[str, list[int]] = {}  # id -> the lines that list it
    text = _read_text(path, "split list", found)
    if text is not None:
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            tokens = stripped.split()
            image_id = _line_id(tokens)
            if image_id is None:
                # VOC's ImageSets/Main/<class>_<split>.txt lines are "id  1" / "id -1": a classification list,
                # whose -1 images do not hold the class; reading only the id would silently include them.
                hint = (" - an ImageSets/Main class list? segmentation splits list one bare id per line"
                        if len(tokens) == 2 and tokens[1] in ("1", "-1", "0") else "")
                found.append(f"line {number}: {stripped!r} is not one image id (ids hold no whitespace){hint}")
                continue
            ids.setdefault(image_id, []).append(number)
        for image_id, lines in ids.items():
            if len(lines) > 1:
                found.append(f"id {image_id!r} listed {len(lines)} times (lines {', '.join(map(str, lines))})")
        if not ids and not found:
            found.append(f"split {path.stem!r} is empty")
    if problems is None:
        _raise_if_any(path, found)
    else:
        problems.extend(found)
    return list(ids)


# ------------------------------------------------------------------------------------------------- images


class ImageFolder:
    """Finds the image file of an id under one folder, by any of :data:`IMAGE_EXTENSIONS` in any letter case.

    An id may hold ``/`` (``sub/x`` is ``FOLDER/sub/x.png``). Each folder is listed once, on its first look-up,
    and the listing is kept in this object: a split of thousands of images costs one directory listing rather
    than a dozen ``stat`` calls per image. Files added to the folder afterwards are not seen.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._listings: dict[str, dict[str, list[str]] | None] = {}  # sub-folder -> stem -> file names

    def _listing(self, sub: str) -> dict[str, list[str]] | None:
        """``{stem: [file names]}`` of the images of ``root/sub``; ``None`` when there is no such folder."""
        if sub not in self._listings:
            listing: dict[str, list[str]] | None = {}
            try:
                with os.scandir(self.root / sub) as entries:
                    for entry in entries:
                        stem = _image_stem(entry.name)
                        if stem != entry.name and entry.is_file():  # is_file follows symlinks (COCO links)
                            listing.setdefault(stem, []).append(entry.name)
            except (FileNotFoundError, NotADirectoryError):
                listing = None
            except OSError as exc:
                raise DataError(self.root / sub, f"cannot list the image folder ({exc})") from exc
            self._listings[sub] = listing
        return self._listings[sub]

    def find(self, image_id: str) -> Path:
        """The image file of ``image_id``; a missing or ambiguous one (``a.jpg`` and ``a.png``) is a DataError."""
        sub, _, name = image_id.rpartition("/")
        folder = self.root / sub if sub else self.root
        listing = self._listing(sub)
        if listing is None:
            raise DataError(folder, f"image folder not found (looking for image {image_id!r})")
        names = listing.get(name, [])
        if len(names) == 1:
            return folder / names[0]
        if not names:
            others = ", ".join(IMAGE_EXTENSIONS[1:])
            raise DataError(folder, f"no image file for id {image_id!r} ({name}.jpg, {others}, any letter case)")
        names = sorted(names)
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        raise DataError(folder, f"image {image_id!r} is ambiguous: {listed} exist; remove all but one")


def find_image(image_dir: str | Path, image_id: str) -> Path:
    """The image file of ``image_id`` in ``image_dir`` (see :class:`ImageFolder`, which to use for many ids)."""
    return ImageFolder(image_dir).find(image_id)


# ------------------------------------------------------------------------------------------- labels files


def find_labels_file(root: str | Path) -> Path | None:
    """The image-level labels file at a dataset root: ``labels.json`` or ``labels.csv``; ``None`` if neither.

    Both at once is a :class:`DataError`: which one training would use must not be a hidden choice.
    """
    present = [Path(root) / name for name in LABEL_FILE_NAMES if (Path(root) / name).is_file()]
    if len(present) > 1:
        raise DataError(Path(root), f"both {' and '.join(p.name for p in present)} exist; remove one or name the "
                                    "labels file to use")
    return present[0] if present else None


class _JsonObject(list):
    """The ``(key, value)`` pairs of a JSON object, kept as pairs so a repeated key is not silently dropped."""


def _plain(value: Any) -> Any:
    """``value`` with every :class:`_JsonObject` turned back into a dict (for messages)."""
    if isinstance(value, _JsonObject):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _NotALabelList:
    """A JSON value that is no label list, carried to the row check so that the row's id goes with the problem."""

    def __init__(self, value: Any) -> None:
        self.value = value


# A row of a labels file: (where, e.g. "row 3 (a.jpg)", image key, labels or CSV cells, whether they are cells).
_Row = tuple[str, str, list[Any], bool]


def _json_rows(text: str, found: list[tuple[str | None, str]]) -> list[_Row]:
    """The rows of a ``{"<image>": [labels]}`` JSON object."""
    try:
        data = json.loads(text, object_pairs_hook=_JsonObject)
    except ValueError as exc:
        found.append((None, f"cannot read labels file ({exc})"))
        return []
    if not isinstance(data, _JsonObject):
        found.append((None, 'JSON labels must be an object {"<image>": [labels, ...]}'))
        return []
    rows = []
    for key, value in data:
        if isinstance(value, list) and not isinstance(value, _JsonObject):
            labels = [_plain(v) for v in value]
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            labels = [value]  # a single label need not be wrapped in a list
        else:
            labels = [_NotALabelList(_plain(value))]
        rows.append((f"key {key!r}", key, labels, False))
    return rows


def _csv_rows(text: str, found: list[tuple[str | None, str]]) -> list[_Row]:
    """The rows of an ``image,labels`` CSV (the header row is optional)."""
    reader = csv.reader(io.StringIO(text), strict=True)  # a stray quote is an error, not a merged row
    rows: list[_Row] = []
    first = True
    try:
        for row in reader:
            if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                continue
            key = row[0].strip()
            if first and key.lower() in _CSV_HEADER_WORDS:
                first = False
                continue
            first = False
            rows.append((f"row {reader.line_num} ({key})", key, row[1:], True))
    except csv.Error as exc:
        found.append((None, f"cannot read labels file (line {reader.line_num}: {exc})"))
    return rows


class _LabelParser:
    """Turns the labels of one row into sorted foreground label indices, memoising ``ClassSet.parse_label``."""

    def __init__(self, classes: ClassSet) -> None:
        self.classes = classes
        self.foreground = frozenset(int(k) for k in classes.fg_labels)
        # A big labels file repeats a few tokens many times: parse each once.
        self._memo: dict[tuple[type, Any], int | str] = {}

    def _parse(self, token: Any) -> int | str:
        """The label index of ``token``, or why it is none."""
        if isinstance(token, _NotALabelList):
            return f"labels must be a list of class names or indices, got {token.value!r}"
        if not isinstance(token, (str, int)):
            return f"label {token!r} is neither a class name nor an index"
        key = (type(token), token)  # type too: True == 1 but is no label
        if key not in self._memo:
            try:
                self._memo[key] = self.classes.parse_label(token)
            except ValueError as exc:
                self._memo[key] = str(exc)
        return self._memo[key]

    def _cell_tokens(self, cell: str) -> list[str]:
        """The labels of a CSV cell: split on ``;``, ``|`` or ``,``, then on spaces unless a piece is a class name."""
        tokens = []
        for piece in re.split(r"[;|,]", cell):
            words = piece.split()
            # "traffic light" stays one label when it is a class; "cat dog" is two.
            if len(words) > 1 and isinstance(self._parse(piece), int):
                tokens.append(piece)
            else:
                tokens += words
        return tokens

    def __call__(self, values: list[Any], cells: bool) -> tuple[tuple[int, ...], list[str]]:
        """``(foreground labels, problems)``; a background label is allowed and carries no information."""
        tokens = [t for cell in values for t in self._cell_tokens(cell)] if cells else values
        labels, problems = set(), []
        for token in tokens:
            parsed = self._parse(token)
            if isinstance(parsed, str):
                problems.append(parsed)
            elif parsed in self.foreground:
                labels.add(parsed)
        return tuple(sorted(labels)), problems


ALL_IMAGES = "all"  # the split of a folder dataset: every labelled image
BACKGROUND = "background"


def is_image_folder_dataset(root: str | Path) -> bool:
    """Is ``root`` a folder of images with a labels file, rather than a VOC layout? (no ``ImageSets`` folder, and a
    ``labels.json`` or ``labels.csv`` at its root)."""
    root = Path(root)
    return not (root / "ImageSets").is_dir() and any((root / name).is_file() for name in LABEL_FILE_NAMES)


def label_names(path: str | Path) -> list[str]:
    """The class names a labels file uses, sorted (``background`` left out): the classes of a folder dataset
    without ``classes.txt``. CSV cells split on ``;``, ``|``, ``,`` and spaces (a name with a space needs a
    ``classes.txt``); label indices are an error here, since only a ``classes.txt`` says what they mean."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise DataError(path, "labels file must be .csv or .json")
    found: list[tuple[str | None, str]] = []
    reasons: list[str] = []
    text = _read_text(path, "labels file", reasons)
    found += [(None, reason) for reason in reasons]
    rows = [] if text is None else _json_rows(text, found) if suffix == ".json" else _csv_rows(text, found)
    names: dict[str, str] = {}  # lower case -> the first spelling seen (class names match in any letter case)
    for where, _, values, cells in rows:
        tokens = [t for cell in values for t in re.split(r"[;|,\s]+", cell) if t] if cells else values
        for token in tokens:
            if isinstance(token, bool) or not isinstance(token, (str, int)) or str(token).strip().isdigit():
                shown = token.value if isinstance(token, _NotALabelList) else token
                found.append((None, f"{where}: label {shown!r} is not a class name (label indices need a "
                              "classes.txt saying what they mean)"))
            elif token.strip().lower() != BACKGROUND:
                names.setdefault(token.strip().lower(), token.strip())
    _raise_if_any(path, [message for _, message in found])
    if not names:
        raise DataError(path, "the labels file names no class")
    return [names[key] for key in sorted(names)]


def image_folder_classes(root: str | Path, labels_path: str | Path, class_names: Sequence[str] | None = None,
                         background: bool = True) -> ClassSet:
    """The classes of a folder dataset: ``ROOT/classes.txt``, else ``class_names`` (the list a model was trained on),
    else :func:`label_names` of the labels file, after a ``background`` class unless ``background`` is False."""
    if (Path(root) / "classes.txt").is_file():
        return ClassSet.from_file(Path(root) / "classes.txt")
    if class_names is not None:
        return ClassSet(tuple(class_names))
    return ClassSet(((BACKGROUND,) if background else ()) + tuple(label_names(labels_path)))


def read_labels_file(
    path: str | Path, classes: ClassSet, problems: list[tuple[str | None, str]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Image-level labels as ``{image id: sorted foreground label indices}``, in file order.

    Formats (chosen by the file's extension):

    * ``.json``: ``{"<image>": [labels, ...]}`` (a single label may stand alone);
    * ``.csv``: rows ``<image>,<labels>`` with an optional header row (first cell ``image``, ``id``, ``name``,
      ``file`` ...) and ``#`` comment rows. Labels are separated by ``;``, ``|``, ``,`` (in a quoted cell or
      over several cells) or spaces; a piece with a space that is a class name (``traffic light``) is one label.

    ``<image>`` is the id, with or without an image extension (``2007_000032.jpg`` and ``2007_000032`` are the
    same image) and may hold sub-folders (``sub/x.png`` is id ``sub/x``). A label is a class name (any letter
    case) or a label index of ``classes`` (see :meth:`ClassSet.parse_label`); a background label is allowed and
    dropped, so an image may map to ``()``: whether an empty label set is an error is the caller's call (only
    the images it uses matter). Unknown classes, malformed rows or values and an image listed twice (also as
    ``a`` and ``a.jpg``) are problems naming the row (CSV) or key (JSON).

    Without ``problems`` any problem raises one :class:`DataError` naming the file and listing them all. With
    a list given, ``(image id or None for the whole file, message)`` pairs are appended to it instead and the
    rows without a problem are returned.
    """
    path = Path(path)
    found: list[tuple[str | None, str]] = []
    table: dict[str, tuple[int, ...]] = {}
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        found.append((None, "labels file must be .csv or .json"))
        text = None
    else:
        reasons: list[str] = []
        text = _read_text(path, "labels file", reasons)
        found += [(None, reason) for reason in reasons]
    rows = [] if text is None else _json_rows(text, found) if suffix == ".json" else _csv_rows(text, found)
    parse = _LabelParser(classes)
    where_of: dict[str, str] = {}
    for where, key, values, cells in rows:
        image_id = _image_stem(key.strip().replace("\\", "/").removeprefix("./"))
        if not image_id:
            found.append((None, f"{where}: no image name"))
            continue
        if image_id in where_of:
            found.append((image_id, f"{where}: image {image_id!r} is already listed in {where_of[image_id]}"))
            continue
        where_of[image_id] = where
        labels, bad = parse(values, cells)
        if bad:
            found += [(image_id, f"{where}: {message}") for message in bad]
        else:
            table[image_id] = labels
    if problems is None:
        _raise_if_any(path, [message for _, message in found])
    else:
        problems.extend(found)
    return table
