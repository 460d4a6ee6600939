"""Conformer (Peng et al., ICCV 2021) as TransCAM and AReAM use it, with the official parameter names.

A CNN branch (ResNet bottlenecks) and a transformer branch run side by side and exchange features in every stage:
``squeeze_block`` (FCUDown) pools the CNN's bottleneck features into patch tokens that are added to the transformer's
input, ``expand_block`` (FCUUp) projects the transformer's patch tokens back onto the CNN map. The names are those of
``pengzhiliang/Conformer`` (``conv1``, ``conv_1``, ``trans_patch_conv``, ``trans_1``, ``conv_trans_2`` ...
``conv_trans_12``, ``trans_norm``, ``conv_cls_head``, ``trans_cls_head``), so ``Conformer_small_patch16.pth`` loads
strictly apart from its ImageNet classifiers.

As in TransCAM (and AReAM's ``networks/conformer.py``) the last fusion block keeps stride 1, so the CNN map stays at
/16, on the token grid, and the CNN head is a 3x3 convolution whose output is the CAM; its global average is the
first set of logits (``logits``). The transformer's class token gives the second (``token_logits``, which
:func:`wsss.train.losses.classification_loss` adds, as TransCAM sums both losses, and which GETAM and ACR take the
gradient of). The attention the maps read is the transformer branch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import Block, Capture, ViTOutput

# BatchNorm eps of the bottlenecks and FCUUp in the official code (the stem keeps PyTorch's 1e-5).
_BN_EPS = 1e-6


class ConvBlock(nn.Module):
    """A ResNet bottleneck (1x1, 3x3, 1x1) whose 3x3 input can take the transformer's features ``x_t`` added."""

    expansion = 4

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False):
        super().__init__()
        med = outplanes // self.expansion
        self.conv1 = nn.Conv2d(inplanes, med, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(med, eps=_BN_EPS)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(med, med, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(med, eps=_BN_EPS)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(med, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes, eps=_BN_EPS)
        self.act3 = nn.ReLU(inplace=True)
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
            self.residual_bn = nn.BatchNorm2d(outplanes, eps=_BN_EPS)

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(output, the 3x3 conv's activation)``; the latter is what FCUDown reads."""
        residual = self.residual_bn(self.residual_conv(x)) if self.res_conv else x
        y = self.act1(self.bn1(self.conv1(x)))
        mid = self.act2(self.bn2(self.conv2(y if x_t is None else y + x_t)))
        y = self.bn3(self.conv3(mid))
        return self.act3(y + residual), mid


class FCUDown(nn.Module):
    """CNN features -> patch tokens: 1x1 conv, average pooling to the token grid, LayerNorm, GELU."""

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int):
        super().__init__()
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = nn.LayerNorm(outplanes, eps=1e-6)
        self.act = nn.GELU()

    def forward(self, x: Tensor, x_t: Tensor) -> Tensor:
        patches = self.act(self.ln(self.sample_pooling(self.conv_project(x)).flatten(2).transpose(1, 2)))
        return torch.cat([x_t[:, :1], patches], dim=1)  # the class token passes through unchanged


class FCUUp(nn.Module):
    """Patch tokens -> CNN features: 1x1 conv, BatchNorm, ReLU, nearest upsampling by ``up_stride``."""

    def __init__(self, inplanes: int, outplanes: int, up_stride: int):
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.bn = nn.BatchNorm2d(outplanes, eps=_BN_EPS)
        self.act = nn.ReLU()

    def forward(self, x_t: Tensor, grid: tuple[int, int]) -> Tensor:
        b, _, d = x_t.shape
        patches = x_t[:, 1:].transpose(1, 2).reshape(b, d, *grid)
        y = self.act(self.bn(self.conv_project(patches)))
        return F.interpolate(y, size=(grid[0] * self.up_stride, grid[1] * self.up_stride))


class ConvTransBlock(nn.Module):
    """One coupled stage step: CNN bottleneck, FCUDown into the transformer block, FCUUp into the fusion block."""

    def __init__(self, inplanes: int, outplanes: int, res_conv: bool, stride: int, dw_stride: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float,
                 last_fusion: bool = False):
        super().__init__()
        self.cnn_block = ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv)
        # The official last fusion block has stride 2 (an ImageNet /32 map); TransCAM keeps /16 for the CAM.
        self.fusion_block = ConvBlock(outplanes, outplanes, res_conv=last_fusion)
        self.squeeze_block = FCUDown(outplanes // ConvBlock.expansion, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, outplanes // ConvBlock.expansion, dw_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path)
        self.dw_stride = dw_stride

    def forward(self, x: Tensor, x_t: Tensor, capture: bool = False
                ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        x, mid = self.cnn_block(x)
        h, w = mid.shape[-2:]
        x_t, attn, logits = self.trans_block(self.squeeze_block(mid, x_t) + x_t, capture)
        x = self.fusion_block(x, self.expand_block(x_t, (h // self.dw_stride, w // self.dw_stride)))[0]
        return x, x_t, attn, logits


class Conformer(nn.Module):
    """Conformer with TransCAM's CAM head; the forward contract of :class:`wsss.models.VisionTransformer`.

    ``model(x)`` gives the CNN branch's logits; ``model(x, capture=Capture(...))`` a :class:`ViTOutput` whose
    ``cam`` is the CNN head's map on the token grid, ``token_logits`` the transformer class token's logits, and
    ``attn``/``attn_logits``/``hidden`` the transformer branch's per block (``depth`` blocks: ``trans_1`` then
    ``conv_trans_2`` ... ``conv_trans_{depth}``). ``stem_features`` are the CNN branch's stage outputs at /4, /8, /16.
    """

    head_keys = ("conv_cls_head.", "trans_cls_head.")
    head_type = "conformer"
    tokens_per_class = False
    num_prefix = 1

    def __init__(self, num_classes: int = 1000, patch_size: int = 16, in_chans: int = 3, base_channel: int = 64,
                 channel_ratio: int = 4, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, img_size: int | tuple[int, int] = 224):
        super().__init__()
        if depth % 3 or depth < 3:
            raise ValueError(f"the Conformer's depth must be a positive multiple of 3, got {depth}")
        if patch_size != 16:
            raise ValueError(f"only patch 16 keeps the CNN map on the token grid, got patch {patch_size}")
        if num_classes < 1:
            raise ValueError(f"the Conformer needs num_classes >= 1 for its CAM head, got {num_classes}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.pool = "avg"  # the CAM's pooling into the CNN logits (TransCAM's AdaptiveAvgPool2d)
        # No position embeddings, so any multiple of 16 works; the nominal size is recorded in checkpoints only.
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.base_grid = (size[0] // patch_size, size[1] // patch_size)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        block_args = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          drop=drop_rate, attn_drop=attn_drop_rate)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        channels = [base_channel * channel_ratio * m for m in (1, 2, 4)]
        dw = patch_size // 4  # tokens are /16, the CNN stages /4, /8, /16
        self.conv_1 = ConvBlock(64, channels[0], res_conv=True)
        self.trans_patch_conv = nn.Conv2d(64, embed_dim, dw, stride=dw)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[0])
        per_stage = depth // 3
        # Block i (2..depth) and its stage: stage 0 holds trans_1 and 2..per_stage, stages 1 and 2 per_stage each.
        self._stage_ends = (per_stage, 2 * per_stage, depth)
        for i in range(2, depth + 1):
            stage = 0 if i <= per_stage else (1 if i <= 2 * per_stage else 2)
            first = i in (per_stage + 1, 2 * per_stage + 1)
            self.add_module(f"conv_trans_{i}", ConvTransBlock(
                channels[stage - 1] if first else channels[stage], channels[stage], res_conv=first,
                stride=2 if first else 1, dw_stride=dw >> stage, drop_path=dpr[i - 1], last_fusion=i == depth,
                **block_args))

        self.trans_norm = nn.LayerNorm(embed_dim)  # PyTorch's default eps, as in the official code
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.conv_cls_head = nn.Conv2d(channels[2], num_classes, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[ConvTransBlock]:
        """``conv_trans_2`` ... ``conv_trans_{depth}`` in order."""
        return [getattr(self, f"conv_trans_{i}") for i in range(2, self.depth + 1)]

    def forward(self, x: Tensor, capture: Capture | None = None) -> Tensor | ViTOutput:
        """The CNN branch's logits ``(B, K)`` of ``x`` ``(B, C, H, W)``; with ``capture``, the :class:`ViTOutput`.

        H and W must be multiples of 16 (there are no position embeddings, so any size and aspect ratio works).
        """
        if capture is None:
            return self._run(x, Capture()).logits
        return self._run(x, capture)

    def forward_intermediates(self, x: Tensor, capture: Capture = Capture()) -> ViTOutput:
        """The rich output of ``x`` (``self(x, capture=capture)``; call the module itself under DDP)."""
        return self(x, capture=capture)

    def _run(self, x: Tensor, capture: Capture) -> ViTOutput:
        if capture.prefix_only_last:
            raise ValueError("prefix_only_last needs a head that reads only the class token; the Conformer's CNN "
                             "head reads every patch token")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}; resize or "
                             "pad it first")
        wants_attn = capture.attn or capture.attn_logits

        def grad_on(i: int):
            return torch.set_grad_enabled(torch.is_grad_enabled() and i >= capture.grad_from_block)

        with grad_on(0):
            base = self.maxpool(self.act1(self.bn1(self.conv1(x))))
            feat = self.conv_1(base)[0]
            patches = self.trans_patch_conv(base)
            grid = (patches.shape[-2], patches.shape[-1])
            tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], 1)
            tokens, a, lg = self.trans_1(tokens, wants_attn and capture.capture_from_block <= 0)
        out = ViTOutput(logits=tokens, tokens=tokens, grid=grid, num_prefix=1)
        self._record(out, capture, a, lg, tokens)
        if 1 in self._stage_ends:
            out.stem_features.append(feat)
        for i, stage in enumerate(self.stages, start=1):  # block i is conv_trans_{i + 1}
            with grad_on(i):
                feat, tokens, a, lg = stage(feat, tokens, wants_attn and i >= capture.capture_from_block)
            self._record(out, capture, a, lg, tokens)
            if i + 1 in self._stage_ends:
                out.stem_features.append(feat)
        out.tokens = self.trans_norm(tokens)
        out.cam = self.conv_cls_head(feat)
        out.logits = out.cam.mean(dim=(2, 3))
        out.token_logits = self.trans_cls_head(out.tokens[:, 0])
        return out

    @staticmethod
    def _record(out: ViTOutput, capture: Capture, attn: Tensor | None, logits: Tensor | None, tokens: Tensor) -> None:
        if capture.attn:
            out.attn.append(attn)
        if capture.attn_logits:
            out.attn_logits.append(logits)
        if capture.hidden:
            out.hidden.append(tokens)

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh CNN and transformer heads for ``num_classes`` outputs."""
        if num_classes < 1:
            raise ValueError(f"the Conformer needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.trans_cls_head = nn.Linear(self.embed_dim, num_classes)
        self.conv_cls_head = nn.Conv2d(self.conv_cls_head.in_channels, num_classes, 3, padding=1)
        nn.init.trunc_normal_(self.trans_cls_head.weight, std=0.02)
        nn.init.zeros_(self.trans_cls_head.bias)
        nn.init.kaiming_normal_(self.conv_cls_head.weight, mode="fan_out", nonlinearity="relu")


# The official presets (models.py of pengzhiliang/Conformer); only patch 16 keeps the CNN map on the token grid.
CONFORMER_PRESETS: dict[str, dict] = {
    "conformer_tiny_patch16": dict(channel_ratio=1, embed_dim=384, depth=12, num_heads=6),
    "conformer_small_patch16": dict(channel_ratio=4, embed_dim=384, depth=12, num_heads=6),
    "conformer_base_patch16": dict(channel_ratio=6, embed_dim=576, depth=12, num_heads=9),
}
