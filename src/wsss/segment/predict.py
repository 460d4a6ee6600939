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
from ..data.transforms import eval_transforms
from ..data.voc import VOCDataset
from ..refine.crf import CRFParams, dense_crf
from .model import SegmentationModel


def resize_to_patches(images: Tensor, scale: float, patch: int) -> Tensor:
    """``images`` scaled by ``scale`` and rounded to a multiple of ``patch`` on each side (bilinear)."""
    h, w = images.shape[-2:]
    size = (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def predict_probs(model: SegmentationModel, images: Tensor, scales: Sequence[float] = (1.0,),
                  flip: bool = False) -> Tensor:
    """Class probabilities ``(B, C, H, W)`` of normalised ``images`` ``(B, 3, H, W)``.

    Each view (every scale, and its mirror image with ``flip``) is resized to a multiple of the patch size; its
    logits are upsampled to ``H x W`` (bilinear), un-flipped and averaged with the others before the softmax.
    """
    if not scales:
        raise ValueError("give at least one scale")
    h, w = images.shape[-2:]
    total = None
    views = 0
    for scale in scales:
        view = resize_to_patches(images, scale, model.patch_size)
        for flipped in (False, True) if flip else (False,):
            logits = model(view.flip(-1) if flipped else view).logits
            logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
            logits = logits.flip(-1) if flipped else logits
            total = logits if total is None else total + logits
            views += 1
    return (total / views).softmax(dim=1)


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


def predict_split(model: SegmentationModel, dataset: VOCDataset, out_dir: str | Path,
                  scales: Sequence[float] = (1.0,), flip: bool = False, crf: str | CRFParams | None = None,
                  mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                  device: torch.device | str = "cpu") -> tuple[int, int]:
    """Write ``out_dir/<id>.png`` (atomic, VOC palette) for every image of ``dataset`` that has none yet.

    Returns ``(written, skipped)``. Images are processed one at a time at their own size.
    """
    out_dir = Path(out_dir)
    transform = eval_transforms(None, mean, std)
    todo = [i for i, image_id in enumerate(dataset.ids) if not (out_dir / f"{image_id}.png").is_file()]
    model = model.to(device).eval()
    for i in tqdm(todo, desc="predict", unit="img"):
        image = dataset.load_image(i)
        tensor, _ = transform(image)
        probs = predict_probs(model, tensor[None].to(device), scales, flip)[0]
        write_mask(out_dir / f"{dataset.ids[i]}.png", probs_to_labels(probs, image, crf))
    return len(todo), len(dataset) - len(todo)
