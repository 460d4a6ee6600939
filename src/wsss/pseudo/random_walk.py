"""PSA's mask step over a split: each image's seeds random-walked with a trained AffinityNet's affinities.

For each image (PSA's ``infer_aff.py``): the normalised image is zero-padded at the bottom and right to a multiple
of the network's feature stride, the network gives the dense affinity on its feature grid, and the image's saved
maps (``wsss cam``) are walked with :func:`wsss.refine.affinity.psa_random_walk` (a constant background score, the
affinity raised to ``beta``, ``2^log_steps`` steps); the label is the argmax, mapped to dataset labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..data.io import IGNORE_INDEX, write_mask
from ..data.manifest import OutputManifest, pending
from ..data.transforms import eval_transforms
from ..data.voc import VOCDataset
from ..errors import DataError
from ..refine.affinity import PSA_BACKGROUND, PSA_BETA, PSA_LOGT, psa_random_walk
from .generate import read_maps_for
from .labels import channels_to_labels, sorted_by_label


@dataclass(frozen=True)
class WalkSettings:
    """The random walk's parameters (methods.md §4: AReAM's ``main_psa.sh``)."""

    background: float = PSA_BACKGROUND  # constant background score in front of the maps
    beta: float = PSA_BETA  # power of the affinity
    log_steps: int = PSA_LOGT  # 2^log_steps steps

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def walk_settings_of(config: Mapping[str, Any] | None, background: float = PSA_BACKGROUND,
                     beta: float | None = None, log_steps: int | None = None) -> WalkSettings:
    """The walk an AffinityNet run's resolved ``config`` asks for (its ``method.walk_beta`` and
    ``method.walk_log_steps``; PSA's 8 and 6 for a run that names none), where ``beta``/``log_steps`` are not given."""
    method = (config or {}).get("method") or {}
    return WalkSettings(background=background,
                        beta=float(method.get("walk_beta", PSA_BETA) if beta is None else beta),
                        log_steps=int(method.get("walk_log_steps", PSA_LOGT) if log_steps is None else log_steps))


def feature_stride(model: nn.Module) -> int:
    """The stride of an AffinityNet's feature grid (8 for ResNet-38, the patch size for a ViT)."""
    stride = getattr(model, "feature_stride", None)
    if not isinstance(stride, int) or stride < 1:
        raise TypeError(f"{type(model).__name__} is not an AffinityNet (it has no feature_stride)")
    return stride


@torch.inference_mode()
def walk_label(model: nn.Module, image: Tensor, maps: Tensor, classes: Sequence[int] | Tensor,
               settings: WalkSettings = WalkSettings(), background_label: int = 0) -> Tensor:
    """The ``(H, W)`` int64 label of one normalised image ``(3, H, W)`` from its maps ``(K, H, W)`` in [0, 1] with
    dataset labels ``classes``."""
    stride = feature_stride(model)
    height, width = image.shape[-2:]
    if maps.shape[-2:] != (height, width):
        raise ValueError(f"maps {tuple(maps.shape)} do not fit the {height}x{width} image")
    maps, classes_t = sorted_by_label(maps, classes)
    padded = F.pad(image[None], (0, -width % stride, 0, -height % stride))
    affinity = model.dense_affinity(padded).float()
    walked = psa_random_walk(maps[None].to(affinity), affinity, stride, settings.background, settings.beta,
                             settings.log_steps)
    return channels_to_labels(walked[0].argmax(dim=0).cpu(), classes_t, background_label)


def walk_split(model: nn.Module, dataset: VOCDataset, maps_dir: str | Path, out_dir: str | Path,
               settings: WalkSettings = WalkSettings(), mean: Sequence[float] = (0.5, 0.5, 0.5),
               std: Sequence[float] = (0.5, 0.5, 0.5), device: torch.device | str = "cpu",
               indices: Sequence[int] | None = None, manifest: OutputManifest | None = None,
               progress: bool = True) -> tuple[int, int]:
    """Write ``out_dir/<id>.png`` for every image of ``dataset`` (those of ``indices``) from ``maps_dir/<id>.npz``;
    with ``manifest``, the PNGs it lists unchanged are kept (a resumed run), every PNG written is recorded.
    Returns ``(written, skipped)``."""
    out_dir, maps_dir = Path(out_dir), Path(maps_dir)
    indices = list(range(len(dataset)) if indices is None else indices)
    names = {i: f"{dataset.ids[i]}.png" for i in indices}
    todo = pending(names, out_dir, manifest)
    transform = eval_transforms(None, mean, std)
    background_label = 0 if dataset.classes.has_background else IGNORE_INDEX
    palette = dataset.palette()  # the labels in the dataset's own colours
    model = model.to(device).eval()
    for i in tqdm(todo, desc="random walk", unit="img", disable=not progress):
        pixels = dataset.load_image(i)
        maps, classes = read_maps_for(maps_dir / f"{dataset.ids[i]}.npz", dataset.classes.num_classes,
                                      dataset.classes.has_background, dataset.ids[i], pixels.shape[:2])
        image, _ = transform(pixels)
        try:
            label = walk_label(model, image.to(device), torch.from_numpy(maps).to(device), classes, settings,
                               background_label)
        except ValueError as exc:  # an image too small for the pair radius on the feature grid
            raise DataError(dataset.image_path(dataset.ids[i]), str(exc)) from exc
        write_mask(out_dir / names[i], label.numpy().astype(np.uint8), palette)
        if manifest is not None:
            manifest.record(names[i])
    return len(todo), len(indices) - len(todo)
