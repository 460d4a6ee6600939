"""Vision Transformer / DeiT with timm's parameter names, so existing checkpoints load with ``strict=True``.

``model(x)`` returns the logits, as a timm model does. ``model(x, capture=Capture(...))`` returns the rich
:class:`ViTOutput`: per block, the post-softmax attention, the pre-softmax attention logits and the output tokens,
as ordinary tensors of the autograd graph, so a localiser obtains gradients with respect to them through
``torch.autograd.grad`` with no hooks and no global state. Blocks whose attention is not captured use
``scaled_dot_product_attention`` (the fast path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import HEADS, HeadOutput, NoHead

HEAD_TYPES = tuple(HEADS)


@dataclass(frozen=True)
class Capture:
    """What a forward pass exposes besides the logits (see :meth:`VisionTransformer.forward`).

    Args:
        attn: every block's post-softmax attention.
        attn_logits: every block's pre-softmax attention logits ``q k^T / sqrt(d)``.
        hidden: every block's output tokens.
        grad_from_block: blocks below this index run without building a graph, so a backward pass stops there
            (the localisers only read later blocks).
        capture_from_block: blocks below this index take the fast path and give ``None`` attention.
        prefix_only_last: the last block computes only the prefix (class) tokens' outputs, which is all a
            class-token head reads; its attention is then ``(B, heads, num_prefix, T)`` and ``tokens`` holds only
            the prefix tokens.
    """

    attn: bool = False
    attn_logits: bool = False
    hidden: bool = False
    grad_from_block: int = 0
    capture_from_block: int = 0
    prefix_only_last: bool = False


@dataclass
class ViTOutput:
    """Everything one forward pass returns.

    ``attn[l]``/``attn_logits[l]`` are ``(B, heads, T, T)`` for block ``l``; ``hidden[l]`` is the output of block ``l``
    (``(B, T, D)``, before the final norm). ``cam`` is the conv head's map ``(B, K, h, w)`` for ``conv``/``mct`` heads.
    ``token_logits`` are the class token's own logits in a model whose ``logits`` come from another branch (the
    Conformer's transformer head next to its CNN head); ``None`` where ``logits`` already are the class token's.
    The first ``num_prefix`` tokens are the class token(s), then the distillation and register tokens; the patches
    follow. ``stem_features`` are a convolutional stem's feature maps, finest first (the hybrid's ResNet stages at
    /4, /8 and /16, the inputs of a DPT decoder); empty for a plain patch embedding. ``head_features`` is the map a
    head pools into its logits where it has one (GETAM's stride-2 reassembly of the last block, ``(B, D, h/2, w/2)``).
    """

    logits: Tensor
    tokens: Tensor
    grid: tuple[int, int]
    num_prefix: int
    patch_logits: Tensor | None = None
    token_logits: Tensor | None = None
    cam: Tensor | None = None
    attn: list[Tensor] = field(default_factory=list)
    attn_logits: list[Tensor] = field(default_factory=list)
    hidden: list[Tensor] = field(default_factory=list)
    stem_features: list[Tensor] = field(default_factory=list)
    head_features: Tensor | None = None

    @property
    def patch_tokens(self) -> Tensor:
        """Patch tokens after the final norm (the MCT head: the last block's raw output), ``(B, N, D)``."""
        return self.tokens[:, self.num_prefix :]


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to tokens; ``forward`` returns ``(tokens, grid, stem features)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int], list[Tensor]]:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}; resize or pad it first")
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid, []


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, capture: bool = False,
                num_queries: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if num_queries is not None:  # only the first tokens' outputs are wanted (keys and values stay complete)
            q = q[:, :, :num_queries]
            t = num_queries
        if capture:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            attn = logits.softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        else:
            logits = attn = None
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj_drop(self.proj(out)), attn, logits


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with (its weights expect it, not GELU)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT; DINOv2), named ``gamma`` as timm names it."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, eps: float = 1e-6,
                 init_values: float | None = None, act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        # Without LayerScale, Identity keeps the checkpoint keys free of ls1/ls2 (as in timm).
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, act)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, capture: bool = False,
                num_queries: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        y, attn, logits = self.attn(self.norm1(x), capture, num_queries)
        if num_queries is not None:
            x = x[:, :num_queries]
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, attn, logits


class VisionTransformer(nn.Module):
    """ViT/DeiT backbone with a classification head of :data:`wsss.models.heads.HEADS`.

    Heads (``head_type``):
      - ``token``: a linear layer on the class token (distilled DeiT averages its two prefix-token heads);
      - ``token_prenorm``: the same on the last block's class token before the final norm (ACR);
      - ``gap``: a linear layer on the mean of the patch tokens;
      - ``conv``: a 1x1 convolution on the patch map (a CAM head) pooled by ``pool`` = ``avg`` or ``max``;
      - ``mct``: MCTformer-style, one class token per class; the logits are each class token's channel mean and a
        3x3 conv patch head gives a second set of logits and the CAM;
      - ``getam``: GETAM's project readout and conv classifier on the last block's raw output.

    The variants of the named presets (as timm builds them):
      - ``hybrid_layers``: a ResNetV2 stem with these stage depths replaces the patch embedding (R50+ViT, stride 16;
        any input size, the grid is the ceiling of size / 16);
      - ``reg_tokens``: register tokens after the class (and distillation) token (DINOv2 "reg4"); they are prefix
        tokens, so maps never read them as patches;
      - ``no_embed_class``: position embeddings cover the patches only; prefix tokens get none;
      - ``init_values``: LayerScale on both residual branches (DINOv2);
      - ``pre_norm``: a LayerNorm (``norm_pre``) after adding the position embeddings (CLIP);
      - ``act``: ``gelu`` or ``quick_gelu`` (CLIP); ``patch_bias``: whether the patch projection has a bias.
    """

    head_keys = ("head.", "head_dist.")  # the classifier's checkpoint keys, which a new class count replaces

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, distilled: bool = False, head_type: str = "token",
                 pool: str = "avg", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, eps: float = 1e-6, reg_tokens: int = 0, no_embed_class: bool = False,
                 init_values: float | None = None, pre_norm: bool = False, act: str = "gelu",
                 patch_bias: bool = True, hybrid_layers: tuple[int, ...] | None = None):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        per_class = getattr(HEADS[head_type], "tokens_per_class", False)
        if per_class and distilled:
            raise ValueError("the mct head replaces the class token and cannot be combined with distillation")
        if per_class and num_classes < 1:
            raise ValueError("the mct head needs num_classes >= 1")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.base_grid = (size[0] // patch_size, size[1] // patch_size)
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.head_type = head_type
        self.pool = pool
        self.distilled = distilled
        self.no_embed_class = no_embed_class
        # MCT heads: one class token per class (their logits read the tokens themselves).
        self.tokens_per_class = per_class
        self.num_class_tokens = num_classes if per_class else 1
        self.num_reg_tokens = reg_tokens
        self.num_prefix = self.num_class_tokens + int(distilled) + reg_tokens

        if hybrid_layers:
            from .resnetv2 import HybridEmbed  # the ResNet stem is only built for the hybrid presets

            self.patch_embed = HybridEmbed(tuple(hybrid_layers), in_chans, embed_dim)
            if self.patch_embed.patch_size != patch_size:
                raise ValueError(f"the hybrid stem has stride {self.patch_embed.patch_size}, not {patch_size}")
        else:
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, self.num_class_tokens, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        n_patches = self.base_grid[0] * self.base_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + self.num_embed_prefix, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=eps) if pre_norm else nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], eps, init_values, act)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = self._make_head(num_classes)
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled and num_classes > 0 else None
        self._init_weights()

    @property
    def num_embed_prefix(self) -> int:
        """How many prefix tokens have a position embedding (none with ``no_embed_class``)."""
        return 0 if self.no_embed_class else self.num_prefix

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return NoHead()
        return HEADS[self.head_type](self.embed_dim, num_classes, self.pool)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for token in (self.dist_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) with freshly initialised ones for ``num_classes`` outputs."""
        if self.tokens_per_class and num_classes != self.num_classes:
            raise ValueError("the mct head has one class token per class; build a new model to change the class count")
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        if self.distilled:
            self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else None
        for m in (self.head, self.head_dist):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings for a ``grid`` of patches, resized bicubically from the stored grid."""
        if grid == self.base_grid:
            return self.pos_embed
        n = self.num_embed_prefix
        prefix, patches = self.pos_embed[:, :n], self.pos_embed[:, n:]
        gh, gw = self.base_grid
        patches = patches.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([prefix, patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward(self, x: Tensor, capture: Capture | None = None) -> Tensor | ViTOutput:
        """The logits ``(B, K)`` of images ``x`` ``(B, C, H, W)``; with ``capture``, the rich :class:`ViTOutput`.

        H and W must be multiples of the patch size (any aspect ratio: the position embeddings are interpolated).
        """
        if capture is None:
            return self._run(x, Capture()).logits
        return self._run(x, capture)

    def forward_intermediates(self, x: Tensor, capture: Capture = Capture()) -> ViTOutput:
        """The rich output of ``x`` (``self(x, capture=capture)``; call the module itself under DDP)."""
        return self(x, capture=capture)

    def _run(self, x: Tensor, capture: Capture) -> ViTOutput:
        if capture.prefix_only_last and self.head.reads_patches:
            raise ValueError(f"prefix_only_last needs a head that reads only the class token, not {self.head_type}")
        wants_attn = capture.attn or capture.attn_logits
        tokens, grid, stem_features = self.patch_embed(x)
        b = tokens.shape[0]
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        pos = self.interpolate_pos_embed(grid)
        if self.no_embed_class:
            tokens = torch.cat(prefix + [tokens + pos], dim=1)
        else:
            tokens = torch.cat(prefix + [tokens], dim=1) + pos
        tokens = self.norm_pre(self.pos_drop(tokens))
        out = ViTOutput(logits=tokens, tokens=tokens, grid=grid, num_prefix=self.num_prefix,
                        stem_features=stem_features)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            queries = self.num_prefix if capture.prefix_only_last and i == last else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= capture.grad_from_block):
                tokens, a, lg = blk(tokens, wants_attn and i >= capture.capture_from_block, queries)
            if capture.attn:
                out.attn.append(a)
            if capture.attn_logits:
                out.attn_logits.append(lg)
            if capture.hidden:
                out.hidden.append(tokens)
        # The MCT head reads the last block's raw output (its norm parameters stay, unused, as in MCTformer-V2).
        out.tokens = self.norm(tokens) if getattr(self.head, "final_norm", True) else tokens
        head: HeadOutput = self.head.classify(out.tokens, grid, self.num_prefix)
        if self.head_dist is not None:  # distilled DeiT: the mean of the class- and distillation-token heads
            head.logits = (head.logits + self.head_dist(out.tokens[:, 1])) / 2
        out.logits, out.patch_logits, out.cam = head.logits, head.patch_logits, head.cam
        out.head_features = head.features
        return out

    def class_weights(self) -> tuple[Tensor, Tensor | None]:
        """The classifier as a ``(K, D)`` weight and ``(K,)`` bias applied to (normed) patch tokens for a CAM."""
        if isinstance(self.head, nn.Linear):
            return self.head.weight, self.head.bias
        if isinstance(self.head, nn.Conv2d) and self.head.kernel_size == (1, 1):  # the conv CAM head
            return self.head.weight.flatten(1), self.head.bias
        raise ValueError(f"the {self.head_type} head has no linear class weights")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a named preset (the :class:`VisionTransformer` arguments that differ between presets)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    distilled: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    init_values: float | None = None
    pre_norm: bool = False
    act: str = "gelu"
    patch_bias: bool = True
    eps: float = 1e-6
    hybrid_layers: tuple[int, ...] | None = None

    def kwargs(self) -> dict:
        """The constructor arguments of this preset."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


# DINOv2 (timm's layout): patch 14, LayerScale, position embeddings stored for 518 px; the "reg4" variants add four
# register tokens that, like the class token, carry no position embedding.
_DINOV2 = dict(patch_size=14, img_size=518, init_values=1e-5)
_REG4 = dict(reg_tokens=4, no_embed_class=True)

PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(16, 192, 12, 3),
    "vit_small_patch16_224": ViTConfig(16, 384, 12, 6),
    "vit_base_patch16_224": ViTConfig(16, 768, 12, 12),
    "vit_base_patch16_384": ViTConfig(16, 768, 12, 12, img_size=384),
    "vit_small_patch8_224": ViTConfig(8, 384, 12, 6),
    "vit_base_patch8_224": ViTConfig(8, 768, 12, 12),
    "deit_tiny_patch16_224": ViTConfig(16, 192, 12, 3),
    "deit_small_patch16_224": ViTConfig(16, 384, 12, 6),
    "deit_base_patch16_224": ViTConfig(16, 768, 12, 12),
    "deit_base_patch16_384": ViTConfig(16, 768, 12, 12, img_size=384),
    "deit_tiny_distilled_patch16_224": ViTConfig(16, 192, 12, 3, distilled=True),
    "deit_small_distilled_patch16_224": ViTConfig(16, 384, 12, 6, distilled=True),
    "deit_base_distilled_patch16_224": ViTConfig(16, 768, 12, 12, distilled=True),
    "deit_base_distilled_patch16_384": ViTConfig(16, 768, 12, 12, img_size=384, distilled=True),
    # R50+ViT-B/16 (GETAM's and ACR's backbone): a ResNetV2-50 stem with stages 3-4-9 at stride 16.
    "vit_base_r50_s16_384": ViTConfig(16, 768, 12, 12, img_size=384, hybrid_layers=(3, 4, 9)),
    "vit_small_patch14_dinov2": ViTConfig(embed_dim=384, depth=12, num_heads=6, **_DINOV2),
    "vit_base_patch14_dinov2": ViTConfig(embed_dim=768, depth=12, num_heads=12, **_DINOV2),
    "vit_small_patch14_reg4_dinov2": ViTConfig(embed_dim=384, depth=12, num_heads=6, **_DINOV2, **_REG4),
    "vit_base_patch14_reg4_dinov2": ViTConfig(embed_dim=768, depth=12, num_heads=12, **_DINOV2, **_REG4),
    # CLIP's image tower: pre-norm, QuickGELU (OpenAI's weights were trained with it), no patch bias, LayerNorm
    # eps 1e-5; its "head" is the 768 -> 512 projection into the joint image-text space.
    "vit_base_patch16_clip_224": ViTConfig(16, 768, 12, 12, pre_norm=True, act="quick_gelu", patch_bias=False,
                                           eps=1e-5),
    # DINO's self-supervised patch-8 backbones (no classifier in their checkpoints).
    "dino_vits8": ViTConfig(8, 384, 12, 6),
    "dino_vitb8": ViTConfig(8, 768, 12, 12),
    # Small from-scratch models for CPU demos and tests.
    "vit_pico_patch8": ViTConfig(8, 96, 6, 3, img_size=96),
    "vit_nano_patch16": ViTConfig(16, 64, 4, 2, img_size=64),
}


def grid_side(n_tokens: int) -> int:
    """Side of the square grid that holds ``n_tokens`` patches (checkpoints store square grids)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} position embeddings do not form a square grid")
    return side
