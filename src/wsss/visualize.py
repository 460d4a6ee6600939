"""Pictures for people: heat-map overlays of localisation maps, colour-coded label maps, titled grids with a class
legend and a colour bar.

Label maps are drawn in the dataset's own palette where its masks carry one (:meth:`wsss.data.voc.VOCDataset.palette`; CamVid's sky
is grey, not VOC's black), else in the VOC palette; :func:`class_legend` takes the same palette, so the legend shows
the colours drawn.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .data.io import voc_palette, write_bytes_atomic

HEAT_MAP_CMAP = "jet"  # overlay's and the colour bar's: blue 0, red 1


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = HEAT_MAP_CMAP) -> np.ndarray:
    """Blend a ``(H, W)`` map in [0, 1] over an ``(H, W, 3)`` uint8 image; returns uint8 RGB."""
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image {image.shape[:2]} and map {heat.shape} sizes differ")
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    out = (1 - alpha) * image.astype(np.float32) / 255 + alpha * colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """A ``(H, W)`` label map as ``(H, W, 3)`` uint8 in ``palette`` (``(256, 3)``; None: VOC's), 255 = ignore in its
    void colour."""
    colours = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    return colours[np.asarray(labels, dtype=np.uint8)]


def label_tile(labels: np.ndarray, tile: int, palette: np.ndarray | None = None) -> np.ndarray:
    """A label map colorized and resized to ``tile`` x ``tile`` with nearest neighbours: only palette colours (the
    legend's), no blended edges."""
    return resize_tile(colorize(labels, palette), tile, nearest=True)


def resize_tile(picture: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 picture resized to ``size`` x ``size`` (nearest neighbours for label maps)."""
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(picture).resize((size, size), resample))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


COLOUR_BAR_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def colour_bar(height: int, label: str = "map value", strip: int = 16, font_size: int = 14,
               cmap: str = HEAT_MAP_CMAP) -> np.ndarray:
    """A vertical colour bar of the heat maps' colours, 1 at the top and 0 at the bottom, with ticks at
    :data:`COLOUR_BAR_TICKS` and ``label`` written above it: an ``(height, width, 3)`` uint8 picture."""
    band = font_size + 8
    text_width = int(_font(font_size).getlength(label)) + 8
    width = max(strip + 8 + int(_font(font_size).getlength("0.75")) + 8, text_width)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    draw.text((2, 2), label, fill=(0, 0, 0), font=font)
    top, bottom = band, height - font_size // 2 - 2
    if bottom - top < 2:
        raise ValueError(f"a colour bar needs more than {band + font_size} pixels of height, got {height}")
    values = np.linspace(1.0, 0.0, bottom - top)
    colours = (colormaps[cmap](values)[:, :3] * 255).round().astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(colours[:, None], strip, axis=1)), (2, top))
    draw.rectangle([1, top - 1, 2 + strip, bottom], outline=(0, 0, 0))
    for tick in COLOUR_BAR_TICKS:
        y = top + round((1.0 - tick) * (bottom - top - 1))
        draw.line([2 + strip, y, 6 + strip, y], fill=(0, 0, 0))
        draw.text((8 + strip, y - font_size // 2 - 1), f"{tick:g}", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def png_bytes(picture: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 picture encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def save_picture(path: str | Path, picture: np.ndarray) -> None:
    """Write ``picture`` as a PNG, atomically (a killed run leaves no half-written picture)."""
    write_bytes_atomic(path, png_bytes(picture))


_PAD = 4  # pixels between the cells of a grid


def grid_cell(row: int, column: int, tile: int = 192, font_size: int = 14, header: bool = False) -> tuple[int, int]:
    """``(top, left)`` of the picture of cell ``(row, column)`` in a :func:`titled_grid` of these settings."""
    band = font_size + 8
    return (band if header else 0) + row * (band + tile + _PAD) + _PAD + band, _PAD + column * (tile + _PAD)


def titled_grid(rows: Sequence[Sequence[tuple[str, np.ndarray] | None]], tile: int = 192,
                header: Sequence[str] | None = None, legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
                font_size: int = 14, colour_bar_label: str | None = None) -> np.ndarray:
    """One picture of titled cells: ``rows[r][c]`` is ``(title, (H, W, 3) uint8)`` or None (left blank).

    Every cell is drawn at ``tile`` x ``tile`` with its title in a band above it; ``header`` (one line per column)
    goes above the first row; ``legend`` (name, RGB) pairs become colour swatches with names below the grid; with
    ``colour_bar_label`` a :func:`colour_bar` of the heat maps' colours spans the rows on the right. A cell of
    another size is resized bilinearly (give label maps as :func:`label_tile`, which keeps their colours).
    """
    columns = max((len(r) for r in rows), default=0)
    if columns == 0:
        raise ValueError("titled_grid needs at least one cell")
    band, pad = font_size + 8, _PAD
    head = band if header else 0
    swatch = font_size + 4
    per_line = max(1, (columns * (tile + pad)) // 180)
    legend_lines = -(-len(legend) // per_line) if legend else 0
    grid_width = columns * (tile + pad) + pad
    rows_height = len(rows) * (band + tile + pad)
    bar = colour_bar(rows_height, colour_bar_label, font_size=font_size) if colour_bar_label is not None else None
    width = grid_width + (0 if bar is None else bar.shape[1] + pad)
    height = head + rows_height + pad + legend_lines * (swatch + 6) + (6 if legend else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    if bar is not None:
        canvas.paste(Image.fromarray(bar), (grid_width, head + pad))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    for c, title in enumerate(header or ()):
        draw.text((pad + c * (tile + pad), 4), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            title, picture = cell
            top, left = grid_cell(r, c, tile, font_size, bool(header))
            draw.text((left, top - band + 2), title, fill=(40, 40, 40), font=font)
            canvas.paste(Image.fromarray(picture if picture.shape[:2] == (tile, tile)
                                         else resize_tile(picture, tile)), (left, top))
    top = head + len(rows) * (band + tile + pad) + pad + 6
    for k, (name, colour) in enumerate(legend):
        left = pad + (k % per_line) * 180
        y = top + (k // per_line) * (swatch + 6)
        draw.rectangle([left, y, left + swatch, y + swatch], fill=tuple(int(v) for v in colour), outline=(0, 0, 0))
        draw.text((left + swatch + 6, y + 1), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def class_legend(names: Sequence[str], ignore: bool = True, palette: np.ndarray | None = None,
                 only: Iterable[int] | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, colour)`` of every class (or of the labels ``only``) in ``palette`` (None: VOC's, as
    :func:`colorize`), plus 255 as "no label" with ``ignore``."""
    colours = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    keep = None if only is None else {int(k) for k in only}
    entries = [(name, tuple(int(v) for v in colours[k])) for k, name in enumerate(names) if keep is None or k in keep]
    return entries + ([("no label / ignore", tuple(int(v) for v in colours[255]))] if ignore else [])


def labels_present(*label_maps: np.ndarray) -> list[int]:
    """The labels (255 left out) that occur in any of ``label_maps``: what a legend of those pictures needs."""
    present: set[int] = set()
    for labels in label_maps:
        counts = np.bincount(np.asarray(labels, dtype=np.uint8).ravel(), minlength=256)
        present.update(int(k) for k in np.flatnonzero(counts[:255]))
    return sorted(present)
