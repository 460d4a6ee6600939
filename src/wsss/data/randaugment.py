"""RandAugment with timm's policy strings, and RandomErasing in timm's modes (MCTformer's and AReAM's recipe).

``RandAugment.from_policy("rand-m9-mstd0.5-inc1")`` means what it means in timm (``auto_augment.py``): ``n`` ops
(default 2) drawn uniformly with replacement from the op set (``inc1``: the "increasing" variants, whose strength
grows with the magnitude), each applied with probability 0.5 (``p``), at a magnitude drawn per op from
N(``m``, ``mstd``) clipped to [0, ``mmax`` = 10]. The ops run on PIL images, as timm's do, so every op has PIL's
exact semantics; geometric ops move the mask with nearest-neighbour sampling and fill it with the ignore label.
Randomness comes from the ``torch.Generator`` passed in, like every other wsss transform.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ..errors import ConfigError
from .io import IGNORE_INDEX

Sample = tuple[torch.Tensor, "torch.Tensor | None"]
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes are on a 0..10 scale
TRANSLATE_PCT = 0.45  # timm's default translate_pct for the *Rel ops

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS (the op sets of ``rand-...`` and ``rand-...-inc1``).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC_OPS = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
SIGNED_OPS = GEOMETRIC_OPS | {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def level_to_arg(op: str, magnitude: float, negate: bool) -> float | int | None:
    """The op's argument at ``magnitude`` (0..10) as timm's ``*_level_to_arg`` computes it (``negate``: the random
    sign of the signed ops). None for the ops without one."""
    level = magnitude / LEVEL_DENOM
    sign = -1.0 if negate else 1.0
    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return sign * level * 30.0
    if op in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if op in ("TranslateXRel", "TranslateYRel"):
        return sign * level * TRANSLATE_PCT
    if op == "Posterize":
        return int(level * 4)
    if op == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if op == "Solarize":
        return min(256, int(level * 256))
    if op == "SolarizeIncreasing":
        return 256 - min(256, int(level * 256))
    if op == "SolarizeAdd":
        return min(128, int(level * 110))
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if op.endswith("Increasing"):  # the enhance ops: 1 +- 0.9 level, at least 0.1
        return max(0.1, 1.0 + sign * level * 0.9)
    raise ValueError(f"unknown RandAugment op {op!r}")


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


_ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast, "Brightness": ImageEnhance.Brightness,
            "Sharpness": ImageEnhance.Sharpness}


def apply_op(op: str, img: Image.Image, arg: float | int | None, resample: int, fill: tuple[int, ...] | int
             ) -> Image.Image:
    """One op on a PIL image, with timm's PIL calls (``fill``/``resample`` only matter for the geometric ops)."""
    base = op.removesuffix("Increasing")
    if base == "AutoContrast":
        return ImageOps.autocontrast(img)
    if base == "Equalize":
        return ImageOps.equalize(img)
    if base == "Invert":
        return ImageOps.invert(img)
    if base == "Posterize":
        return ImageOps.posterize(img, int(arg))
    if base == "Solarize":
        return ImageOps.solarize(img, int(arg))
    if base == "SolarizeAdd":
        return _solarize_add(img, int(arg))
    if base in _ENHANCE:
        return _ENHANCE[base](img).enhance(float(arg))
    if base == "Rotate":
        return img.rotate(float(arg), resample=resample, fillcolor=fill)
    w, h = img.size
    coeffs = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
              "TranslateXRel": (1, 0, arg * w, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}[base]
    return img.transform(img.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)


@dataclass(frozen=True)
class DrawnOp:
    """One op of one call: its name, whether it fired (probability ``p``), its magnitude and argument."""

    name: str
    applied: bool
    magnitude: float
    arg: float | int | None


class RandAugment:
    """timm's RandAugment on wsss's float ``(3, H, W)`` images in [0, 1] and their masks.

    Args:
        ops: the op set to draw from (:data:`RAND_OPS` or :data:`RAND_INCREASING_OPS`).
        num_ops: ops per image (timm's ``n``, default 2), drawn with replacement.
        magnitude: timm's ``m`` (0..10); ``magnitude_std`` its per-op Gaussian noise (``inf``: uniform in [0, m]);
            ``magnitude_max`` the upper clip.
        p: the probability that each drawn op is applied.
        fill: the fill colour of geometric ops, 0..255 (timm: the dataset mean, (124, 116, 104) for ImageNet).
        interpolation: ``bilinear`` or ``bicubic`` (DeiT's timm recipe: bicubic), or ``random`` (either, per op).
    """

    def __init__(self, ops: Sequence[str] = RAND_INCREASING_OPS, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.0, magnitude_max: float = LEVEL_DENOM, p: float = 0.5,
                 fill: Sequence[int] = (124, 116, 104), interpolation: str = "bicubic"):
        unknown = [op for op in ops if op not in RAND_OPS and op not in RAND_INCREASING_OPS]
        if unknown or not ops:
            raise ConfigError(f"unknown RandAugment ops {unknown}" if unknown else "RandAugment needs ops")
        if num_ops < 1 or not 0.0 <= p <= 1.0 or magnitude < 0 or magnitude_std < 0:
            raise ConfigError(f"RandAugment needs n >= 1, 0 <= p <= 1, m >= 0 and mstd >= 0 (got n={num_ops}, "
                              f"p={p}, m={magnitude}, mstd={magnitude_std})")
        if interpolation not in ("bilinear", "bicubic", "random"):
            raise ConfigError(f"RandAugment interpolation must be bilinear, bicubic or random, got {interpolation!r}")
        self.ops, self.num_ops, self.p = tuple(ops), int(num_ops), float(p)
        self.magnitude, self.magnitude_std, self.magnitude_max = float(magnitude), float(magnitude_std), magnitude_max
        self.fill = tuple(int(c) for c in fill)
        self.interpolation = interpolation

    @classmethod
    def from_policy(cls, policy: str, **kwargs) -> "RandAugment":
        """Parse a timm policy string ``rand-m9-n2-mstd0.5-mmax10-p0.5-inc1`` (every part but ``rand`` optional)."""
        parts = policy.split("-")
        if parts[0] != "rand":
            raise ConfigError(f"RandAugment policy {policy!r} must start with 'rand' (timm's rand-m9-mstd0.5-inc1)")
        args: dict = {}
        increasing = False
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([\d.]+|inf)", part)
            if match is None:
                raise ConfigError(f"RandAugment policy {policy!r}: cannot read {part!r}")
            key, value = match.groups()
            if key == "inc":
                increasing = bool(int(value))
            else:
                name = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max",
                        "p": "p"}[key]
                args[name] = int(value) if key == "n" else float(value)
        args.setdefault("ops", RAND_INCREASING_OPS if increasing else RAND_OPS)
        return cls(**{**args, **kwargs})

    def draw(self, generator: torch.Generator | None = None) -> list[DrawnOp]:
        """The ops of one call, in order (the random choices of :meth:`__call__`, exposed for tests and logs)."""
        picks = torch.randint(len(self.ops), (self.num_ops,), generator=generator).tolist()
        drawn = []
        for i in picks:
            applied = bool(torch.rand((), generator=generator) < self.p)
            if math.isinf(self.magnitude_std):
                m = float(torch.rand((), generator=generator)) * self.magnitude
            elif self.magnitude_std > 0:
                m = self.magnitude + self.magnitude_std * float(torch.randn((), generator=generator))
            else:
                m = self.magnitude
            m = max(0.0, min(m, self.magnitude_max))
            negate = bool(torch.rand((), generator=generator) < 0.5)
            drawn.append(DrawnOp(self.ops[i], applied, m, level_to_arg(self.ops[i], m, negate)))
        return drawn

    def _resample(self, generator: torch.Generator | None) -> int:
        choice = self.interpolation
        if choice == "random":
            choice = "bilinear" if torch.rand((), generator=generator) < 0.5 else "bicubic"
        return Image.BILINEAR if choice == "bilinear" else Image.BICUBIC

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> Sample:
        ops = [op for op in self.draw(generator) if op.applied]
        if not ops:
            return image, mask
        array = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(array, mode="RGB")
        if mask is not None and mask.numel() and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("RandAugment moves masks as 8-bit images: labels must be within 0..255")
        lab = None if mask is None else Image.fromarray(mask.to(torch.uint8).numpy(), mode="L")
        for op in ops:
            resample = self._resample(generator) if op.name in GEOMETRIC_OPS else Image.BICUBIC
            img = apply_op(op.name, img, op.arg, resample, self.fill)
            if lab is not None and op.name in GEOMETRIC_OPS:
                lab = apply_op(op.name, lab, op.arg, Image.NEAREST, IGNORE_INDEX)
        out = torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0))
        return out, (None if lab is None else torch.from_numpy(np.asarray(lab, dtype=np.int64).copy()))

    def __repr__(self) -> str:
        return (f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, p={self.p}, "
                f"{len(self.ops)} ops)")


class RandomErasing:
    """timm's RandomErasing (Zhong et al.), after normalisation: with probability ``p`` one box of 2%-33% of the
    image, aspect ratio in [0.3, 1/0.3] (log-uniform), filled per pixel from N(0, 1) (``pixel``), per box with one
    random colour (``rand``) or with 0 (``const``). Up to 10 tries for a box that fits; the mask is left alone
    (erasing moves nothing, and the image labels still say what the crop contains)."""

    def __init__(self, p: float = 0.25, mode: str = "pixel", min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        if not 0.0 <= p <= 1.0 or mode not in ("pixel", "rand", "const"):
            raise ConfigError(f"random_erasing needs 0 <= p <= 1 and a mode pixel/rand/const, got {p}, {mode!r}")
        self.p, self.mode, self.min_area, self.max_area = float(p), mode, min_area, max_area
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> Sample:
        if float(torch.rand((), generator=generator)) >= self.p:
            return image, mask
        c, h, w = image.shape
        area = h * w
        for _ in range(10):
            target = area * (self.min_area + (self.max_area - self.min_area) * float(torch.rand((), generator=generator)))
            lo, hi = self.log_aspect
            aspect = math.exp(lo + (hi - lo) * float(torch.rand((), generator=generator)))
            bh, bw = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if bw < w and bh < h:
                top = int(torch.randint(0, h - bh + 1, (), generator=generator))
                left = int(torch.randint(0, w - bw + 1, (), generator=generator))
                image = image.clone()
                image[:, top : top + bh, left : left + bw] = self._fill(c, bh, bw, image.dtype, generator)
                break
        return image, mask

    def _fill(self, c: int, h: int, w: int, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.randn((c, h, w), generator=generator, dtype=dtype)
        if self.mode == "rand":
            return torch.randn((c, 1, 1), generator=generator, dtype=dtype).expand(c, h, w)
        return torch.zeros((c, h, w), dtype=dtype)

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, mode={self.mode})"

