"""Pictures for people: heat-map overlays of localisation maps and colour-coded label maps."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

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
