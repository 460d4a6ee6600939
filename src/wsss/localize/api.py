"""``localize``: one call for every map method."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .acr import ACR
from .aream import AReAM
from .base import Localizer
from .cam import CAM
from .getam import GETAM
from .gradcam import GradCAM
from .rollout import Rollout

METHODS: dict[str, type[Localizer]] = {
    "cam": CAM,
    "gradcam": GradCAM,
    "rollout": Rollout,
    "getam": GETAM,
    "acr": ACR,
    "aream": AReAM,
}


def localize(model: nn.Module, images: Tensor, classes: Tensor | Sequence[Sequence[int]], method: str = "getam",
             scales: Sequence[float] = (1.0,), flip: bool = False, normalize: bool = True, **options) -> Tensor:
    """Localisation maps ``(B, K, H, W)`` for ``classes`` (classifier output indices) of ``images``.

    Each map is min-max normalised to [0, 1] at the input's H x W (``normalize=False``: the raw non-negative sum
    over the views). ``options`` go to the method's class (e.g. ``start_layer``, ``grad_power`` for getam).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    with METHODS[method](model, **options) as loc:
        return loc(images, classes, scales=scales, flip=flip, normalize=normalize)
