"""The ``affinity`` training objective: PSA's AffinityNet trained on the pair labels of confident pseudo labels.

The batch ``mask`` holds the confident labels (``wsss pseudo --psa-confident 1 12``: class, 0 = background,
255 = unsure), cropped and flipped with the image by the engine. They are nearest-downsampled to the network's
feature grid (PSA's ``RescaleNearest(0.125)`` after the crop), turned into pair labels within ``radius``
(:func:`.pairs.pair_labels`) and scored with PSA's loss (:func:`.pairs.affinity_loss`).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...data.classes import ClassSet
from ...errors import ConfigError
from ...models.affinitynet import PSA_RADIUS, build_affinity_net, pair_affinity
from ...refine.affinity import PSA_BETA, PSA_LOGT
from ..registry import MethodOptions
from .pairs import affinity_loss, pair_labels


class AffinityOptions(MethodOptions):
    """``method.name: affinity``."""

    radius: int = Field(PSA_RADIUS, ge=2)  # pairs closer than this many feature cells (PSA: 5 at stride 8)
    levels: list[int] | None = None  # ViT blocks the head reads (default 5, 8, 11 of 12, scaled); unused on ResNet-38
    # The random walk this AffinityNet is used with: the checkpoint records it, and `wsss affinity walk` and the
    # pipeline walk with it unless told otherwise (random_walk.walk_settings_of).
    walk_beta: float = Field(PSA_BETA, gt=0)  # power of the affinity
    walk_log_steps: int = Field(PSA_LOGT, ge=0)  # 2^walk_log_steps steps


class AffinityObjective:
    """PSA's AffinityNet loss on the batch's confident labels."""

    def __init__(self, options: AffinityOptions, classes: ClassSet, **_: Any):
        self.options = options
        self.background_label = 0 if classes.has_background else -1

    def build_model(self, backbone: nn.Module) -> nn.Module:
        """AffinityNet on the configured backbone (:func:`~wsss.models.affinitynet.build_affinity_net`)."""
        try:
            return build_affinity_net(backbone, self.options.radius, self.options.levels)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        features = model(batch["image"])
        grid = features.shape[-2:]
        radius = self.options.radius
        if grid[0] < radius or grid[1] < 2 * radius - 1:
            raise ConfigError(f"a {tuple(batch['image'].shape[-2:])} crop gives a {grid[0]}x{grid[1]} feature grid, "
                              f"too small for pairs within method.radius={radius} (it needs {radius} rows and "
                              f"{2 * radius - 1} columns): raise data.transforms.crop or lower method.radius")
        labels = F.interpolate(batch["mask"][:, None].float(), size=grid, mode="nearest")[:, 0].long()
        targets = pair_labels(labels, self.options.radius, self.background_label)
        affinity = pair_affinity(features, self.options.radius)
        return affinity_loss(affinity, targets)
