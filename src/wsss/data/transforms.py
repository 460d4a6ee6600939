"""Paired image/mask transforms on torch tensors (no torchvision).

Every transform is a callable ``t(image, mask=None, generator=None) -> (image, mask)`` where ``image`` is a
float tensor ``(3, H, W)`` (values in [0, 1] before :class:`Normalize`) and ``mask`` a long tensor ``(H, W)``
of label indices with 255 = ignore, or ``None``. Geometry is applied identically to both: images are
interpolated (bilinear by default), masks always by nearest neighbour so that no label is ever invented.

All randomness is drawn from the ``torch.Generator`` passed in (the global torch RNG when it is ``None``),
so a sample's augmentation is a pure function of the generator's seed. That is what lets a dataset give each
sample its own seeded generator and reproduce, or resume, a data order exactly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .io import IGNORE_INDEX

Size = int | tuple[int, int]
Sample = tuple[torch.Tensor, torch.Tensor | None]
Gen = torch.Generator | None

DEFAULT_MEAN = (0.5, 0.5, 0.5)  # the AugReg ViT convention of the shared ViT-Ti weights
DEFAULT_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------- sampling


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    """A float drawn uniformly from ``[low, high)``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An int drawn uniformly from ``low..high`` inclusive."""
    if high <= low:
        return low
    return int(torch.randint(low, high + 1, (), generator=generator))


def _chance(p: float, generator: torch.Generator | None) -> bool:
    """True with probability ``p``; always draws once, so the stream position does not depend on ``p``."""
    return float(torch.rand((), generator=generator)) < p


def _pair(size: Size) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# --------------------------------------------------------------------------------------------- functional


def to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` array -> float ``(3, H, W)`` tensor in [0, 1]; a float CHW tensor passes through."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        return image
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    # numpy is markedly faster than torch for this small elementwise step in a busy data-loading process
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))


def mask_to_tensor(mask: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    """``(H, W)`` integer array -> long tensor (``None`` passes through)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        return mask.long()
    return torch.from_numpy(np.asarray(mask).astype(np.int64))


def resize(
    image: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int], interpolation: str = "bilinear"
) -> Sample:
    """Resize to ``size = (h, w)``: the image by ``interpolation`` (antialiased when shrinking), the mask by
    nearest neighbour (``nearest-exact``, which samples pixel centres like PIL)."""
    h, w = max(1, int(size[0])), max(1, int(size[1]))
    if tuple(image.shape[-2:]) != (h, w):
        image = F.interpolate(
            image[None], size=(h, w), mode=interpolation, align_corners=False, antialias=True
        )[0]
    if mask is not None and tuple(mask.shape[-2:]) != (h, w):
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].long()
    return image, mask


def crop(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    top: int,
    left: int,
    height: int,
    width: int,
    pad_image: float | Sequence[float] = 0.0,
    pad_mask: int = IGNORE_INDEX,
) -> Sample:
    """Cut the box ``[top, top+height) x [left, left+width)``; parts outside the image are padded.

    ``top``/``left`` may be negative (the image then sits inside a padded canvas).
    """
    _, h, w = image.shape
    fill = torch.as_tensor(pad_image, dtype=image.dtype).reshape(-1, 1, 1)
    out_image = fill.expand(image.shape[0], height, width).clone()
    # The overlap of the box with the image, in image and in canvas coordinates.
    y0, y1 = max(top, 0), min(top + height, h)
    x0, x1 = max(left, 0), min(left + width, w)
    out_mask = None
    if mask is not None:
        out_mask = torch.full((height, width), pad_mask, dtype=mask.dtype)
    if y1 > y0 and x1 > x0:
        out_image[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
        if mask is not None:
            out_mask[y0 - top : y1 - top, x0 - left : x1 - left] = mask[y0:y1, x0:x1]
    return out_image, out_mask


def hflip(image: torch.Tensor, mask: torch.Tensor | None) -> Sample:
    """Mirror left-right."""
    return image.flip(-1), None if mask is None else mask.flip(-1)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = rgb.unbind(0)
    maxc, argmax = rgb.max(0)
    minc = rgb.min(0).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    # Hue sector depends on which channel is largest.
    hue = torch.where(
        argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(0)
    # Standard piecewise-linear form: each channel is v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype).reshape(3, 1, 1)
    k = (n + h[None] * 6.0) % 6.0
    return v[None] - v[None] * s[None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _grey(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, ``(1, H, W)``."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).reshape(3, 1, 1)
    return (image * weights).sum(0, keepdim=True)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale all channels by ``factor``."""
    return (image * factor).clamp_(0.0, 1.0)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean grey level."""
    mean = _grey(image).mean()
    return (factor * image + (1.0 - factor) * mean).clamp_(0.0, 1.0)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the grey image."""
    return (factor * image + (1.0 - factor) * _grey(image)).clamp_(0.0, 1.0)


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (``shift`` in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(image.clamp(0.0, 1.0))
    hsv[0] = (hsv[0] + shift) % 1.0
    return hsv_to_rgb(hsv)


# ------------------------------------------------------------------------------------------------ classes


class ToTensor:
    """uint8 ``(H, W, 3)`` array -> float ``(3, H, W)`` in [0, 1]; mask array -> long tensor.

    Tensors already in that form pass through, so it is harmless at the head of any pipeline.
    """

    def __call__(self, image: Any, mask: Any = None, generator: torch.Generator | None = None) -> Sample:
        return to_tensor(image), mask_to_tensor(mask)

    def __repr__(self) -> str:
        return "ToTensor()"


class Resize:
    """Resize to a fixed size: an int sets the short side (aspect kept), a pair ``(h, w)`` sets both."""

    def __init__(self, size: Size, interpolation: str = "bilinear"):
        self.size = size
        self.interpolation = interpolation

    def target(self, height: int, width: int) -> tuple[int, int]:
        """The output ``(h, w)`` for an input of ``height x width``."""
        if isinstance(self.size, int):
            scale = self.size / min(height, width)
            return max(1, round(height * scale)), max(1, round(width * scale))
        return _pair(self.size)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        return resize(image, mask, self.target(*image.shape[-2:]), self.interpolation)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomScale:
    """Scale both sides by one factor drawn uniformly from ``scale_range``."""

    def __init__(self, scale_range: Sequence[float], interpolation: str = "bilinear"):
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got {scale_range}")
        self.low, self.high = low, high
        self.interpolation = interpolation

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        factor = _uniform(self.low, self.high, generator)
        h, w = image.shape[-2:]
        return resize(image, mask, (round(h * factor), round(w * factor)), self.interpolation)

    def __repr__(self) -> str:
        return f"RandomScale(({self.low}, {self.high}))"


class RandomResizeLong:
    """GETAM/PSA augmentation: resize so that the long side is a random integer in ``[min_long, max_long]``."""

    def __init__(self, min_long: int, max_long: int, interpolation: str = "bilinear"):
        if not 0 < min_long <= max_long:
            raise ValueError(f"need 0 < min_long <= max_long, got {min_long}, {max_long}")
        self.min_long, self.max_long = int(min_long), int(max_long)
        self.interpolation = interpolation

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        target = _randint(self.min_long, self.max_long, generator)
        h, w = image.shape[-2:]
        scale = target / max(h, w)
        return resize(image, mask, (round(h * scale), round(w * scale)), self.interpolation)

    def __repr__(self) -> str:
        return f"RandomResizeLong({self.min_long}, {self.max_long})"


class RandomResizedCrop:
    """Crop a random box of relative area in ``scale`` and aspect ratio (w/h) in ``ratio``, resized to ``size``.

    The box is drawn as in the usual Inception-style recipe: up to 10 tries of (area, log-uniform ratio);
    if none fits, the largest central box with a ratio clamped into ``ratio``.
    """

    def __init__(
        self,
        size: Size,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
    ):
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        if not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"bad scale {scale} or ratio {ratio}")
        self.interpolation = interpolation

    def box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """Draw ``(top, left, h, w)`` for an image of ``height x width``."""
        area = height * width
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(log_low, log_high, generator))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return _randint(0, height - h, generator), _randint(0, width - w, generator), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        top, left, h, w = self.box(*image.shape[-2:], generator)
        image, mask = crop(image, mask, top, left, h, w)
        return resize(image, mask, self.size, self.interpolation)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomCrop:
    """Random ``size`` crop. A side shorter than the crop is padded instead: the image is placed at a random
    offset inside the canvas (as GETAM does), with ``pad_image`` in the image and ``pad_mask`` in the mask."""

    def __init__(self, size: Size, pad_image: float | Sequence[float] = 0.0, pad_mask: int = IGNORE_INDEX):
        self.size = _pair(size)
        self.pad_image = pad_image
        self.pad_mask = pad_mask

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        h, w = image.shape[-2:]
        ch, cw = self.size
        # Offset range covers both cases: crop inside a large image, or image inside a large canvas.
        top = _randint(min(0, h - ch), max(0, h - ch), generator)
        left = _randint(min(0, w - cw), max(0, w - cw), generator)
        return crop(image, mask, top, left, ch, cw, self.pad_image, self.pad_mask)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class CenterCrop:
    """Central ``size`` crop, padding symmetrically where the image is smaller."""

    def __init__(self, size: Size, pad_image: float | Sequence[float] = 0.0, pad_mask: int = IGNORE_INDEX):
        self.size = _pair(size)
        self.pad_image = pad_image
        self.pad_mask = pad_mask

    @staticmethod
    def _offset(length: int, crop_length: int) -> int:
        if length >= crop_length:
            return (length - crop_length) // 2
        return -((crop_length - length) // 2)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        h, w = image.shape[-2:]
        ch, cw = self.size
        top, left = self._offset(h, ch), self._offset(w, cw)
        return crop(image, mask, top, left, ch, cw, self.pad_image, self.pad_mask)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        if _chance(self.p, generator):
            return hflip(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class ColorJitter:
    """Random brightness, contrast, saturation (factors in ``[max(0, 1-x), 1+x]``) and hue (shift in
    ``[-hue, hue]`` turns), applied in a random order, the whole with probability ``p``. Image only."""

    def __init__(
        self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0, p: float = 1.0
    ):
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {hue}")
        if min(brightness, contrast, saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be >= 0")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p = float(p)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        if not _chance(self.p, generator):
            return image, mask
        ops: list[Callable[[torch.Tensor, float], torch.Tensor]] = [
            adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue
        ]
        ranges = [
            (max(0.0, 1 - self.brightness), 1 + self.brightness),
            (max(0.0, 1 - self.contrast), 1 + self.contrast),
            (max(0.0, 1 - self.saturation), 1 + self.saturation),
            (-self.hue, self.hue),
        ]
        order = torch.randperm(4, generator=generator).tolist()
        # Draw every factor even when unused, so the stream consumed is the same for every setting.
        factors = [_uniform(low, high, generator) for low, high in ranges]
        identity = [1.0, 1.0, 1.0, 0.0]
        for k in order:
            if factors[k] != identity[k] and ranges[k][0] != ranges[k][1]:
                image = ops[k](image, factors[k])
        return image, mask

    def __repr__(self) -> str:
        return f"ColorJitter({self.brightness}, {self.contrast}, {self.saturation}, {self.hue}, p={self.p})"


class Normalize:
    """``(image - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std}")

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        return (image - self.mean) / self.std, mask

    def __repr__(self) -> str:
        return f"Normalize({self.mean.flatten().tolist()}, {self.std.flatten().tolist()})"


def denormalize(
    image: torch.Tensor, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
) -> torch.Tensor:
    """Undo :class:`Normalize` on ``(..., 3, H, W)`` (e.g. to feed raw colours to PAMR or a CRF)."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    return image * std_t + mean_t


class HidePatches:
    """Hide-and-Seek (Singh & Lee, 2017): blank each ``size`` x ``size`` grid cell with probability ``p``.

    A classifier that cannot rely on the most discriminative part of an object learns to use all of it, which
    counters the partial activation of class maps. Applied after normalisation, a hidden cell is 0 (the mean colour).
    The mask is left alone: image-level labels still say what the crop contains.
    """

    def __init__(self, size: int, p: float):
        if size < 1 or not 0.0 <= p < 1.0:
            raise ValueError(f"hide_patches needs size >= 1 and 0 <= p < 1, got {size}, {p}")
        self.size, self.p = int(size), float(p)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: Gen = None) -> Sample:
        h, w = image.shape[-2:]
        cells = (-(-h // self.size), -(-w // self.size))
        keep = (torch.rand(cells, generator=generator) >= self.p).to(image.dtype)
        keep = keep.repeat_interleave(self.size, 0)[:h].repeat_interleave(self.size, 1)[:, :w]
        return image * keep, mask

    def __repr__(self) -> str:
        return f"HidePatches({self.size}, p={self.p})"


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Callable[..., Sample]]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, mask: Any = None, generator: torch.Generator | None = None) -> Sample:
        for t in self.transforms:
            image, mask = t(image, mask, generator)
        return image, mask

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


# ------------------------------------------------------------------------------------------------ factory

_KNOWN_KEYS = {
    "resize", "resize_long", "random_scale", "crop", "crop_mode", "scale", "ratio", "hflip",
    "color_jitter", "color_jitter_p", "mean", "std", "pad_mask", "interpolation", "hide_patches",
    "rand_augment", "random_erasing", "random_erasing_mode",
}


def _pad_colour(mean: Sequence[float] | None) -> float | list[float]:
    # Pad with the mean colour, so that after normalisation the padding is exactly 0 (as in GETAM,
    # which normalises first and zero-pads after).
    return 0.0 if mean is None else [float(m) for m in mean]


def build_transforms(cfg: dict[str, Any]) -> Compose:
    """Build a training pipeline from a plain dict.

    Keys (all optional): ``resize`` (int short side or ``[h, w]``), ``resize_long`` (``[min, max]``, GETAM),
    ``random_scale`` (``[low, high]`` factor), ``crop`` (int or ``[h, w]``) with ``crop_mode`` ``random``
    (default; pads when smaller) / ``center`` / ``resized``; ``scale`` and ``ratio`` (a RandomResizedCrop of
    ``crop``; giving ``scale`` selects ``resized``), ``hflip`` (bool or probability), ``color_jitter``
    (``[b, c, s, h]``) with ``color_jitter_p``, ``mean`` / ``std`` (default 0.5; ``null`` disables
    normalisation), ``pad_mask`` (255), ``interpolation`` (``bilinear``), ``rand_augment`` (a timm policy string
    such as ``rand-m9-mstd0.5-inc1``), ``random_erasing`` (its probability) with ``random_erasing_mode``
    (``pixel``).

    Order: resize -> random resize -> hflip -> colour jitter -> crop -> RandAugment -> normalise -> random erasing
    -> hide patches (``hide_patches: [size, p]``, Hide-and-Seek). timm's ImageNet train transform has the same
    order: crop, flip, RandAugment, normalise, erasing.
    """
    unknown = set(cfg) - _KNOWN_KEYS
    if unknown:
        raise ConfigError(f"unknown transform keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
    interp = cfg.get("interpolation", "bilinear")
    if interp not in ("bilinear", "bicubic"):
        raise ConfigError(f"interpolation must be 'bilinear' or 'bicubic', got {interp!r}")
    mean = cfg.get("mean", DEFAULT_MEAN)
    std = cfg.get("std", DEFAULT_STD)
    if (mean is None) != (std is None):
        raise ConfigError("give both 'mean' and 'std', or neither")
    steps: list[Callable[..., Sample]] = [ToTensor()]
    try:
        if cfg.get("resize") is not None:
            size = cfg["resize"]
            steps.append(Resize(size if isinstance(size, int) else _pair(size), interp))
        if cfg.get("resize_long") is not None:
            steps.append(RandomResizeLong(*cfg["resize_long"], interpolation=interp))
        if cfg.get("random_scale") is not None:
            steps.append(RandomScale(cfg["random_scale"], interp))
        flip = cfg.get("hflip", False)
        if flip:
            steps.append(RandomHorizontalFlip(0.5 if flip is True else float(flip)))
        jitter = cfg.get("color_jitter")
        if jitter:
            steps.append(ColorJitter(*[float(v) for v in jitter], p=float(cfg.get("color_jitter_p", 1.0))))
        if cfg.get("crop") is not None:
            mode = cfg.get("crop_mode", "resized" if "scale" in cfg else "random")
            pad_mask = int(cfg.get("pad_mask", IGNORE_INDEX))
            if mode == "random":
                steps.append(RandomCrop(cfg["crop"], _pad_colour(mean), pad_mask))
            elif mode == "center":
                steps.append(CenterCrop(cfg["crop"], _pad_colour(mean), pad_mask))
            elif mode == "resized":
                steps.append(
                    RandomResizedCrop(
                        cfg["crop"], cfg.get("scale", (0.08, 1.0)), cfg.get("ratio", (3 / 4, 4 / 3)), interp
                    )
                )
            else:
                raise ConfigError(f"crop_mode must be 'random', 'center' or 'resized', got {mode!r}")
        elif cfg.get("scale") is not None or cfg.get("ratio") is not None:
            raise ConfigError("'scale'/'ratio' set the random resized crop and need 'crop'")
        if cfg.get("rand_augment"):
            from .randaugment import RandAugment

            # timm fills the geometric ops with the normalisation mean as 0..255 colour.
            fill = [min(255, round(255 * m)) for m in (mean if mean is not None else (0.5, 0.5, 0.5))]
            steps.append(RandAugment.from_policy(str(cfg["rand_augment"]), fill=fill, interpolation=interp))
        if mean is not None:
            steps.append(Normalize(mean, std))
        if cfg.get("random_erasing"):
            from .randaugment import RandomErasing

            steps.append(RandomErasing(float(cfg["random_erasing"]), cfg.get("random_erasing_mode", "pixel")))
        if cfg.get("hide_patches") is not None:
            steps.append(HidePatches(*cfg["hide_patches"]))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"bad transform settings {cfg}: {exc}") from exc
    return Compose(steps)


def eval_transforms(
    size: Size | None = None,
    mean: Sequence[float] | None = DEFAULT_MEAN,
    std: Sequence[float] | None = DEFAULT_STD,
    interpolation: str = "bilinear",
) -> Compose:
    """Deterministic pipeline: optional :class:`Resize` (int short side or ``(h, w)``), then normalise."""
    steps: list[Callable[..., Sample]] = [ToTensor()]
    if size is not None:
        steps.append(Resize(size, interpolation))
    if mean is not None and std is not None:
        steps.append(Normalize(mean, std))
    return Compose(steps)


def preprocess(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One ``(H, W, 3)`` uint8 image (:func:`wsss.data.io.read_image`) as the normalised ``(1, 3, H, W)`` batch a
    model and :func:`wsss.localize.localize` take. ``mean``/``std``: the model's (a run's ``spec.mean`` and
    ``spec.std``; 0.5 for the shared ImageNet ViT-Ti)."""
    tensor, _ = eval_transforms(None, mean, std)(image)
    return tensor[None]
