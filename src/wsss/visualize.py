"""Pictures for people: heat-map overlays of localisation maps and colour-coded label maps."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .data.io import voc_palette


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a ``(H, W)`` map in [0, 1] over an ``(H, W, 3)`` uint8 image; returns uint8 RGB."""
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image {image.shape[:2]} and map {heat.shape} sizes differ")
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    out = (1 - alpha) * image.astype(np.float32) / 255 + alpha * colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    """A ``(H, W)`` label map in the VOC palette (255 = ignore is drawn in the void colour)."""
    return voc_palette()[np.asarray(labels, dtype=np.uint8)]


def resize_tile(picture: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 picture resized to ``size`` x ``size`` (nearest neighbours for label maps)."""
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(picture).resize((size, size), resample))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def titled_grid(rows: Sequence[Sequence[tuple[str, np.ndarray] | None]], tile: int = 192,
                header: Sequence[str] | None = None, legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
                font_size: int = 14) -> np.ndarray:
    """One picture of titled cells: ``rows[r][c]`` is ``(title, (H, W, 3) uint8)`` or None (left blank).

    Every cell is drawn at ``tile`` x ``tile`` with its title in a band above it; ``header`` (one line per column)
    goes above the first row; ``legend`` (name, RGB) pairs become colour swatches with names below the grid.
    """
    columns = max((len(r) for r in rows), default=0)
    if columns == 0:
        raise ValueError("titled_grid needs at least one cell")
    band, pad = font_size + 8, 4
    head = band if header else 0
    swatch = font_size + 4
    per_line = max(1, (columns * (tile + pad)) // 180)
    legend_lines = -(-len(legend) // per_line) if legend else 0
    width = columns * (tile + pad) + pad
    height = head + len(rows) * (band + tile + pad) + pad + legend_lines * (swatch + 6) + (6 if legend else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    for c, title in enumerate(header or ()):
        draw.text((pad + c * (tile + pad), 4), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        top = head + r * (band + tile + pad) + pad
        for c, cell in enumerate(row):
            if cell is None:
                continue
            title, picture = cell
            left = pad + c * (tile + pad)
            draw.text((left, top + 2), title, fill=(40, 40, 40), font=font)
            canvas.paste(Image.fromarray(picture if picture.shape[:2] == (tile, tile)
                                         else resize_tile(picture, tile)), (left, top + band))
    top = head + len(rows) * (band + tile + pad) + pad + 6
    for k, (name, colour) in enumerate(legend):
        left = pad + (k % per_line) * 180
        y = top + (k // per_line) * (swatch + 6)
        draw.rectangle([left, y, left + swatch, y + swatch], fill=tuple(int(v) for v in colour), outline=(0, 0, 0))
        draw.text((left + swatch + 6, y + 1), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def class_legend(names: Sequence[str], ignore: bool = True) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, colour)`` of every class in the palette :func:`colorize` uses, plus 255 as "no label"."""
    palette = voc_palette()
    entries = [(name, tuple(int(v) for v in palette[k])) for k, name in enumerate(names)]
    return entries + ([("no label / ignore", tuple(int(v) for v in palette[255]))] if ignore else [])
