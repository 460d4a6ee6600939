"""The ResNetV2 stem of the R50+ViT hybrid (timm's ``vit_base_r50_s16_384``), with timm's parameter names.

The hybrid ViT replaces the 16x16 patch projection with the first three stages of a ResNet-50 v2 "backbone" as
the original JAX ViT code builds it: weight-standardised convolutions (``StdConv2dSame``, eps 1e-8), GroupNorm with
32 groups, TensorFlow-style "SAME" padding computed from the input size, and *non*-pre-activation bottlenecks
(the activation comes after the residual add). The layout and the names follow timm so that its checkpoints load
as they are, under ``patch_embed.``:

- ``backbone.stem.conv`` (7x7, stride 2, 3 -> 64), ``backbone.stem.norm`` (GroupNorm + ReLU), ``backbone.stem.pool``
  (3x3 max pool, stride 2, SAME padding with -inf): stride 4;
- ``backbone.stages.{i}.blocks.{j}.{conv1,norm1,conv2,norm2,conv3,norm3}``, block 0 of each stage also
  ``downsample.{conv,norm}``; stage 0 has stride 1 (256 channels, /4), stages 1 and 2 stride 2 (512 at /8, 1024 at
  /16), the stride sitting on the 3x3 ``conv2`` and on the 1x1 ``downsample.conv``;
- ``proj``: a 1x1 ``Conv2d`` (1024 -> embed dim, with bias), timm's ``HybridEmbed`` with ``patch_size=1``.

timm builds the backbone with ``num_classes=0, global_pool=''`` and ``preact=False``, so its classifier head and
final ``norm`` carry no parameters; they are left out here. Any input size works: SAME padding gives a
``ceil(H / 16) x ceil(W / 16)`` grid.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "StdConv2dSame",
    "GroupNormAct",
    "MaxPool2dSame",
    "Bottleneck",
    "DownsampleConv",
    "ResNetStage",
    "ResNetV2",
    "HybridEmbed",
    "same_padding",
]

STAGE_CHANNELS = (256, 512, 1024, 2048)  # ResNet-50 stage widths (output channels of each stage)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` of one spatial dimension of length ``size``.

    The output has ``ceil(size / stride)`` positions; the total padding is what that needs, the odd pixel going
    after (TF's convention, which the ported weights were trained with).
    """
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
              value: float = 0.0) -> Tensor:
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """``Conv2d`` with weight standardisation and TF "SAME" padding (no bias, as in the hybrid's backbone).

    Each output channel's kernel is standardised to mean 0 and biased variance 1 (``eps`` inside the square root)
    before every convolution, computed as ``F.batch_norm`` over the ``(1, out, in*kh*kw)`` reshaped weight as timm
    does, so the numbers match its checkpoints. When SAME padding is input-independent (stride 1, odd kernel)
    it is a fixed symmetric ``padding``; otherwise it is computed from the input size in ``forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, bias: bool = False, eps: float = 1e-8):
        static = stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0
        padding = dilation * (kernel_size - 1) // 2 if static else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.same_pad = not static
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The kernel actually convolved: per output channel, ``(w - mean) / sqrt(var + eps)``."""
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps)
        return w.reshape_as(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)  # type: ignore[arg-type]
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-5) followed by a ReLU unless ``apply_act`` is false.

    Like timm's, the channel count comes first; the activation module holds no parameters, so the state dict
    is that of a plain ``GroupNorm`` (``weight``, ``bias``).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, apply_act: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        # In place is safe: GroupNorm's backward needs its input, not its output.
        self.act: nn.Module = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling with TF "SAME" padding; the padding is -inf so it never wins the max."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__(kernel_size, stride, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        k, s = (self.kernel_size,) * 2, (self.stride,) * 2
        x = _pad_same(x, k, s, (1, 1), value=float("-inf"))  # type: ignore[arg-type]
        return F.max_pool2d(x, self.kernel_size, self.stride)


class DownsampleConv(nn.Module):
    """The projection shortcut of a stage's first block: a strided 1x1 ``conv`` and a ``norm`` with no activation."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, eps: float = 1e-8):
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride, eps=eps)
        self.norm = GroupNormAct(out_chs, apply_act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck (ResNet v1.5 order): 1x1 -> 3x3 (strided) -> 1x1, ReLU after the residual add.

    ``norm1`` and ``norm2`` include their ReLU; ``norm3`` has none, the ReLU (``act3``) being applied to the sum
    with the shortcut. The middle width is a quarter of ``out_chs``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, downsample: bool = False,
                 bottle_ratio: float = 0.25, eps: float = 1e-8):
        super().__init__()
        mid_chs = int(out_chs * bottle_ratio)
        self.downsample = DownsampleConv(in_chs, out_chs, stride, eps) if downsample else None
        self.conv1 = StdConv2dSame(in_chs, mid_chs, 1, eps=eps)
        self.norm1 = GroupNormAct(mid_chs)
        self.conv2 = StdConv2dSame(mid_chs, mid_chs, 3, stride=stride, eps=eps)
        self.norm2 = GroupNormAct(mid_chs)
        self.conv3 = StdConv2dSame(mid_chs, out_chs, 1, eps=eps)
        self.norm3 = GroupNormAct(out_chs, apply_act=False)
        self.act3 = nn.ReLU(inplace=True)  # acts on the fresh sum tensor, never on the block's input

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class ResNetStage(nn.Module):
    """``depth`` bottlenecks under ``blocks``; the first carries the stage's stride and the projection shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int, eps: float = 1e-8):
        super().__init__()
        # timm's non-preact blocks always get a projection in block 0 (even at stride 1, 64 -> 256 channels).
        self.blocks = nn.Sequential(*(
            Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, downsample=i == 0, eps=eps)
            for i in range(depth)
        ))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """timm's ``ResNetV2(preact=False, stem_type='same', conv_layer=StdConv2dSame(eps=1e-8))`` without a head.

    ``stages[0]`` keeps the stem's stride 4, each later stage halves the resolution, so the output stride is
    ``4 * 2 ** (len(layers) - 1)`` (16 for the hybrid's three stages). ``forward`` returns every stage's output,
    finest first.
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 9), in_chans: int = 3, stem_chs: int = 64,
                 eps: float = 1e-8):
        super().__init__()
        if not 1 <= len(layers) <= len(STAGE_CHANNELS):
            raise ValueError(f"layers must have 1 to {len(STAGE_CHANNELS)} stage depths, got {layers!r}")
        self.stem = nn.Sequential(OrderedDict([
            ("conv", StdConv2dSame(in_chans, stem_chs, 7, stride=2, eps=eps)),
            ("norm", GroupNormAct(stem_chs)),
            ("pool", MaxPool2dSame(3, 2)),
        ]))
        self.stages = nn.Sequential()
        prev = stem_chs
        for i, (depth, chs) in enumerate(zip(layers, STAGE_CHANNELS)):
            self.stages.add_module(str(i), ResNetStage(prev, chs, 1 if i == 0 else 2, depth, eps))
            prev = chs
        self.feature_channels: tuple[int, ...] = STAGE_CHANNELS[: len(layers)]
        self.num_features = prev
        self.reduction = 4 * 2 ** (len(layers) - 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's init for a model trained from scratch; pretrained weights overwrite it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class HybridEmbed(nn.Module):
    """The hybrid's patch embedding: the ResNetV2 ``backbone`` then a 1x1 ``proj`` to ``embed_dim`` tokens.

    ``patch_size`` is the backbone's total stride (16 for three stages). ``forward(x)`` returns the tokens
    ``(B, N, D)`` (row-major over the grid), the grid ``(h, w) = (ceil(H / 16), ceil(W / 16))`` and the stage
    outputs, finest first: ``[256 ch at /4, 512 at /8, 1024 at /16]`` for the default layers, which a DPT
    decoder reads next to the transformer's tokens.
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 9), in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.backbone = ResNetV2(tuple(layers), in_chans)
        self.proj = nn.Conv2d(self.backbone.num_features, embed_dim, kernel_size=1, stride=1, bias=True)
        self.patch_size = self.backbone.reduction
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int], list[Tensor]]:
        features = self.backbone(x)
        x = self.proj(features[-1])
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid, features
