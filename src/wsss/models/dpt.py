"""GETAM's DPT decoder (``DPTSegmentationModel`` of the authors' ``DPT/`` code) on a wsss ViT.

Four feature maps are "reassembled" from the backbone and fused coarse to fine (``methods.md`` §2):

* on the R50+ViT hybrid (the authors' ``vitb_rn50_384``): ResNet stage 1 (256 ch, /4) and stage 2 (512 ch, /8) as
  they are, block 8's tokens (project readout, 1x1 conv, /16) and block 11's (project readout, 1x1 conv, 3x3
  stride-2 conv, /32);
* on a plain ViT (``vitb16_384``, blocks 2, 5, 8, 11): every level through the project readout and a 1x1 conv to
  D/8, D/4, D/2 and D channels, the first two upsampled by 4x4 and 2x2 transposed convolutions (/4, /8), the third
  kept (/16), the last strided (/32).

Each map goes through a 3x3 conv to ``features`` channels (``scratch.layer{k}_rn``); four fusion blocks
(``scratch.refinenet{k}``: a residual conv unit on the skip, added, a second unit, a bilinear x2 with
``align_corners=True`` and a 1x1 conv, every conv followed by BatchNorm) go from /32 to /2; the residual SE block
(``cam_module``) and the head (``scratch.output_conv``: 3x3 conv, BN, ReLU, dropout 0.1, 1x1 conv, x2) give the
logits at the input size.

Parameter names are the authors'. Their last reassembly (``pretrained.act_postprocess4``) and ``cls_head`` are
GETAM's classifier, which wsss keeps in the backbone as ``head="getam"``; on such a backbone this decoder reads the
head's feature map instead of reassembling block 11 a second time, and :func:`from_authors_state_dict` renames a
released GETAM checkpoint accordingly (``pretrained.model.*`` is the ViT itself). On any other head the decoder owns
its ``pretrained.act_postprocess4``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import GETAMHead, patch_map
from .resnetv2 import STAGE_CHANNELS, HybridEmbed
from .segmenter import Segmenter
from .vit import ViTOutput, VisionTransformer

log = logging.getLogger(__name__)

PLAIN_LEVELS = (2, 5, 8, 11)  # of a 12-block ViT (the authors' hooks for vitb16_384)
HYBRID_LEVELS = (8, 11)  # the hybrid's two transformer levels; the finer two are ResNet stages 1 and 2


def _scaled(levels: Sequence[int], depth: int) -> tuple[int, ...]:
    return tuple(sorted({max(0, round((level + 1) * depth / 12) - 1) for level in levels}))


class ProjectReadout(nn.Module):
    """Each patch token concatenated with the class token, then ``project`` (Linear 2D -> D, GELU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: Tensor, num_prefix: int) -> Tensor:
        patches = tokens[:, num_prefix:]
        return self.project(torch.cat([patches, tokens[:, :1].expand_as(patches)], dim=-1))


class Reassemble(nn.Sequential):
    """One level's tokens to a feature map, laid out as the authors' ``act_postprocess{k}``.

    Slot 0 is the readout, slots 1 and 2 stand for their parameter-free transpose and unflatten, slot 3 the 1x1
    conv, slot 4 (optional) the resampling: a transposed conv (``up`` 4 or 2) or a 3x3 stride-2 conv (``up`` 0.5).
    """

    def __init__(self, dim: int, channels: int, up: float = 1.0):
        layers: list[nn.Module] = [ProjectReadout(dim), nn.Identity(), nn.Identity(), nn.Conv2d(dim, channels, 1)]
        if up > 1:
            layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=int(up), stride=int(up)))
        elif up < 1:
            layers.append(nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> Tensor:  # type: ignore[override]
        x = patch_map(self[0](tokens, num_prefix), grid, 0)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


class ResidualConvUnit(nn.Module):
    """ReLU, 3x3 conv, BN, ReLU, 3x3 conv, BN, plus the input (the authors' ``ResidualConvUnit_custom``, bn=True)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.bn2 = nn.BatchNorm2d(features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        return self.bn2(self.conv2(F.relu(out))) + x


class FusionBlock(nn.Module):
    """``out_conv(up(resConfUnit2(x + resConfUnit1(skip))))`` (``FeatureFusionBlock_custom``).

    The authors upsample by exactly 2; here the output takes the size of the next finer skip (``size``), which is
    the same thing whenever the grid is even (the authors' 256/320/480 inputs) and still fits on odd grids.
    ``resConfUnit1`` of the coarsest block is never called, as in the authors' model, but exists so their
    checkpoints load.
    """

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.out_conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class SEBlock(nn.Module):
    """The residual squeeze-and-excitation block on the finest path (the authors' ``SELayer``, reduction 16)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        weight = self.fc(y.mean(dim=(2, 3)))
        return y * weight[:, :, None, None] + x


class Upsample2x(nn.Module):
    """Bilinear x2 with ``align_corners=True`` (the authors' ``Interpolate`` ending the head)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class DPTSegmentationModel(Segmenter):
    """GETAM's DPT decoder on a ViT or the R50+ViT hybrid; ``forward(x)`` gives the logits ``(B, C, H, W)``.

    Args:
        backbone: the :class:`VisionTransformer`; with ``head="getam"`` its classifier's stride-2 map is the
            coarsest level (shared, as in the authors' model).
        num_classes: segmentation classes C (the authors' ``num_classes + 1``: background included).
        levels: the transformer blocks read: four on a plain ViT (default 2, 5, 8, 11 scaled to the depth), two on
            the hybrid (default 8, 11), whose finer levels are ResNet stages 1 and 2.
        dim: the decoder width (``features``; 256 in the paper).
        dropout: dropout in the head (0.1).
    """

    decoder_name = "dpt"

    def __init__(self, backbone: VisionTransformer, num_classes: int, levels: Sequence[int] | None = None,
                 dim: int = 256, dropout: float = 0.1):
        super().__init__(backbone, num_classes)
        depth, width = backbone.depth, backbone.embed_dim
        self.hybrid = isinstance(backbone.patch_embed, HybridEmbed)
        wanted = 2 if self.hybrid else 4
        default = HYBRID_LEVELS if self.hybrid else PLAIN_LEVELS
        levels = _scaled(default, depth) if levels is None else tuple(int(level) % depth for level in levels)
        if len(levels) != wanted or len(set(levels)) != wanted or list(levels) != sorted(levels):
            raise ValueError(f"the DPT decoder reads {wanted} distinct ascending blocks of this backbone, got "
                             f"{tuple(levels)}")
        if levels[-1] != depth - 1 and isinstance(backbone.head, GETAMHead):
            raise ValueError(f"with the GETAM head the coarsest level is the last block ({depth - 1}), got {levels}")
        self.levels = levels
        self.dim = int(dim)
        self.dropout = float(dropout)
        self.shares_head = isinstance(backbone.head, GETAMHead)

        self.pretrained = nn.Module()
        if self.hybrid:
            in_channels = [STAGE_CHANNELS[0], STAGE_CHANNELS[1], width, width]
            self.pretrained.act_postprocess3 = Reassemble(width, width)
        else:
            in_channels = [width // 8, width // 4, width // 2, width]
            self.pretrained.act_postprocess1 = Reassemble(width, in_channels[0], up=4)
            self.pretrained.act_postprocess2 = Reassemble(width, in_channels[1], up=2)
            self.pretrained.act_postprocess3 = Reassemble(width, in_channels[2])
        if not self.shares_head:
            self.pretrained.act_postprocess4 = Reassemble(width, width, up=0.5)
        self.scratch = nn.Module()
        for k, channels in enumerate(in_channels, start=1):
            self.scratch.add_module(f"layer{k}_rn", nn.Conv2d(channels, dim, 3, padding=1, bias=False))
        for k in range(1, 5):
            self.scratch.add_module(f"refinenet{k}", FusionBlock(dim))
        self.cam_module = SEBlock(dim)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Conv2d(dim, num_classes, kernel_size=1), Upsample2x())

    def config(self) -> dict[str, Any]:
        """The decoder's settings, as stored in a checkpoint's spec."""
        return {"decoder": self.decoder_name, "num_classes": self.num_classes, "levels": list(self.levels),
                "dim": self.dim, "dropout": self.dropout}

    def reassemble(self, out: ViTOutput) -> list[Tensor]:
        """The four levels, finest first (/4, /8, /16, /32), before ``scratch.layer{k}_rn``."""
        grid, prefix = out.grid, out.num_prefix
        p = self.pretrained
        if self.hybrid:
            maps = [out.stem_features[0], out.stem_features[1],
                    p.act_postprocess3(out.hidden[self.levels[0]], grid, prefix)]
        else:
            maps = [p.act_postprocess1(out.hidden[self.levels[0]], grid, prefix),
                    p.act_postprocess2(out.hidden[self.levels[1]], grid, prefix),
                    p.act_postprocess3(out.hidden[self.levels[2]], grid, prefix)]
        if self.shares_head:
            if out.head_features is None:
                raise RuntimeError("the GETAM head returned no feature map")
            maps.append(out.head_features)
        else:
            maps.append(p.act_postprocess4(out.hidden[self.levels[-1]], grid, prefix))
        return maps

    def decode(self, out: ViTOutput) -> Tensor:
        """Logits ``(B, C, 16h, 16w)`` (the input size) from a forward pass run with ``hidden=True``."""
        s = self.scratch
        l1, l2, l3, l4 = (conv(x) for conv, x in zip((s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn),
                                                     self.reassemble(out)))
        path = s.refinenet4(l4, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        path = s.refinenet1(path, l1)
        return s.output_conv(self.cam_module(path))


def is_authors_checkpoint(state: dict[str, Tensor]) -> bool:
    """Whether ``state`` is a state dict of the authors' ``DPTSegmentationModel`` (a released GETAM model)."""
    return "scratch.refinenet1.out_conv.weight" in state and any(k.startswith("pretrained.model.") for k in state)


def from_authors_state_dict(state: dict[str, Tensor],
                            shares_head: bool = True) -> tuple[dict[str, Tensor], list[str]]:
    """A released GETAM checkpoint's keys renamed to :class:`DPTSegmentationModel`'s, and the keys left out.

    ``pretrained.model.*`` -> ``encoder.*``; with ``shares_head`` (a ``getam`` head),
    ``pretrained.act_postprocess4.{0.project.0,3,4}`` -> ``encoder.head.{readout.0,conv1,conv2}`` and ``cls_head``
    -> ``encoder.head.fc``; everything else keeps its name. Left out is only ``pretrained.model.head.*``, the
    ImageNet classifier of the timm ViT inside their model, which nothing in it calls. The result still has to
    load strictly.
    """
    renames = [("pretrained.model.", "encoder.")]
    if shares_head:
        renames = [("pretrained.act_postprocess4.0.project.0.", "encoder.head.readout.0."),
                   ("pretrained.act_postprocess4.3.", "encoder.head.conv1."),
                   ("pretrained.act_postprocess4.4.", "encoder.head.conv2."),
                   ("cls_head.", "encoder.head.fc."), *renames]
    out: dict[str, Tensor] = {}
    dropped = [key for key in state if key.startswith("pretrained.model.head.")]
    for key, value in state.items():
        if key in dropped:
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out, dropped


def import_authors_checkpoint(path: str | Path, arch: str = "vit_base_r50_s16_384", num_classes: int = 21,
                              dim: int = 256) -> DPTSegmentationModel:
    """A released GETAM model (the authors' ``DPTSegmentationModel`` state dict, ``.pth``) as a wsss model.

    ``arch`` is their backbone (``vitb_hybrid``: ``vit_base_r50_s16_384``; ``vitb``: ``vit_base_patch16_384``),
    ``num_classes`` their ``num_classes + 1``. The file is read with ``weights_only=True`` and loaded strictly.

    Raises:
        CheckpointError: the file is not such a checkpoint, or does not fit the model (the keys are listed).
    """
    from ..errors import CheckpointError
    from .factory import create_model, load_into
    from .weights import load_state_dict

    state = load_state_dict(path)
    if not is_authors_checkpoint(state):
        raise CheckpointError(f"{path}: not a GETAM DPT checkpoint (no pretrained.model.* and "
                              f"scratch.refinenet1.* keys)")
    model = DPTSegmentationModel(create_model(arch, num_classes=num_classes - 1, head="getam"), num_classes, dim=dim)
    renamed, dropped = from_authors_state_dict(state)
    if dropped:
        log.info("%s: left out %s (the ImageNet classifier inside their ViT, never called)", path, ", ".join(dropped))
    load_into(model, renamed, source=str(path))
    return model.eval()
