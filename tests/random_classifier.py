"""A random classifier checkpoint for the command-line tests: a nano ViT whose weights are pushed away from their
initialisation, so that maps differ between images and classes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from wsss.data.voc import VOCDataset
from wsss.models import create_model
from wsss.models.checkpoint import describe, save


def save_random_classifier(path: Path, dataset: VOCDataset, seed: int, mean: Sequence[float],
                           std: Sequence[float]) -> torch.nn.Module:
    """Save a perturbed ``vit_nano_patch16`` classifier of ``dataset``'s classes at ``path``; return it (eval)."""
    torch.manual_seed(seed)
    model = create_model("vit_nano_patch16", num_classes=dataset.classes.num_fg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save(path, model, describe(model, "vit_nano_patch16", dataset.classes.names, mean, std, method="baseline"))
    return model
