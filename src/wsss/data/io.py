"""Reading and writing the on-disk formats: RGB images, label PNGs and saved maps.

Every reader raises :class:`wsss.errors.DataError` naming the file on a missing, corrupt or
inconsistent input, and on an image larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible decompression
bomb: PIL itself only warns up to twice that size and would decode it); every writer is atomic (write to a
temporary file, then rename), so a job that is killed never leaves a half-written output that a resumed job
would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map as an ``(n, 3)`` uint8 array (index 255 is the void colour)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where the system allows."""
    try:  # Linux: /proc says it; the os.umask round trip below briefly changes it for every thread
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_like_new_file(fd_or_path: int | str | Path) -> None:
    """Give a file made by ``tempfile.mkstemp`` (always 0600) the mode ``open()`` would: ``0o666 & ~umask``, so
    an output renamed into place is as readable as any other file the user writes."""
    os.chmod(fd_or_path, 0o666 & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (with the umask's mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        make_like_new_file(fd)
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# PIL's decompression-bomb messages carry the pixel count: "Image size (400000000 pixels) exceeds ...".
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> str:
    """The problem of an image over the pixel limit."""
    dims = f"{size[0]}x{size[1]} = " if size is not None else ""
    count = f"{dims}{pixels} pixels" if pixels is not None else f"more than {2 * limit} pixels"
    return (f"image is {count}, over the limit of {limit} pixels (a possible decompression bomb; "
            "raise PIL.Image.MAX_IMAGE_PIXELS to read larger images)")


def open_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """``Image.open(path)`` (header only, nothing decoded) refusing images over the pixel limit.

    The limit is ``max_pixels``, else ``PIL.Image.MAX_IMAGE_PIXELS`` at call time (``None`` there: no limit).
    Over it is a :class:`DataError` naming the file and the pixel count: PIL only warns between one and two
    times its limit and would decode the image, taking gigabytes; above twice it raises an exception of its own.
    Other decoding problems are raised as PIL raises them (the readers turn them into ``DataError``).
    """
    path = Path(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # The warning level is checked below, as an error; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        # PIL refused at its own limit, which may be below a larger max_pixels: name the lower one.
        pil_limit = Image.MAX_IMAGE_PIXELS or 0
        shown = pil_limit if limit is None else min(limit, pil_limit)
        raise DataError(path, _too_large(int(found.group(1)) if found else None, shown)) from None
    pixels = max(1, im.width) * max(1, im.height)
    if limit is not None and pixels > limit:
        im.close()
        raise DataError(path, _too_large(pixels, limit, im.size))
    return im


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as an ``(H, W, 3)`` uint8 RGB array (over the pixel limit: see :func:`open_image`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    try:
        with open_image(path, max_pixels) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"cannot decode image ({exc})") from exc


def read_mask(path: str | Path, num_classes: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Read a label PNG (palette or grey) as an ``(H, W)`` uint8 array of class indices.

    With ``num_classes`` given, any value other than ``0..num_classes-1`` and 255 is an error. A mask over the
    pixel limit is an error (see :func:`open_image`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "mask file not found")
    try:
        with open_image(path, max_pixels) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(path, f"mask must be a palette or greyscale PNG, got mode {im.mode}")
            im.load()
            mask = np.asarray(im)
    except DataError:  # already names the problem; DataError is a ValueError, so it must not be re-wrapped
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"cannot decode mask ({exc})") from exc
    if mask.ndim != 2:
        raise DataError(path, f"mask must be 2-D, got shape {mask.shape}")
    if mask.max(initial=0) > 255:
        raise DataError(path, f"mask values exceed 255 (max {int(mask.max())})")
    mask = mask.astype(np.uint8)
    if num_classes is not None:
        check_labels(mask, num_classes, path)
    return mask


def check_labels(mask: np.ndarray, num_classes: int, path: str | Path | None = None) -> None:
    """Raise :class:`DataError` if ``mask`` holds a value outside ``0..num_classes-1`` and 255."""
    if mask.dtype == np.uint8:  # a 256-bin histogram is several times faster than np.unique
        values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            path, f"mask holds labels {bad.tolist()} outside the {num_classes} classes (and 255 = ignore)"
        )


def read_palette(path: str | Path) -> np.ndarray | None:
    """The ``(256, 3)`` uint8 colours of a palette PNG (entries it leaves out: VOC's), or None for a mask without
    a palette (greyscale) or no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open_image(path) as im:
            colours = im.getpalette("RGB") if im.mode == "P" else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"cannot decode mask ({exc})") from exc
    if not colours:
        return None
    palette = voc_palette()
    given = np.asarray(colours[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    palette[: len(given)] = given
    return palette


def write_mask(path: str | Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write an ``(H, W)`` label array as a palette PNG, atomically: ``palette`` ``(256, 3)`` uint8 (a dataset's own,
    :func:`read_palette`), VOC's when None."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError("mask values must lie in 0..255")
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    colours = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    if colours.shape != (256, 3):
        raise ValueError(f"a palette has 256 RGB colours, got shape {colours.shape}")
    im.putpalette(colours.reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def save_maps(path: str | Path, maps: np.ndarray, classes: np.ndarray | list[int], stride: int = 1) -> None:
    """Save per-class localisation maps as ``.npz``: ``maps`` (K, H, W) float16 and ``classes`` (K,).

    ``classes`` are dataset label indices (for VOC, 1..20; 0 is the background and is never stored).
    ``stride > 1`` stores the maps compactly, area-averaged to ``ceil(H / stride) x ceil(W / stride)`` with the
    full ``size`` beside them; :func:`load_maps` upsamples them back (a stride of a quarter patch keeps 4x the token
    grid, finer than any map has detail, at 1/16 of the pixels).
    """
    maps = np.asarray(maps, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != classes.shape[0]:
        raise ValueError(f"maps {maps.shape} and classes {classes.shape} disagree")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    arrays = {"classes": classes}
    if stride > 1:
        size = maps.shape[1:]
        small = (-(-size[0] // stride), -(-size[1] // stride))
        reduced = F.interpolate(torch.from_numpy(maps)[None], size=small, mode="area")[0]
        arrays.update(maps=reduced.numpy().astype(np.float16), size=np.asarray(size, dtype=np.int64))
    else:
        arrays["maps"] = maps.astype(np.float16)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Compact maps ``(K, h, w)`` bilinearly upsampled to ``size`` (half-pixel centres, as they were averaged)."""
    if maps.shape[0] == 0:
        return np.zeros((0, *size), dtype=np.float32)
    full = F.interpolate(torch.from_numpy(maps.astype(np.float32))[None], size=tuple(size), mode="bilinear",
                         align_corners=False)[0]
    return full.clamp_(0.0, 1.0).numpy()


def read_npz(path: str | Path, keys: tuple[str, ...], what: str,
             optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (and those of ``optional`` it holds) of an ``.npz`` file, never unpickled; a missing
    file or key is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if any(k not in z for k in keys):
                raise DataError(path, f"{what} file must hold {list(keys)}, found {sorted(z.files)}")
            return {k: z[k] for k in (*keys, *optional) if k in z}
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(path, f"cannot read {what} file ({exc})") from exc


def load_maps(path: str | Path, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load maps saved by :func:`save_maps` as ``(maps float32 (K,H,W), classes int64 (K,))``.

    Compact maps (saved with a stride) come back upsampled to the image size they were saved for. With
    ``num_classes`` given, a class index outside ``0..num_classes-1`` is an error (a maps file made for another
    class set).
    """
    arrays = read_npz(path, ("maps", "classes"), "maps", optional=("size",))
    maps, classes = arrays["maps"].astype(np.float32), arrays["classes"].astype(np.int64)
    if maps.ndim != 3 or maps.shape[0] != classes.shape[0]:
        raise DataError(path, f"maps {maps.shape} and classes {classes.shape} disagree")
    if num_classes is not None and classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise DataError(path, f"maps file holds classes {classes.tolist()}, outside the dataset's {num_classes}")
    if "size" in arrays:
        size = arrays["size"]
        if size.shape != (2,) or any(int(n) < m for n, m in zip(size, maps.shape[1:])):
            raise DataError(path, f"compact maps {tuple(maps.shape[1:])} do not fit their image size "
                            f"{size.tolist()}")
        maps = upsample_maps(maps, (int(size[0]), int(size[1])))
    return maps, classes
