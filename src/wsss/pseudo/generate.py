"""One image's pseudo label from the files on disk: maps, image, optional saliency and attention affinity.

:class:`PseudoSettings` gathers every choice (so it can be sent to worker processes) and
:func:`pseudo_label_for` reads the inputs of one image, checks they fit together and applies the rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.io import IGNORE_INDEX, load_maps, read_image, read_mask, read_npz
from ..errors import ConfigError, DataError
from ..refine.crf import CRFParams
from ..refine.refiner import REFINEMENTS, Refiner, make_refiner
from .completion import label_completion
from .labels import maps_to_labels, psa_confident_labels, psa_labels, two_threshold_labels

RULES = ("threshold", "two_thresholds", "psa", "psa_confident", "completion")


@dataclass(frozen=True)
class PseudoSettings:
    """How to turn ``maps_dir/<id>.npz`` into a label map.

    ``rule`` is one of :data:`RULES` with its parameters (``bg_threshold``; ``high``/``low``;
    ``alpha``; ``low_alpha``/``high_alpha`` (PSA's confident labels for AffinityNet, 255 between); ``cut_threshold``
    and an optional ``saliency_dir`` of ``<id>.png``, > 0 = salient).
    ``refine`` is one of :data:`wsss.refine.REFINEMENTS`; ``affinity_dir`` holds ``<id>.npz`` files
    with ``affinity`` (N, N) and ``grid`` (h, w) for the ``affinity`` refinement. ``scale`` resizes the
    score stack before the refinement (AReAM uses 0.5). Datasets without a background class get 255
    (ignore) where the rule says background.
    """

    maps_dir: Path | None  # None: the maps come from a model, not from files
    num_classes: int
    has_background: bool
    rule: str
    bg_threshold: float = 0.5
    high: float = 0.55
    low: float = 0.35
    alpha: float = 1.0
    low_alpha: float = 1.0
    high_alpha: float = 12.0
    cut_threshold: float = 0.9
    saliency_dir: Path | None = None
    refine: str = "none"
    iterations: int = 10
    crf: str | CRFParams = "psa"
    affinity_dir: Path | None = None
    affinity_power: float = 1.0
    affinity_steps: int = 1
    affinity_normalize: str = "row"
    scale: float = 1.0
    softmax: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"unknown pseudo-label rule {self.rule!r}; choose one of {RULES}")
        if self.refine not in REFINEMENTS:
            raise ConfigError(f"unknown refinement {self.refine!r}; choose one of {REFINEMENTS}")
        if self.refine == "affinity" and self.affinity_dir is None:
            raise ConfigError("the affinity refinement needs a folder of <id>.npz attention affinities (--affinity)")
        if self.rule == "completion" and self.refine == "crf":
            raise ConfigError("label completion refines the class maps alone; a CRF needs a background channel")
        if self.saliency_dir is not None and self.rule != "completion":
            raise ConfigError("a saliency folder is only used by label completion")
        if self.rule == "psa_confident" and (self.low_alpha > self.high_alpha or self.softmax or self.scale != 1):
            raise ConfigError("PSA's confident labels take LOW <= HIGH alphas, on the maps at full size without a "
                              f"softmax (got {self.low_alpha}, {self.high_alpha}, softmax {self.softmax}, scale "
                              f"{self.scale})")
        if not 0 < self.scale <= 1:
            raise ConfigError(f"scale must lie in (0, 1], got {self.scale}")

    @property
    def background_label(self) -> int:
        return 0 if self.has_background else IGNORE_INDEX

    def maps_path(self, image_id: str) -> Path:
        if self.maps_dir is None:
            raise ConfigError("these pseudo-label settings read no maps files")
        return self.maps_dir / f"{image_id}.npz"

    def describe(self) -> dict[str, Any]:
        """Every setting as JSON data (folders as absolute paths, a CRF's parameters as a dict), for the manifest
        of an output folder: two runs with equal descriptions write the same labels from the same inputs."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, Path):
                value = str(value.expanduser().resolve())
            elif isinstance(value, CRFParams):
                value = asdict(value)
            out[name] = value
        return out


def _read_affinity(path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
    arrays = read_npz(path, ("affinity", "grid"), "affinity")
    affinity, grid = arrays["affinity"].astype(np.float32), arrays["grid"].astype(np.int64).reshape(-1)
    if grid.size != 2 or affinity.ndim != 2 or affinity.shape != (grid[0] * grid[1],) * 2:
        raise DataError(path, f"affinity {affinity.shape} is not (N, N) for the grid {grid.tolist()}")
    return torch.from_numpy(affinity), (int(grid[0]), int(grid[1]))


def read_maps_for(path: Path, num_classes: int, has_background: bool, image_id: str,
                  image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(maps (K, H, W), classes (K,))`` of one image's maps file, checked against the class set and the image
    size (a :class:`DataError` naming the file otherwise)."""
    maps, classes = load_maps(path, num_classes)
    if has_background and np.any(classes == 0):
        raise DataError(path, "maps include the background label 0: they were made for a class set without background")
    if maps.shape[1:] != tuple(image_size):
        raise DataError(
            path, f"maps are {maps.shape[1]}x{maps.shape[2]} but image {image_id!r} is {image_size[0]}x{image_size[1]}"
        )
    if not np.all(np.isfinite(maps)):
        raise DataError(path, "maps hold NaN or infinite values")
    return maps, classes


def pseudo_label_for(settings: PseudoSettings, image_id: str, image_path: Path) -> np.ndarray:
    """The ``(H, W)`` uint8 pseudo label of one image (dataset labels, 255 = ignore), from its maps file."""
    if settings.maps_dir is None:
        raise ConfigError("these pseudo-label settings have no maps folder: pass the maps to pseudo_label")
    image = read_image(image_path)
    maps, classes = read_maps_for(settings.maps_path(image_id), settings.num_classes, settings.has_background,
                                  image_id, image.shape[:2])
    return pseudo_label(settings, image_id, image, maps, classes)


def pseudo_label(settings: PseudoSettings, image_id: str, image: np.ndarray, maps: np.ndarray,
                 classes: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` uint8 pseudo label of one image from its maps ``(K, H, W)`` in [0, 1] and their dataset
    labels ``(K,)`` (read from a file, or computed from a checkpoint on the fly)."""
    if maps.shape[1:] != image.shape[:2]:
        raise DataError(None, f"maps of image {image_id!r} are {maps.shape[1]}x{maps.shape[2]} but the image is "
                        f"{image.shape[0]}x{image.shape[1]}")
    affinity, grid = None, None
    if settings.refine == "affinity" and settings.affinity_dir is not None:
        affinity, grid = _read_affinity(settings.affinity_dir / f"{image_id}.npz")
    refiner = make_refiner(
        settings.refine, image, iterations=settings.iterations, crf=settings.crf, affinity=affinity, grid=grid,
        affinity_power=settings.affinity_power, affinity_steps=settings.affinity_steps,
        affinity_normalize=settings.affinity_normalize,
    )
    maps_t = torch.from_numpy(maps)
    common = dict(refine=refiner, background_label=settings.background_label)
    if settings.rule == "threshold":
        labels = maps_to_labels(
            maps_t, classes, settings.bg_threshold, softmax=settings.softmax, scale=settings.scale, **common
        )
    elif settings.rule == "two_thresholds":
        labels = two_threshold_labels(maps_t[None], torch.as_tensor(classes)[None], settings.high, settings.low,
                                      scale=settings.scale, **common)[0]
    elif settings.rule == "psa":
        labels = psa_labels(maps_t, classes, settings.alpha, softmax=settings.softmax, scale=settings.scale, **common)
    elif settings.rule == "psa_confident":
        labels = psa_confident_labels(maps_t, classes, settings.low_alpha, settings.high_alpha, **common)
    else:
        labels = _completion(settings, image_id, maps_t, classes, refiner)
    return labels.numpy().astype(np.uint8)


def _completion(
    settings: PseudoSettings, image_id: str, maps: torch.Tensor, classes: np.ndarray, refiner: Refiner | None
) -> torch.Tensor:
    if refiner is not None and maps.shape[0]:
        # GETAM refines the class maps, then divides each by its maximum (+1e-5).
        maps = refiner(maps.unsqueeze(0))[0]
        maps = maps / (maps.amax(dim=(1, 2), keepdim=True) + 1e-5)
    saliency = None
    if settings.saliency_dir is not None:
        path = settings.saliency_dir / f"{image_id}.png"
        saliency_np = read_mask(path)
        if saliency_np.shape != tuple(maps.shape[1:]):
            raise DataError(path, f"saliency is {saliency_np.shape} but the maps are {tuple(maps.shape[1:])}")
        saliency = torch.from_numpy(saliency_np)
    return label_completion(
        maps, classes, saliency, settings.cut_threshold, background_label=settings.background_label
    )
