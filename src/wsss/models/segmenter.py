"""A segmentation model on a ViT backbone: a light decoder over the tokens of several blocks.

The decoder reads the output tokens of a few blocks (default 4, spread over the depth as blocks 3, 5, 8 and 11 of
a 12-block ViT), normalises and projects each to ``dim`` channels with a 1x1 convolution on the patch grid, sums
them, refines the sum with two 3x3 conv + GroupNorm + ReLU layers and predicts one logit per class. The logits are
upsampled bilinearly to the input size. The deepest level reads the backbone's final-normed tokens, so the final
norm takes part in training (every parameter gets a gradient, which DDP requires).

``model(x)`` returns the segmentation logits; ``model(x, capture=Capture(...))`` a :class:`SegmentationOutput` that
holds the backbone's :class:`~wsss.models.vit.ViTOutput` as well, so an end-to-end method (GETAM) can train the
classifier and the segmentation head with one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .vit import Capture, ViTOutput, VisionTransformer

REFERENCE_LEVELS = (3, 5, 8, 11)  # of a 12-block ViT


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


class Segmenter(nn.Module):
    """What every segmentation model on a ViT backbone shares: the backbone as ``encoder``, ``decode`` on the rich
    output of one forward pass, and the logits resized to the input.

    Subclasses set ``num_classes`` and implement :meth:`decode` and :meth:`config` (the settings stored in a
    checkpoint's spec, with the ``decoder`` name :func:`wsss.models.decoders.make_segmenter` rebuilds it from).
    """

    decoder_name: str = ""

    def __init__(self, backbone: VisionTransformer, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # Stored as ``encoder``: the weight loader strips a leading ``backbone.`` from state-dict keys (for foreign
        # checkpoints), which would break reloading this model.
        self.encoder = backbone
        self.num_classes = int(num_classes)

    @property
    def backbone(self) -> VisionTransformer:
        """The ViT (an alias of ``encoder``)."""
        return self.encoder

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def config(self) -> dict[str, Any]:
        """The decoder's settings, as stored in a checkpoint's spec."""
        raise NotImplementedError

    def decode(self, out: ViTOutput) -> Tensor:
        """Logits ``(B, C, h, w)`` from a forward pass run with ``hidden=True``."""
        raise NotImplementedError

    def forward(self, x: Tensor, capture: Capture | None = None) -> Tensor | SegmentationOutput:
        """Segment ``x`` ``(B, 3, H, W)`` (H, W multiples of the patch size): the logits at the input size, or with
        ``capture`` (what the backbone exposes besides the decoder's levels) the :class:`SegmentationOutput`."""
        out = self.encoder(x, capture=replace(capture or Capture(), hidden=True))
        logits = self.decode(out)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits if capture is None else SegmentationOutput(logits=logits, vit=out)


class SegmentationModel(Segmenter):
    """ViT backbone + multi-level decoder; ``forward(x)`` gives the logits ``(B, C, H, W)``.

    Args:
        backbone: the :class:`VisionTransformer` (its classifier head is kept and evaluated as usual).
        num_classes: segmentation classes C; channel k is dataset label k.
        levels: blocks whose output tokens feed the decoder (default :func:`default_levels`).
        dim: decoder width.
        dropout: dropout before the classifier.
    """

    decoder_name = "light"

    def __init__(self, backbone: VisionTransformer, num_classes: int, levels: Sequence[int] | None = None,
                 dim: int = 128, dropout: float = 0.1):
        super().__init__(backbone, num_classes)
        depth = backbone.depth
        levels = default_levels(depth) if levels is None else tuple(int(level) % depth for level in levels)
        if len(set(levels)) != len(levels) or list(levels) != sorted(levels):
            raise ValueError(f"levels must be distinct and ascending, got {levels}")
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

    def config(self) -> dict[str, Any]:
        """The decoder's settings, as stored in a checkpoint's spec."""
        return {"decoder": self.decoder_name, "num_classes": self.num_classes, "levels": list(self.levels),
                "dim": self.dim, "dropout": self.dropout}

    def decode(self, out: ViTOutput) -> Tensor:
        """Logits ``(B, C, h, w)`` on the patch grid from a forward pass run with ``hidden=True``."""
        last = self.encoder.depth - 1
        fused = 0.0
        for level, norm, proj in zip(self.levels, self.norms, self.proj):
            tokens = out.tokens if level == last else norm(out.hidden[level])
            patches = tokens[:, out.num_prefix:].transpose(1, 2).unflatten(2, out.grid)
            fused = fused + proj(patches)
        return self.classifier(self.drop(self.fuse(fused)))
