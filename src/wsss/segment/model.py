"""A segmentation model on a ViT backbone: a light decoder over the tokens of several blocks.

The decoder reads the output tokens of a few blocks (default 4, spread over the depth as blocks 3, 5, 8 and 11 of
a 12-block ViT), normalises and projects each to ``dim`` channels with a 1x1 convolution on the patch grid, sums
them, refines the sum with two 3x3 conv + GroupNorm + ReLU layers and predicts one logit per class. The logits are
upsampled bilinearly to the input size. The deepest level reads the backbone's final-normed tokens, so the final
norm takes part in training (every parameter gets a gradient, which DDP requires).

The model returns the backbone's :class:`~wsss.models.vit.ViTOutput` as well, so an end-to-end method (GETAM) can
train the classifier and the segmentation head with one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..models import create_model, load_into
from ..models.vit import ViTOutput, VisionTransformer

REFERENCE_LEVELS = (3, 5, 8, 11)  # of a 12-block ViT
SPEC_KEY = "segmenter"


def default_levels(depth: int) -> tuple[int, ...]:
    """Blocks 3, 5, 8, 11 of a 12-block ViT, scaled to ``depth`` (distinct, ascending, ending at the last block)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    scaled = {max(0, round((level + 1) * depth / 12) - 1) for level in REFERENCE_LEVELS}
    return tuple(sorted(scaled))


def _groups(channels: int, most: int = 32) -> int:
    """The largest divisor of ``channels`` not above ``most`` (GroupNorm's group count)."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def _conv_block(channels: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the segmentation batches are small (4 in GETAM) and need no SyncBN under DDP.
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.GroupNorm(_groups(channels), channels), nn.ReLU(inplace=True))


@dataclass
class SegmentationOutput:
    """``logits`` ``(B, C, H, W)`` at the input size; ``vit`` the backbone's output (classifier logits etc.)."""

    logits: Tensor
    vit: ViTOutput


class SegmentationModel(nn.Module):
    """ViT backbone + multi-level decoder; ``forward(x) -> SegmentationOutput``.

    Args:
        backbone: the :class:`VisionTransformer` (its classifier head is kept and evaluated as usual).
        num_classes: segmentation classes C; channel k is dataset label k.
        levels: blocks whose output tokens feed the decoder (default :func:`default_levels`).
        dim: decoder width.
        dropout: dropout before the classifier.
    """

    def __init__(self, backbone: VisionTransformer, num_classes: int, levels: Sequence[int] | None = None,
                 dim: int = 128, dropout: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        depth = backbone.depth
        levels = default_levels(depth) if levels is None else tuple(int(level) % depth for level in levels)
        if len(set(levels)) != len(levels) or list(levels) != sorted(levels):
            raise ValueError(f"levels must be distinct and ascending, got {levels}")
        # Stored as ``encoder``: the weight loader strips a leading ``backbone.`` from state-dict keys (for foreign
        # checkpoints), which would break reloading this model.
        self.encoder = backbone
        self.num_classes = int(num_classes)
        self.levels = levels
        self.dim = int(dim)
        self.dropout = float(dropout)
        width = backbone.embed_dim
        # The last block's tokens come out of the backbone's own final norm; other levels get their own.
        self.norms = nn.ModuleList(nn.Identity() if level == depth - 1 else nn.LayerNorm(width, eps=1e-6)
                                   for level in levels)
        self.proj = nn.ModuleList(nn.Conv2d(width, dim, kernel_size=1) for _ in levels)
        self.fuse = nn.Sequential(_conv_block(dim), _conv_block(dim))
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    @property
    def backbone(self) -> VisionTransformer:
        """The ViT (an alias of ``encoder``)."""
        return self.encoder

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def config(self) -> dict[str, Any]:
        """The decoder's settings, as stored in a checkpoint's spec."""
        return {"num_classes": self.num_classes, "levels": list(self.levels), "dim": self.dim,
                "dropout": self.dropout}

    def decode(self, out: ViTOutput) -> Tensor:
        """Logits ``(B, C, h, w)`` on the patch grid from a forward pass run with ``hidden=True``."""
        last = self.encoder.depth - 1
        fused = 0.0
        for level, norm, proj in zip(self.levels, self.norms, self.proj):
            tokens = out.tokens if level == last else norm(out.hidden[level])
            patches = tokens[:, out.num_prefix:].transpose(1, 2).unflatten(2, out.grid)
            fused = fused + proj(patches)
        return self.classifier(self.drop(self.fuse(fused)))

    def forward(self, x: Tensor, **vit_options: Any) -> SegmentationOutput:
        """Segment ``x`` ``(B, 3, H, W)`` (H, W multiples of the patch size); ``vit_options`` go to the backbone."""
        out = self.encoder(x, hidden=True, **vit_options)
        logits = F.interpolate(self.decode(out), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return SegmentationOutput(logits=logits, vit=out)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or DataParallel) wrapper, else the model itself."""
    return model.module if hasattr(model, "module") else model


def add_to_spec(model: SegmentationModel, spec: dict, **extra: Any) -> dict:
    """Record the decoder (and ``extra`` entries such as mean/std) in a checkpoint spec, in place."""
    spec[SPEC_KEY] = model.config()
    spec.update(extra)
    return spec


def load_segmenter(path: str | Path) -> tuple[SegmentationModel, dict]:
    """Rebuild a segmentation model saved by a training run; returns ``(model, spec)``.

    ``path`` is a run folder (its final ``model.safetensors``, else its newest checkpoint), a checkpoint folder or
    a ``model.safetensors`` file.
    """
    from ..models.weights import load_state_dict
    from ..train.checkpoint import MODEL_FILE, CheckpointManager, read_spec

    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            path = path / MODEL_FILE
        else:
            latest = CheckpointManager(path).latest()
            if latest is None:
                raise CheckpointError(f"{path}: no {MODEL_FILE} and no checkpoints/latest in this folder")
            path = latest / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    spec = read_spec(path)
    if spec is None or SPEC_KEY not in spec:
        raise CheckpointError(f"{path}: not a segmentation checkpoint (no '{SPEC_KEY}' entry in its spec); "
                              "train one with method.name: segmentation or getam")
    seg = spec[SPEC_KEY]
    backbone = create_model(spec["name"], head=spec.get("head", "token"), pool=spec.get("pool", "avg"),
                            num_classes=spec.get("num_classes"), img_size=tuple(spec.get("img_size", (224, 224))))
    model = SegmentationModel(backbone, seg["num_classes"], levels=seg["levels"], dim=seg["dim"],
                              dropout=seg.get("dropout", 0.1))
    load_into(model, load_state_dict(path), source=str(path))
    return model, spec
