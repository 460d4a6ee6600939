"""Inference of a segmentation model: multi-scale and flipped views, an optional dense CRF, label PNGs.

As in GETAM's ``test.py``, the logits of every view are upsampled to the image size, averaged and turned into
probabilities with a softmax; the optional CRF refines those probabilities with the image; the label is the argmax
(channel k = dataset label k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..data.io import write_mask
from ..data.manifest import OutputManifest
from ..data.batches import split_batches
from ..data.voc import VOCDataset
from ..models.multiview import sum_over_views
from ..models.segmenter import Segmenter
from ..refine.crf import CRFParams, dense_crf


@torch.inference_mode()
def predict_probs(model: Segmenter, images: Tensor, scales: Sequence[float] = (1.0,),
                  flip: bool = False, square_sizes: Sequence[int] | None = None) -> Tensor:
    """Class probabilities ``(B, C, H, W)`` of normalised ``images`` ``(B, 3, H, W)``.

    Each view (every scale, and its mirror image with ``flip``) is resized to a multiple of the patch size; its
    logits are upsampled to ``H x W`` (bilinear), un-flipped and averaged with the others before the softmax
    (:func:`wsss.models.multiview.sum_over_views`, the same views as the localisation maps). ``square_sizes``
    instead gives GETAM's test geometry (its ``test.py``): the image resized to each ``S x S`` (the aspect ratio
    not kept), the logits upsampled to ``H x W`` and averaged; ``scales`` and ``flip`` are then not used.
    """
    if square_sizes:
        h, w = images.shape[-2:]
        total = 0.0
        for size in square_sizes:
            view = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            total = total + F.interpolate(model(view).float(), size=(h, w), mode="bilinear", align_corners=False)
        return (total / len(square_sizes)).softmax(dim=1)
    total = sum_over_views(model, images, scales, flip, model.patch_size, align_corners=False)
    return (total / (len(scales) * (2 if flip else 1))).softmax(dim=1)


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


def predict_split(model: Segmenter, dataset: VOCDataset, out_dir: str | Path,
                  scales: Sequence[float] = (1.0,), flip: bool = False, crf: str | CRFParams | None = None,
                  mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                  device: torch.device | str = "cpu", indices: Sequence[int] | None = None,
                  manifest: OutputManifest | None = None, batch_size: int = 1, num_workers: int = 0,
                  progress: bool = True, square_sizes: Sequence[int] | None = None) -> tuple[int, int]:
    """Write ``out_dir/<id>.png`` (atomic, VOC palette) for every image of ``dataset`` (those of ``indices`` if
    given) that has none yet.

    With ``manifest`` (the :class:`~wsss.data.manifest.OutputManifest` of ``out_dir``) "has one" means "the manifest
    lists it unchanged": any other PNG is recomputed and replaced, and every PNG written is recorded. Without it any
    existing PNG counts as done. Returns ``(written, skipped)``. ``batch_size`` images of one size go through the
    model together (:func:`~wsss.data.batches.split_batches`), decoded by ``num_workers`` loader processes.
    ``square_sizes``: GETAM's test geometry instead of ``scales``/``flip`` (see :func:`predict_probs`).
    """
    out_dir = Path(out_dir)
    indices = list(range(len(dataset)) if indices is None else indices)
    names = {i: f"{dataset.ids[i]}.png" for i in indices}
    if manifest is None:
        todo = [i for i in indices if not (out_dir / names[i]).is_file()]
    else:
        manifest.warn_untrusted(names.values())
        todo = [i for i in indices if not manifest.trusted(names[i])]
    model = model.to(device).eval()
    with tqdm(total=len(todo), desc="predict", unit="img", disable=not progress) as bar:
        for images, batch in split_batches(dataset, todo, mean, std, batch_size, num_workers, device,
                                           pixels=crf is not None):
            probs = predict_probs(model, images, scales, flip, square_sizes)
            for row, item in enumerate(batch):
                write_mask(out_dir / names[item.index], probs_to_labels(probs[row], item.pixels, crf))
                if manifest is not None:
                    manifest.record(names[item.index])
                bar.update()
    return len(todo), len(indices) - len(todo)
