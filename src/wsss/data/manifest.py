"""Manifests of output folders: what made the files in a folder, so that a rerun resumes over its own outputs only.

``wsss cam``, ``wsss pseudo`` and ``wsss predict`` keep ``OUT/wsss-manifest.json`` beside their outputs::

    {"format": "wsss-manifest", "version": 1,
     "kind": "pseudo",                          # cam | pseudo | random_walk | predict (ground_truth: true masks, never an output)
     "command": "wsss pseudo", "arguments": {...}, "wsss_version": "0.1.0",   # for the record only
     "data": {"root": "/abs/voc", "split": "train"},
     "settings": {...},                         # everything that decides the output files
     "files": {"a.png": {"size": 812, "mtime_ns": 1700000000000000000, "sha256": "..."}},
     "created": "2024-01-01T00:00:00+00:00", "updated": "..."}

On a rerun into the same folder the kind, dataset root, split and settings are compared: equal, the run resumes and
skips exactly the files the manifest lists (and that are still what was written: same size, and same mtime or same
sha256); different, :class:`OutputConflictError` names every differing key and ``--overwrite`` deletes the listed
files and starts over. A file of the folder that the manifest does not list is never trusted: it is recomputed.
The manifest is rewritten atomically every few files and at the end, so an interrupted run loses only the record of
its last few files (which are then recomputed).

A run sharded over ``torchrun`` ranks has one writer per file: rank r records its files in its own part,
``OUT/wsss-manifest.part-<r>.json``, and rank 0 merges the parts into the manifest at the end
(:func:`consolidate_parts`). Readers see the manifest and its parts as one, so a sharded run killed before the merge
resumes like any other, sharded or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from .. import __version__
from ..errors import ConfigError, DataError
from ..settings import flatten
from .io import write_bytes_atomic

log = logging.getLogger(__name__)

MANIFEST_NAME = "wsss-manifest.json"
PART_PATTERN = "wsss-manifest.part-*.json"
FORMAT = "wsss-manifest"
VERSION = 1
OUTPUT_KINDS = ("cam", "pseudo", "random_walk", "predict")
GROUND_TRUTH_KIND = "ground_truth"
# Folder names of a VOC-layout dataset that hold its images and true masks.
DATASET_FOLDER_NAMES = ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "SegmentationObject")
_SHOWN = 5  # file names quoted in one message


class OutputConflictError(ConfigError):
    """An output folder was made by another command or with other settings than the run asked for."""


# ------------------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a checkpoint's weights file: its content, whatever its path."""
    try:
        return "sha256:" + sha256_file(path)
    except OSError as exc:
        raise DataError(path, f"cannot read the checkpoint to hash it ({exc})") from exc


# ------------------------------------------------------------------------------------------------- settings


def json_value(value: Any) -> Any:
    """``value`` as plain JSON data: paths resolved to absolute strings, tuples as lists, dataclasses as dicts."""
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: json_value(getattr(value, k)) for k in value.__dataclass_fields__}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """The compared part of a manifest, flat: kind, dataset root, split and every setting."""
    data = record.get("data") or {}
    return {"kind": record.get("kind"), "data": data.get("root"), "split": data.get("split"),
            **flatten(record.get("settings") or {})}


def identity_of(folder: str | Path) -> dict[str, Any] | None:
    """What made ``folder`` (kind, data, split and settings, flat), from its manifest; None without one.

    A consumer records it (``wsss pseudo`` records its maps folder's), so a change upstream shows up downstream."""
    record = read_manifest(folder)
    return None if record is None else _identity(record)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (``(absent)`` where one side lacks it)."""

    def shown(record: Mapping[str, Any], key: str) -> str:
        return json.dumps(record[key]) if key in record else "(absent)"

    keys = sorted(set(old) | set(new), key=lambda k: (k not in ("kind", "data", "split"), k))
    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in keys
            if key not in old or key not in new or old[key] != new[key]]


# ------------------------------------------------------------------------------------------------- reading


def manifest_path(folder: str | Path) -> Path:
    """``folder/wsss-manifest.json``."""
    return Path(folder) / MANIFEST_NAME


def part_path(folder: str | Path, rank: int) -> Path:
    """``folder/wsss-manifest.part-<rank>.json``: the record of one rank's files in a sharded run."""
    return Path(folder) / f"wsss-manifest.part-{int(rank)}.json"


def part_paths(folder: str | Path) -> list[Path]:
    """The part manifests of ``folder`` left by a sharded run, in rank order."""
    def rank(path: Path) -> int:
        tail = path.name[len("wsss-manifest.part-"): -len(".json")]
        return int(tail) if tail.isdigit() else -1

    return sorted((p for p in Path(folder).glob(PART_PATTERN) if rank(p) >= 0), key=rank)


def _parse(path: Path) -> dict[str, Any]:
    """One manifest file, checked; a corrupt one is a :class:`DataError`."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot read the output manifest ({exc}); delete it (or pass --overwrite) to start "
                        "over") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(path, f"not a wsss output manifest (no \"format\": \"{FORMAT}\")")
    if record.get("version") != VERSION:
        raise DataError(path, f"manifest version {record.get('version')!r}; this wsss reads version {VERSION}")
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise DataError(path, "manifest \"files\" must map file names to records")
    return record


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` (with the files of its parts) as a dict, None when there is none; a corrupt one,
    or a part made with other settings than the manifest, is a :class:`DataError`."""
    path = manifest_path(folder)
    records = ([(path, _parse(path))] if path.is_file() else []) + [(p, _parse(p)) for p in part_paths(folder)]
    if not records:
        return None
    (base_path, record), parts = records[0], records[1:]
    for part, extra in parts:
        differences = _differences(_identity(record), _identity(extra))
        if differences:
            raise DataError(part, f"made with other settings than {base_path.name} (" + "; ".join(differences)
                            + "): pass --overwrite to start over")
        record["files"].update(extra["files"])
    return record


def consolidate_parts(folder: str | Path) -> None:
    """Merge the part manifests of a sharded run into ``folder``'s manifest (atomically), then delete them."""
    parts = part_paths(folder)
    if not parts:
        return
    record = read_manifest(folder)
    record["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["files"] = dict(sorted(record["files"].items()))
    write_bytes_atomic(manifest_path(folder), (json.dumps(record, indent=1) + "\n").encode())
    for part in parts:
        part.unlink(missing_ok=True)


def _safe_name(folder: Path, name: str) -> Path | None:
    """``folder/name`` for a relative name that stays inside ``folder``; None for any other (a hand-edited one)."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        return None
    return folder / pure


def _file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def _matches(path: Path, entry: Mapping[str, Any]) -> bool:
    """Is ``path`` still the file ``entry`` records? Size and mtime (one stat), else size and content."""
    try:
        stat = path.stat()
    except OSError:
        return False
    if not path.is_file() or stat.st_size != entry.get("size"):
        return False
    if stat.st_mtime_ns == entry.get("mtime_ns"):
        return True
    try:  # touched or copied: trusted only if the bytes are the ones written
        return sha256_file(path) == entry.get("sha256")
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- guards


def _same(path: Path, folder: Path) -> bool:
    """Is resolved ``path`` the folder ``folder`` (also through another name of it, e.g. a bind mount)?"""
    folder = folder.expanduser().resolve()
    if path == folder:
        return True
    try:
        return folder.exists() and path.exists() and os.path.samefile(path, folder)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    """Is resolved ``path`` ``folder`` or below it?"""
    return _same(path, folder) or folder.expanduser().resolve() in path.parents


def dataset_folder_of(folder: str | Path, data_root: str | Path | None = None,
                      mask_dir: str | Path | None = None) -> Path | None:
    """The dataset image or mask folder that ``folder`` is (or lies in), else None.

    Those of ``data_root`` (``JPEGImages``, ``SegmentationClass``, ``mask_dir``), and any folder named like them
    beside an ``ImageSets`` folder (another copy of a VOC-layout dataset)."""
    path = Path(folder).expanduser().resolve()
    candidates: list[Path] = []
    if data_root is not None:
        root = Path(data_root)
        candidates += [root / "JPEGImages", root / "SegmentationClass"]
    if mask_dir is not None:
        candidates.append(Path(mask_dir))
    for candidate in candidates:
        if _inside(path, candidate):
            return candidate
    for ancestor in (path, *path.parents):
        if ancestor.name in DATASET_FOLDER_NAMES and (ancestor.parent / "ImageSets").is_dir():
            return ancestor
    return None


def check_output_folder(out: str | Path, data_root: str | Path, mask_dir: str | Path | None = None,
                        inputs: Sequence[tuple[str | Path | None, str]] = ()) -> None:
    """Refuse an output folder inside the dataset's images or masks, or equal to one of the run's ``inputs``
    (``(folder, what)`` pairs, e.g. the maps a ``wsss pseudo`` reads): a :class:`ConfigError` naming the folder."""
    found = dataset_folder_of(out, data_root, mask_dir)
    if found is not None:
        raise ConfigError(f"--out {out} is inside the dataset folder {found}: outputs written there would mix with "
                          "the dataset's own images or masks (and could be scored as predictions); choose a folder "
                          "outside the dataset's image and mask folders")
    resolved = Path(out).expanduser().resolve()
    for folder, what in inputs:
        if folder is not None and _same(resolved, Path(folder)):
            raise ConfigError(f"--out {out} is the {what} this command reads; choose another folder")


def mark_ground_truth(folder: str | Path, data_root: str | Path | None = None, split: str | None = None,
                      command: str = "") -> None:
    """Write a manifest of kind ``ground_truth`` in a folder of true masks, so ``wsss eval`` refuses to score it
    and the output commands refuse to write into it."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"format": FORMAT, "version": VERSION, "kind": GROUND_TRUTH_KIND, "command": command,
              "arguments": {}, "wsss_version": __version__,
              "data": {"root": None if data_root is None else json_value(Path(data_root)), "split": split},
              "settings": {}, "files": {}, "created": now, "updated": now}
    write_bytes_atomic(manifest_path(folder), (json.dumps(record, indent=1) + "\n").encode())


def find_manifest(folder: str | Path) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, prefix)`` describing the files of ``folder``: its own manifest (prefix ``""``), or, for the
    ``labels`` folder of ``wsss cam``, the cam manifest one level up (prefix ``"labels/"``); ``(None, "")``."""
    folder = Path(folder)
    record = read_manifest(folder)
    if record is not None:
        return record, ""
    if folder.name == "labels":
        parent = read_manifest(folder.parent)
        if parent is not None and parent.get("kind") == "cam":
            return parent, "labels/"
    return None, ""


def untrusted_files(folder: str | Path, names: Iterable[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """``(manifest, names)``: of the files ``names`` of ``folder`` that exist, those its manifest does not vouch
    for (unlisted, or changed since they were written). Without a manifest: ``(None, [])``."""
    folder = Path(folder)
    record, prefix = find_manifest(folder)
    if record is None:
        return None, []
    files = record["files"]
    bad = [name for name in names if (folder / name).exists()
           and not (prefix + name in files and _matches(folder / name, files[prefix + name]))]
    return record, bad


# ------------------------------------------------------------------------------------------------- the manifest


def pending(names: Mapping[int, str], out_dir: str | Path, manifest: "OutputManifest | None") -> list[int]:
    """The keys of ``names`` (image index -> output file name) still to write: with ``manifest``, those it does not
    list unchanged (the others it lists are warned about); without, those with no file in ``out_dir``."""
    if manifest is None:
        return [i for i, name in names.items() if not (Path(out_dir) / name).is_file()]
    manifest.warn_untrusted(names.values())
    return [i for i, name in names.items() if not manifest.trusted(name)]


class OutputManifest:
    """The manifest of one output folder during a run: which files it vouches for, and the record of new ones.

    Made by :meth:`open`; :meth:`trusted` says whether a file can be skipped, :meth:`record` adds a file just
    written (the manifest is rewritten every ``flush_every`` files or ``flush_seconds``), :meth:`flush` writes it
    now. Used as a context manager it flushes on exit, also on an error, so finished files stay listed. With
    ``part`` (a rank of a sharded run) it writes that rank's part manifest instead.
    """

    def __init__(self, out: str | Path, kind: str, settings: Mapping[str, Any], data_root: str | Path, split: str,
                 command: str = "", arguments: Mapping[str, Any] | None = None, files: Mapping[str, Any] | None = None,
                 created: str | None = None, flush_every: int = 100, flush_seconds: float = 10.0,
                 part: int | None = None) -> None:
        self.out = Path(out)
        # A rank of a sharded run writes only its own part, listing only the files it wrote.
        self.part = part
        self.path = manifest_path(self.out) if part is None else part_path(self.out, part)
        self._own: set[str] = set()
        self._absorbed: list[Path] = []
        self.kind = kind
        self.settings = json_value(dict(settings))
        self.data = {"root": json_value(Path(data_root)), "split": split}
        self.command = command
        # The parsed command line, for the record; argparse's callables (the command's function) left out.
        self.arguments = json_value({k: v for k, v in (arguments or {}).items() if not callable(v)})
        self.files: dict[str, dict[str, Any]] = dict(files or {})
        self.created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._pending, self._last_flush = 0, time.monotonic()

    # ---- opening

    @classmethod
    def open(cls, out: str | Path, kind: str, settings: Mapping[str, Any], data_root: str | Path, split: str,
             overwrite: bool = False, command: str = "", arguments: Mapping[str, Any] | None = None,
             part: int | None = None, **kwargs: Any) -> "OutputManifest":
        """The manifest of ``out`` for a run of ``kind`` with ``settings`` on ``data_root``/``split``.

        An existing manifest with the same kind, data, split and settings is continued (resume). One that differs
        raises :class:`OutputConflictError` naming each differing key, unless it lists no file (nothing to lose)
        or ``overwrite`` is set: then the files it lists, and nothing else, are deleted first. A folder of kind
        ``ground_truth`` is refused even with ``overwrite``. ``part``: this rank's part of a sharded run (only one
        rank may pass ``overwrite``, before the others open).
        """
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
        out = Path(out)
        manifest = cls(out, kind, settings, data_root, split, command, arguments, part=part, **kwargs)
        try:
            old = read_manifest(out)
        except DataError:
            if not overwrite:
                raise
            log.warning("%s (or a part of it) is unreadable; --overwrite: starting a new one", manifest_path(out))
            manifest._delete_listed()
            old = None
        if old is not None and old.get("kind") == GROUND_TRUTH_KIND:
            raise ConfigError(f"--out {out} holds ground truth ({manifest.path} says kind {GROUND_TRUTH_KIND!r}); "
                              "choose another folder")
        if old is not None:
            differences = _differences(_identity(old), manifest.identity())
            if overwrite:
                manifest._delete_listed()
            elif not differences:
                manifest.files = dict(old["files"])
                manifest.created = old.get("created") or manifest.created
                # The first write of the manifest holds the parts' files: the parts can go then.
                manifest._absorbed = part_paths(out) if part is None else []
            elif old["files"]:
                made_by = old.get("command") or f"wsss {old.get('kind')}"
                raise OutputConflictError(
                    f"{out} holds {len(old['files'])} files made by {made_by} with other settings ("
                    + "; ".join(differences)
                    + "): pass --overwrite to delete those files and start over, or choose another --out")
            else:
                log.info("%s lists no files yet; starting over with the new settings", manifest.path)
        # Written on the first flush (after the first files, or on leaving the with block), not here: a run that
        # fails on its inputs before writing anything leaves the folder as it was.
        return manifest

    def _delete_listed(self) -> None:
        """--overwrite: delete the files the old manifest and its parts list (only those), then them. Each is read
        on its own, so parts made with other settings are cleared too; an unreadable one lists nothing."""
        deleted = 0
        for record_path in (manifest_path(self.out), *part_paths(self.out)):
            try:
                listed = _parse(record_path)["files"] if record_path.is_file() else {}
            except DataError:
                listed = {}
            for name in listed:
                path = _safe_name(self.out, name)
                if path is None:
                    log.warning("%s lists %r, which is outside the folder: not deleted", record_path, name)
                    continue
                try:
                    path.unlink()
                    deleted += 1
                except FileNotFoundError:
                    pass
            record_path.unlink(missing_ok=True)
        log.info("--overwrite: deleted %d files listed in %s", deleted, manifest_path(self.out))

    # ---- the run

    def identity(self) -> dict[str, Any]:
        """The compared part of this manifest (kind, data, split, settings), flat."""
        return _identity({"kind": self.kind, "data": self.data, "settings": self.settings})

    def trusted(self, name: str) -> bool:
        """Is ``OUT/name`` listed and still the file that was written (the run may skip it)?"""
        entry = self.files.get(name)
        return entry is not None and _matches(self.out / name, entry)

    def untrusted_present(self, names: Iterable[str]) -> list[str]:
        """Of ``names``, those that exist in the folder but are not trusted (they will be recomputed)."""
        return [name for name in names if (self.out / name).exists() and not self.trusted(name)]

    def warn_untrusted(self, names: Iterable[str]) -> int:
        """Log a warning naming how many of ``names`` exist without the manifest vouching for them; their count."""
        bad = self.untrusted_present(names)
        if bad:
            shown = ", ".join(bad[:_SHOWN]) + (", ..." if len(bad) > _SHOWN else "")
            log.warning("%d files in %s are not listed in %s, or changed since (%s): not trusted, they will be "
                        "recomputed and replaced", len(bad), self.out, MANIFEST_NAME, shown)
        return len(bad)

    def record(self, name: str) -> None:
        """Add ``OUT/name``, just written, to the manifest (written out every few files)."""
        self.files[name] = _file_record(self.out / name)
        self._own.add(name)
        self._pending += 1
        if self._pending >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data (a part lists only the files this rank wrote)."""
        files = self.files if self.part is None else {k: v for k, v in self.files.items() if k in self._own}
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "command": self.command,
                "arguments": self.arguments, "wsss_version": __version__, "data": self.data,
                "settings": self.settings, "files": dict(sorted(files.items())), "created": self.created,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def flush(self) -> None:
        """Write the manifest now (atomically)."""
        write_bytes_atomic(self.path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        self._pending, self._last_flush = 0, time.monotonic()
        for path in self._absorbed:
            path.unlink(missing_ok=True)
        self._absorbed = []

    def __enter__(self) -> "OutputManifest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
