"""A synthetic weakly supervised segmentation dataset with exact masks, in the VOC folder layout.

Each image shows 1-3 objects on a cluttered textured background. Every object class has its own shape,
texture and colour pair; backgrounds are one of a few textured "scenes" (water, grass, sand, rock) with
distractor blobs that belong to no class. Each class prefers one scene (``bias``, 80% by default, of the
images whose first object is that class), so a classifier can partly cheat by looking at the context, the
co-occurrence problem the WSSS papers discuss.

The generator is deterministic: image ``i`` of a split depends only on ``(seed, split, i)`` and the
settings. ``synth.json`` records every object's geometry so the masks can be checked independently.

Two more failure modes the WSSS papers address can be switched on (both off by default):

- ``parts``: every object is made of two differently textured parts. The class's own texture covers one side;
  the rest (the fraction ``parts`` of the object's width) is a *shared part*, one texture and colour common to
  every class, like the wheels of every vehicle. A classifier needs only the distinctive side, so its maps cover
  a part of the object, the partial activation GETAM and ACR set out to complete.
- ``plain``: the fraction of images whose background is one large plain, nearly uniform field instead of a
  textured scene; attention smooths into such regions (the over-smoothing AReAM targets).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError
from .io import write_bytes_atomic, write_mask

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "star", "hexagon")
TEXTURES = ("stripes", "dots", "checker", "diagonal", "rings", "gradient")
BACKGROUNDS = ("water", "grass", "sand", "rock")
# Saturated colour pairs (main, secondary) chosen away from the background scenes' blue/green/beige/grey.
COLOUR_PAIRS = (
    ((225, 35, 35), (250, 235, 235)),
    ((250, 150, 20), (55, 25, 10)),
    ((205, 40, 205), (35, 10, 60)),
    ((40, 215, 230), (245, 240, 50)),
    ((250, 250, 250), (15, 15, 15)),
    ((125, 55, 230), (250, 205, 80)),
    ((245, 110, 170), (25, 85, 40)),
    ((160, 250, 90), (190, 25, 25)),
)
# The shared part of every object with ``parts`` (a dark, finely striped grey), and the plain fields' colours.
SHARED_PART = ((70, 70, 80), (150, 150, 160))
PLAIN_COLOURS = ((200, 200, 205), (150, 175, 200), (190, 170, 150))
MAX_CLASSES = 24
SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SynthObject:
    """One drawn object: its class label, shape and geometry (pixel units, angle in radians)."""

    label: int
    shape: str
    cy: float
    cx: float
    radius: float
    angle: float


def class_style(label: int) -> tuple[str, str, tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Shape, texture and colour pair of foreground class ``label`` (1-based)."""
    k = label - 1
    # Different strides so that classes beyond the first 8 still differ in at least one attribute.
    return SHAPES[k % len(SHAPES)], TEXTURES[k % len(TEXTURES)], COLOUR_PAIRS[(k + 3 * (k // 8)) % len(COLOUR_PAIRS)]


def class_names(num_classes: int) -> list[str]:
    """``['background', <shape>_<texture>, ...]`` for ``num_classes`` object classes."""
    names = ["background"]
    for label in range(1, num_classes + 1):
        shape, texture, _ = class_style(label)
        name = f"{shape}_{texture}"
        names.append(name if name not in names else f"{name}_{label}")
    return names


def preferred_background(label: int) -> str:
    """The background scene class ``label`` usually appears on."""
    return BACKGROUNDS[(label - 1) % len(BACKGROUNDS)]


# ------------------------------------------------------------------------------------------------ geometry


def _object_frame(height: int, width: int, cy: float, cx: float, radius: float, angle: float):
    """Pixel-centre coordinates rotated into the object's frame, in units of its radius: ``(u, v)``."""
    y = np.arange(height, dtype=np.float64)[:, None] + 0.5 - cy
    x = np.arange(width, dtype=np.float64)[None, :] + 0.5 - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * x + sin * y) / radius
    v = (-sin * x + cos * y) / radius
    return u, v


def shape_mask(shape: str, height: int, width: int, cy: float, cx: float, radius: float, angle: float) -> np.ndarray:
    """Boolean ``(height, width)`` mask of the pixels whose centre lies inside the shape.

    Sizes relative to ``radius``: disc radius 1; square half-side 0.8; triangle (equilateral) inradius 0.6;
    cross arms half-length 1, half-width 0.33; ring radii 0.55..1; diamond |u|+|v| <= 1.1; star
    rho <= 0.65 + 0.35 cos(5 theta); hexagon apothem 0.87.
    """
    u, v = _object_frame(height, width, cy, cx, radius, angle)
    rho = np.hypot(u, v)
    if shape == "disc":
        return rho <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        normals = [np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        return np.logical_and.reduce([u * np.cos(a) + v * np.sin(a) <= 0.6 for a in normals])
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if shape == "ring":
        return (rho >= 0.55) & (rho <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1
    if shape == "star":
        return rho <= 0.65 + 0.35 * np.cos(5 * np.arctan2(v, u))
    if shape == "hexagon":
        directions = (0.0, np.pi / 3, 2 * np.pi / 3)
        return np.logical_and.reduce([np.abs(u * np.cos(a) + v * np.sin(a)) <= 0.87 for a in directions])
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, radius: float, period: float, phase: float) -> np.ndarray:
    """Blend weight of the secondary colour, in [0, 1], over the object frame (``u, v`` in radius units)."""
    pu, pv = u * radius + phase, v * radius + phase  # pixel units
    if texture == "stripes":
        return (np.floor(pv / (period / 2)) % 2).astype(np.float64)
    if texture == "dots":
        du = (pu % period) - period / 2
        dv = (pv % period) - period / 2
        return (np.hypot(du, dv) <= 0.3 * period).astype(np.float64)
    if texture == "checker":
        return ((np.floor(pu / (period * 0.6)) + np.floor(pv / (period * 0.6))) % 2).astype(np.float64)
    if texture == "diagonal":
        return (np.floor((pu + pv) / (period * 0.7)) % 2).astype(np.float64)
    if texture == "rings":
        return (np.floor((np.hypot(u, v) * radius) / (period / 2)) % 2).astype(np.float64)
    if texture == "gradient":
        return np.clip((u + 1.0) / 2.0, 0.0, 1.0)
    raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")


# ----------------------------------------------------------------------------------------------- textures


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-scale smooth noise: a ``(cells+1)^2`` random grid upsampled bilinearly."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    gy = np.linspace(0.0, cells, height)
    gx = np.linspace(0.0, cells, width)
    y0 = np.minimum(np.floor(gy).astype(int), cells - 1)
    x0 = np.minimum(np.floor(gx).astype(int), cells - 1)
    fy, fx = (gy - y0)[:, None], gx - x0
    rows = grid[y0] * (1 - fy) + grid[y0 + 1] * fy  # (height, cells+1)
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


def background_texture(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float ``(H, W, 3)`` image in [0, 1] of one background scene."""
    y = np.arange(height, dtype=np.float64)[:, None]
    x = np.arange(width, dtype=np.float64)[None, :]
    blotch = smooth_noise(rng, height, width, 4)[..., None]
    if kind == "water":
        period = rng.uniform(7.0, 12.0)
        warp = 2.0 * smooth_noise(rng, height, width, 3)
        wave = np.sin(2 * np.pi * (y + warp + 0.15 * x) / period)[..., None]
        base = np.array([30, 85, 175]) / 255.0
        image = base + wave * np.array([0.04, 0.09, 0.12]) + 0.05 * blotch
    elif kind == "grass":
        # Vertical blades: noise that varies fast along x and slowly along y.
        blades = np.repeat(rng.standard_normal((-(-height // 12), width)), 12, axis=0)[:height]
        base = np.array([55, 140, 50]) / 255.0
        image = base + blades[..., None] * np.array([0.05, 0.10, 0.04]) + 0.06 * blotch
    elif kind == "sand":
        speckle = rng.standard_normal((height, width))[..., None]
        base = np.array([205, 180, 125]) / 255.0
        image = base + 0.05 * speckle + 0.07 * blotch
    elif kind == "rock":
        cracks = (np.abs(smooth_noise(rng, height, width, 6)) < 0.08)[..., None]
        base = np.array([125, 120, 115]) / 255.0
        image = base + 0.12 * blotch - 0.18 * cracks
    else:
        raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")
    return np.clip(np.broadcast_to(image, (height, width, 3)), 0.0, 1.0)


def _add_distractors(rng: np.random.Generator, image: np.ndarray, scene: str) -> None:
    """Paint 0-3 irregular blobs (patches of another scene or muted colour) that belong to no class."""
    height, width = image.shape[:2]
    y = np.arange(height)[:, None] + 0.5
    x = np.arange(width)[None, :] + 0.5
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.08, 0.22) * height, rng.uniform(0.08, 0.22) * width
        ellipse = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        blob = ellipse + 0.5 * smooth_noise(rng, height, width, 5) <= 1.0
        if rng.random() < 0.5:
            other = [b for b in BACKGROUNDS if b != scene]
            fill = background_texture(other[int(rng.integers(len(other)))], rng, height, width)
        else:
            muted = rng.uniform(0.25, 0.75) + rng.uniform(-0.08, 0.08, size=3)
            fill = np.broadcast_to(muted, (height, width, 3)) + 0.03 * rng.standard_normal((height, width, 1))
        image[blob] = fill[blob]


# ------------------------------------------------------------------------------------------------- scenes


def _place_objects(rng: np.random.Generator, size: int, labels: list[int]) -> list[SynthObject]:
    """Random geometry, avoiding heavy overlap when possible (later objects are drawn on top)."""
    objects: list[SynthObject] = []
    for label in labels:
        radius = rng.uniform(0.10, 0.22) * size  # diameter 20-44% of the side
        for _ in range(20):
            cy, cx = rng.uniform(radius, size - radius, size=2)
            if all(np.hypot(cy - o.cy, cx - o.cx) >= 0.75 * (radius + o.radius) for o in objects):
                break
        shape = class_style(label)[0]
        objects.append(SynthObject(label, shape, float(cy), float(cx), float(radius), float(rng.uniform(0, 2 * np.pi))))
    return objects


def render_scene(
    rng: np.random.Generator, size: int, num_classes: int, bias: float = 0.8, max_objects: int = 3,
    parts: float = 0.0, plain: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw one image: ``(image uint8 (S, S, 3), mask uint8 (S, S), info)``.

    ``info`` holds the background scene (``plain`` for a plain field) and the objects (as dicts of
    :class:`SynthObject`). ``parts`` and ``plain`` are described in the module docstring; at 0 they draw nothing
    from ``rng``, so the images are those of a generator without them.
    """
    count = int(rng.integers(1, max_objects + 1))
    labels = [int(v) for v in rng.integers(1, num_classes + 1, size=count)]
    # Co-occurrence bias: the first object's class picks the scene most of the time.
    preferred = preferred_background(labels[0])
    if rng.random() < bias:
        scene = preferred
    else:
        others = [b for b in BACKGROUNDS if b != preferred]
        scene = others[int(rng.integers(len(others)))]
    if plain > 0 and rng.random() < plain:
        scene = "plain"
        colour = np.array(PLAIN_COLOURS[int(rng.integers(len(PLAIN_COLOURS)))]) / 255.0
        image = np.broadcast_to(colour, (size, size, 3)) + 0.015 * smooth_noise(rng, size, size, 2)[..., None]
    else:
        image = background_texture(scene, rng, size, size).copy()
        _add_distractors(rng, image, scene)

    mask = np.zeros((size, size), dtype=np.uint8)
    objects = _place_objects(rng, size, labels)
    for obj in objects:
        inside = shape_mask(obj.shape, size, size, obj.cy, obj.cx, obj.radius, obj.angle)
        _, texture, (main, second) = class_style(obj.label)
        jitter = rng.normal(0.0, 0.05, size=(2, 3))
        colour_a = np.clip(np.array(main) / 255.0 + jitter[0], 0, 1)
        colour_b = np.clip(np.array(second) / 255.0 + jitter[1], 0, 1)
        u, v = _object_frame(size, size, obj.cy, obj.cx, obj.radius, obj.angle)
        period = rng.uniform(5.0, 8.0) * size / 96.0
        weight = _texture(texture, u, v, obj.radius, period, rng.uniform(0, period))[..., None]
        paint = colour_a * (1 - weight) + colour_b * weight
        if parts > 0:
            # The side beyond u = 1 - 2 * parts (in radius units, along the object's own axis) is the shared part.
            shared = u > 1.0 - 2.0 * parts
            stripes = (np.floor((v * obj.radius) / max(period / 3, 1.0)) % 2)[..., None]
            common = np.array(SHARED_PART[0]) / 255.0 * (1 - stripes) + np.array(SHARED_PART[1]) / 255.0 * stripes
            paint = np.where(shared[..., None], common, paint)
        image[inside] = paint[inside]
        mask[inside] = obj.label
    image += rng.normal(0.0, 0.02, size=image.shape)
    image_u8 = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image_u8, mask, {"background": scene, "objects": [asdict(o) for o in objects]}


def _encode_image(image: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_synthetic(
    out: str | Path,
    num_train: int = 600,
    num_val: int = 100,
    size: int = 96,
    num_classes: int = 4,
    seed: int = 0,
    bias: float = 0.8,
    max_objects: int = 3,
    image_format: str = "jpg",
    parts: float = 0.0,
    plain: float = 0.0,
    progress: bool = False,
) -> Path:
    """Write a synthetic VOC-layout dataset to ``out`` and return ``out``.

    Writes ``classes.txt`` (``background`` first), ``JPEGImages/<id>.jpg`` (quality 95; or ``.png`` with
    ``image_format='png'``), ``SegmentationClass/<id>.png``, ``ImageSets/Segmentation/{train,val}.txt`` and
    ``synth.json`` (settings and every object's geometry). Ids are ``train_00000``, ``val_00000``, ...
    ``parts`` (in [0, 1)) and ``plain`` (in [0, 1]) switch on the shared object parts and the plain backgrounds of
    the module docstring. Bad settings raise :class:`ConfigError`.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must lie in 1..{MAX_CLASSES}, got {num_classes}")
    if size < 16:
        raise ConfigError(f"size must be at least 16, got {size}")
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise ConfigError("need a positive number of images")
    if image_format not in ("jpg", "png"):
        raise ConfigError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 0.0 <= bias <= 1.0 or max_objects < 1:
        raise ConfigError("bias must lie in [0, 1] and max_objects be >= 1")
    if not 0.0 <= parts < 1.0 or not 0.0 <= plain <= 1.0:
        raise ConfigError(f"parts must lie in [0, 1) and plain in [0, 1], got parts={parts}, plain={plain}")
    out = Path(out)
    names = class_names(num_classes)
    meta: dict[str, Any] = {
        "seed": seed, "size": size, "num_classes": num_classes, "bias": bias, "max_objects": max_objects,
        "parts": parts, "plain": plain,
        "classes": names,
        "preferred_background": {name: preferred_background(k) for k, name in enumerate(names) if k > 0},
        "images": {},
    }
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    split_ids: dict[str, list[str]] = {"train": [], "val": []}
    for split, i in tqdm(jobs, desc="synth", disable=not progress):
        # One generator per image, so an image does not depend on how many others are made.
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        image, mask, info = render_scene(rng, size, num_classes, bias, max_objects, parts, plain)
        image_id = f"{split}_{i:05d}"
        write_bytes_atomic(out / "JPEGImages" / f"{image_id}.{image_format}", _encode_image(image, image_format))
        write_mask(out / "SegmentationClass" / f"{image_id}.png", mask)
        meta["images"][image_id] = {"split": split, **info}
        split_ids[split].append(image_id)
    # Lists last: a killed run leaves no split that names a missing file.
    write_bytes_atomic(out / "classes.txt", ("\n".join(names) + "\n").encode())
    write_bytes_atomic(out / "synth.json", json.dumps(meta, indent=1).encode())
    for split, ids in split_ids.items():
        if not ids:
            continue
        write_bytes_atomic(out / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{i}\n" for i in ids).encode())
    return out
