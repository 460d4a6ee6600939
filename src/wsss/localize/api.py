"""``localize``: one call for every map method of the registry (:mod:`wsss.methods`)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..methods import REGISTRY


def localize(model: nn.Module, images: Tensor, classes: Tensor | Sequence[Sequence[int]], method: str = "getam",
             scales: Sequence[float] = (1.0,), flip: bool = False, normalize: bool = True,
             memory_budget: int | str | None = None, square_sizes: Sequence[int] | None = None,
             **options) -> Tensor:
    """Localisation maps ``(B, K, H, W)`` for ``classes`` (classifier output indices) of ``images``.

    ``method`` is any map of ``wsss methods`` (cam, gradcam, rollout, getam, acr, aream, plug-ins). Each map is
    min-max normalised to [0, 1] at the input's H x W (``normalize=False``: the raw non-negative sum over the
    views). ``memory_budget`` bounds the bytes of one pass (bytes or ``"4G"``; default: see
    :func:`wsss.localize.base.default_memory_budget`): a larger view runs in chunks or at a reduced size.
    ``square_sizes`` replaces ``scales`` with views resized to ``S x S`` (ACR's ``[384]``; see
    :meth:`wsss.localize.Localizer.__call__`).
    ``options`` go to the method's class (e.g. ``start_layer``, ``grad_power`` for getam).
    """
    with REGISTRY.localizer(method)(model, **options) as loc:
        return loc(images, classes, scales=scales, flip=flip, normalize=normalize, memory_budget=memory_budget,
                   square_sizes=square_sizes)
