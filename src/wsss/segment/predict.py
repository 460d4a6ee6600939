"""Inference of a segmentation model: multi-scale and flipped views, an optional dense CRF, label PNGs.

The logits of every view are upsampled to the image size and fused into probabilities (:data:`FUSIONS`): ``mean``
averages the logits and takes the softmax (GETAM's ``test.py``), ``max`` takes the pixel-wise maximum of each
view size's softmax (AReAM's and MCTformer's ``seg/infer_seg.py``). The optional CRF refines those probabilities
with the image; the label is the argmax (channel k = dataset label k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..data.io import write_mask
from ..data.manifest import OutputManifest, pending
from ..data.batches import split_batches
from ..data.voc import VOCDataset
from ..errors import ConfigError
from ..models.multiview import sum_over_views
from ..refine.crf import CRFParams, dense_crf


FUSIONS = ("mean", "max")


def checked_fusion(fusion: str) -> str:
    """``fusion`` if it is one of :data:`FUSIONS`; a :class:`~wsss.errors.ConfigError` otherwise."""
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    return fusion


@torch.inference_mode()
def predict_probs(model: nn.Module, images: Tensor, scales: Sequence[float] = (1.0,),
                  flip: bool = False, square_sizes: Sequence[int] | None = None, fusion: str = "mean") -> Tensor:
    """Class probabilities ``(B, C, H, W)`` of normalised ``images`` ``(B, 3, H, W)`` from a segmentation model
    (``model(x)`` gives the logits; ``model.patch_size`` the multiple its inputs are resized to).

    Each view (every scale, and its mirror image with ``flip``) is resized to a multiple of the patch size (the
    stride of a DeepLab); its logits are upsampled to ``H x W`` (bilinear) and un-flipped
    (:func:`wsss.models.multiview.sum_over_views`, the same views as the localisation maps). ``square_sizes``
    instead gives GETAM's test geometry (its ``test.py``): the image resized to each ``S x S`` (the aspect ratio
    not kept); ``scales`` and ``flip`` are then not used.

    ``fusion`` ``mean`` averages the logits of all views, then takes the softmax. ``max`` takes the softmax of each
    view size (a scale, with its mirror image's logits averaged in under ``flip``; or a square size) and keeps the
    pixel-wise maximum over the sizes, as AReAM's test does (scales 0.5 to 1.5, no flip); those maxima are not
    renormalised (they need not sum to 1), as in AReAM, whose CRF reads them as they are.
    """
    checked_fusion(fusion)
    per_size = _logits_per_size(model, images, scales, flip, square_sizes)
    if fusion == "max":
        probs = next(per_size).softmax(dim=1)
        for logits in per_size:
            probs = torch.maximum(probs, logits.softmax(dim=1))
        return probs
    total, count = next(per_size), 1
    for logits in per_size:
        total, count = total + logits, count + 1
    return (total / count).softmax(dim=1)


def _logits_per_size(model: nn.Module, images: Tensor, scales: Sequence[float], flip: bool,
                     square_sizes: Sequence[int] | None) -> Iterator[Tensor]:
    """The logits at the image size of each view size: every square size, or every scale (the mean of the view
    and its mirror image with ``flip``), computed one at a time."""
    if square_sizes:
        # Each square rounded to the model's multiple, as the localisation maps' square views.
        for size in square_sizes:
            yield sum_over_views(model, images, [1.0], False, model.patch_size, align_corners=False,
                                 square_sizes=[size])
        return
    if not scales:
        raise ValueError("give at least one scale")
    for scale in scales:
        total = sum_over_views(model, images, [scale], flip, model.patch_size, align_corners=False)
        yield total / 2 if flip else total


def probs_to_labels(probs: Tensor, image: np.ndarray | None = None, crf: str | CRFParams | None = None) -> np.ndarray:
    """The ``(H, W)`` uint8 argmax label of one image's ``(C, H, W)`` probabilities, after a CRF if ``crf`` is set.

    ``image`` (``(H, W, 3)`` uint8) is needed for the CRF only.
    """
    scores = probs.detach().float().cpu()
    if crf is not None:
        if image is None:
            raise ValueError("the CRF needs the image")
        scores = torch.from_numpy(dense_crf(np.ascontiguousarray(image), scores.numpy(), crf))
    return scores.argmax(dim=0).numpy().astype(np.uint8)


def predict_split(model: nn.Module, dataset: VOCDataset, out_dir: str | Path,
                  scales: Sequence[float] = (1.0,), flip: bool = False, crf: str | CRFParams | None = None,
                  mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                  device: torch.device | str = "cpu", indices: Sequence[int] | None = None,
                  manifest: OutputManifest | None = None, batch_size: int = 1, num_workers: int = 0,
                  progress: bool = True, square_sizes: Sequence[int] | None = None,
                  fusion: str = "mean") -> tuple[int, int]:
    """Write ``out_dir/<id>.png`` (atomic, in the dataset's palette) for every image of ``dataset`` (those of ``indices`` if
    given) that has none yet.

    With ``manifest`` (the :class:`~wsss.data.manifest.OutputManifest` of ``out_dir``) "has one" means "the manifest
    lists it unchanged": any other PNG is recomputed and replaced, and every PNG written is recorded. Without it any
    existing PNG counts as done. Returns ``(written, skipped)``. ``batch_size`` images of one size go through the
    model together (:func:`~wsss.data.batches.split_batches`), decoded by ``num_workers`` loader processes.
    ``square_sizes``: views resized to squares instead of ``scales`` (GETAM's test); ``fusion``: how the views combine, ``mean``
    or ``max`` (see :func:`predict_probs`).
    """
    out_dir = Path(out_dir)
    indices = list(range(len(dataset)) if indices is None else indices)
    names = {i: f"{dataset.ids[i]}.png" for i in indices}
    todo = pending(names, out_dir, manifest)
    palette = dataset.palette()  # the labels in the dataset's own colours
    model = model.to(device).eval()
    with tqdm(total=len(todo), desc="predict", unit="img", disable=not progress) as bar:
        for images, batch in split_batches(dataset, todo, mean, std, batch_size, num_workers, device,
                                           pixels=crf is not None):
            probs = predict_probs(model, images, scales, flip, square_sizes, fusion)
            for row, item in enumerate(batch):
                write_mask(out_dir / names[item.index], probs_to_labels(probs[row], item.pixels, crf), palette)
                if manifest is not None:
                    manifest.record(names[item.index])
                bar.update()
    return len(todo), len(indices) - len(todo)
