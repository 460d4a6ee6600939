"""PSA's AffinityNet (Ahn & Kwak, CVPR 2018): a network that predicts how likely two nearby pixels share a class.

The network maps an image to a feature map ``f`` ``(B, 448, h, w)`` at stride 8 (ResNet-38) or the patch size (a
ViT); the affinity of two positions i, j is ``a_ij = exp(-mean_c |f_i - f_j|)`` (PSA's ``resnet38_aff.Net``). It is
only evaluated for pairs closer than ``radius`` (5 in PSA), in PSA's half-disc layout:

- :func:`pair_offsets`: the offsets ``(dy, dx)`` to the partners, ``(0, 1) .. (0, r-1)`` then every ``(dy, dx)``
  with ``1 <= dy < r``, ``|dx| < r`` and ``dy^2 + dx^2 < r^2``, row by row (34 offsets for r = 5);
- :func:`pair_indices`: the "from" positions are those whose every partner is inside the map (rows
  ``0 .. h-r``, columns ``r-1 .. w-r``); ``to[p, m]`` is the flat index of the p-th partner of ``from[m]``.

:func:`pair_affinity` gives ``(B, P, M)`` affinities for training; :func:`dense_affinity` assembles the full
``(B, N, N)`` matrix the random walk needs: the pair affinities and their transposes, ones on the diagonal, zero
elsewhere (PSA's ``to_dense``).

Two networks share the feature head ``f8_3, f8_4, f8_5`` (1x1 convs to 64, 128 and 256 channels, no bias, ELU)
and ``f9`` (1x1 conv 448 -> 448, no bias, ELU) with PSA's initialisation (Kaiming-normal, ``f9`` Xavier-uniform
with gain 4):

- :class:`ResNet38AffinityNet`: PSA's ResNet-38 with PSA's flat parameter names, so its trained ``res38_aff``
  checkpoint loads strictly; the head reads ``conv4``, ``conv5`` and ``conv6``; ``b2 .. b2_2`` and ``conv1a`` are
  frozen, as in PSA;
- :class:`ViTAffinityNet`: the same head on the tokens of three blocks of a wsss ViT (by default the last block
  of each of the last three quarters: 5, 8 and 11 of 12), one position per patch.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import patch_map
from .resnet38 import ResNet38
from .vit import Capture, VisionTransformer

__all__ = ["PSA_RADIUS", "FEATURE_WIDTHS", "pair_offsets", "pair_indices", "pair_affinity", "dense_affinity",
           "add_affinity_layers", "affinity_features", "AffinityHead", "ResNet38AffinityNet", "build_affinity_net", "ViTAffinityNet", "default_vit_levels"]

PSA_RADIUS = 5
FEATURE_WIDTHS = (64, 128, 256)  # f8_3, f8_4, f8_5; f9 maps their concatenation (448) to 448


@lru_cache(maxsize=None)
def pair_offsets(radius: int = PSA_RADIUS) -> tuple[tuple[int, int], ...]:
    """PSA's partner offsets ``(dy, dx)`` within ``radius``, in its order (see the module docstring)."""
    if radius < 2:
        raise ValueError(f"the pair radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius]
    return tuple(offsets)


def _check_size(size: Sequence[int], radius: int) -> tuple[int, int]:
    height, width = int(size[0]), int(size[1])
    if height < radius or width < 2 * radius - 1:
        raise ValueError(f"a {height}x{width} feature map is too small for pairs within radius {radius} (it needs at "
                         f"least {radius} rows and {2 * radius - 1} columns)")
    return height, width


def pair_indices(radius: int, size: Sequence[int], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(from (M,), to (P, M))`` flat indices into an ``(h, w)`` map (PSA's ``get_indices_of_pairs``)."""
    height, width = _check_size(size, radius)
    floor = radius - 1
    grid = torch.arange(height * width, device=device).view(height, width)
    rows, cols = height - floor, width - 2 * floor
    source = grid[:rows, floor:floor + cols].reshape(-1)
    targets = torch.stack([grid[dy:dy + rows, floor + dx:floor + dx + cols].reshape(-1)
                           for dy, dx in pair_offsets(radius)])
    return source, targets


def pair_affinity(features: Tensor, radius: int = PSA_RADIUS) -> Tensor:
    """``exp(-mean_c |f_from - f_to|)`` ``(B, P, M)`` of features ``(B, C, h, w)`` (:func:`pair_indices` layout)."""
    source, targets = pair_indices(radius, features.shape[-2:], features.device)
    flat = features.flatten(2)
    start = flat[:, :, source].unsqueeze(2)  # (B, C, 1, M)
    end = flat[:, :, targets.reshape(-1)].view(*flat.shape[:2], *targets.shape)  # (B, C, P, M)
    return torch.exp(-(end - start).abs().mean(dim=1))


def dense_affinity(affinity: Tensor, size: Sequence[int], radius: int = PSA_RADIUS) -> Tensor:
    """The symmetric ``(B, N, N)`` matrix of pair affinities ``(B, P, M)`` on an ``(h, w)`` map, ones on the
    diagonal and zero beyond the radius (PSA's ``to_dense``)."""
    source, targets = pair_indices(radius, size, affinity.device)
    height, width = int(size[0]), int(size[1])
    if affinity.ndim != 3 or tuple(affinity.shape[1:]) != tuple(targets.shape):
        raise ValueError(f"pair affinities {tuple(affinity.shape)} do not fit a {height}x{width} map with radius "
                         f"{radius}: expected (B, {targets.shape[0]}, {targets.shape[1]})")
    n = height * width
    dense = affinity.new_zeros(affinity.shape[0], n, n)
    rows = source.expand_as(targets).reshape(-1)
    cols = targets.reshape(-1)
    values = affinity.reshape(affinity.shape[0], -1)
    dense[:, rows, cols] = values
    dense[:, cols, rows] = values
    diagonal = torch.arange(n, device=affinity.device)
    dense[:, diagonal, diagonal] = 1.0
    return dense


def add_affinity_layers(module: nn.Module, in_channels: Sequence[int]) -> None:
    """Register ``f8_3, f8_4, f8_5`` (1x1 convs of the three inputs to 64, 128, 256 channels) and ``f9`` (448 ->
    448) on ``module``, no biases, with PSA's initialisation (Kaiming-normal; ``f9`` Xavier-uniform, gain 4)."""
    if len(in_channels) != 3:
        raise ValueError(f"the affinity head reads three feature maps, got {len(in_channels)} widths")
    for name, cin, cout in zip(("f8_3", "f8_4", "f8_5"), in_channels, FEATURE_WIDTHS):
        module.add_module(name, nn.Conv2d(cin, cout, 1, bias=False))
        nn.init.kaiming_normal_(getattr(module, name).weight)
    module.f9 = nn.Conv2d(sum(FEATURE_WIDTHS), sum(FEATURE_WIDTHS), 1, bias=False)
    nn.init.xavier_uniform_(module.f9.weight, gain=4)


def affinity_features(module: nn.Module, maps: Sequence[Tensor]) -> Tensor:
    """``elu(f9(cat(elu(f8_3(a)), elu(f8_4(b)), elu(f8_5(c)))))`` with the layers of :func:`add_affinity_layers`."""
    parts = [F.elu(conv(x)) for conv, x in zip((module.f8_3, module.f8_4, module.f8_5), maps)]
    return F.elu(module.f9(torch.cat(parts, dim=1)))


class AffinityHead(nn.Module):
    """The affinity layers (:func:`add_affinity_layers`) as a module of their own, for a non-PSA backbone."""

    def __init__(self, in_channels: Sequence[int]):
        super().__init__()
        add_affinity_layers(self, in_channels)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return affinity_features(self, maps)


class _AffinityOutputs:
    """What both networks share: the radius and the pair/dense affinities of their features."""

    radius: int
    feature_stride: int

    def affinity(self, x: Tensor) -> Tensor:
        """Pair affinities ``(B, P, M)`` of images ``x`` (:func:`pair_affinity`)."""
        return pair_affinity(self(x), self.radius)

    def dense_affinity(self, x: Tensor) -> Tensor:
        """The ``(B, N, N)`` affinity matrix of images ``x`` on the feature grid (:func:`dense_affinity`)."""
        features = self(x)
        return dense_affinity(pair_affinity(features, self.radius), features.shape[-2:], self.radius)


class ResNet38AffinityNet(_AffinityOutputs, ResNet38):
    """PSA's ``resnet38_aff.Net``: ResNet-38 (flat PSA names) plus ``f8_3, f8_4, f8_5, f9``; ``forward`` returns
    the features ``(B, 448, ceil(H/8), ceil(W/8))``.

    ``head_keys`` (the new layers, PSA's ``from_scratch_layers``) get the 10x learning rate in PSA's recipe.
    """

    head_keys: tuple[str, ...] = ("f8_3.", "f8_4.", "f8_5.", "f9.")
    feature_stride = 8
    decoder_name = "affinity"

    def __init__(self, radius: int = PSA_RADIUS, freeze_bn: bool = True):
        super().__init__(freeze_bn=freeze_bn, freeze_stem=True)
        self.radius = int(radius)
        add_affinity_layers(self, [self.feature_channels[k] for k in ("conv4", "conv5", "conv6")])
        # PSA also freezes the first stage (``not_training = [conv1a, b2, b2_1, b2_2]``).
        self.not_training.extend([self.b2, self.b2_1, self.b2_2])
        self._apply_freezing()

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint's spec stores."""
        return {"decoder": "affinity", "radius": self.radius}

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        d = self.forward_features(x)
        return affinity_features(self, [d["conv4"], d["conv5"], d["conv6"]])


def default_vit_levels(depth: int) -> tuple[int, int, int]:
    """The last block of each of the last three quarters of a ``depth``-block ViT (5, 8, 11 of 12)."""
    if depth < 3:
        raise ValueError(f"the ViT affinity head reads three blocks; the backbone has {depth}")
    levels = sorted({max(0, round(depth * q) - 1) for q in (0.5, 0.75, 1.0)})
    return tuple(levels) if len(levels) == 3 else (depth - 3, depth - 2, depth - 1)


class ViTAffinityNet(_AffinityOutputs, nn.Module):
    """The AffinityNet head on three blocks of a :class:`VisionTransformer` (``encoder``); ``forward`` returns the
    features ``(B, 448, H/p, W/p)`` on the patch grid (H, W multiples of the patch size p).

    The deepest level is the final-normed token map; the others get their own LayerNorm, as the light
    segmentation decoder does. The classifier head is dropped: AffinityNet is trained on pair labels only.
    """

    head_keys: tuple[str, ...] = ("affinity_head.", "norms.")
    decoder_name = "affinity"

    def __init__(self, backbone: VisionTransformer, radius: int = PSA_RADIUS, levels: Sequence[int] | None = None):
        super().__init__()
        depth = backbone.depth
        levels = default_vit_levels(depth) if levels is None else tuple(int(level) % depth for level in levels)
        if len(levels) != 3 or len(set(levels)) != 3 or list(levels) != sorted(levels):
            raise ValueError(f"levels must be three distinct ascending blocks, got {levels}")
        if backbone.num_classes:
            backbone.reset_classifier(0)
        self.encoder = backbone
        self.radius = int(radius)
        self.levels = levels
        self.feature_stride = backbone.patch_size
        width = backbone.embed_dim
        self.norms = nn.ModuleList(nn.Identity() if level == depth - 1 else nn.LayerNorm(width, eps=1e-6)
                                   for level in levels)
        self.affinity_head = AffinityHead([width] * 3)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint's spec stores."""
        return {"decoder": "affinity", "radius": self.radius, "levels": list(self.levels)}

    def forward(self, x: Tensor) -> Tensor:
        out = self.encoder(x, capture=Capture(hidden=True))
        last = self.encoder.depth - 1
        maps = []
        for level, norm in zip(self.levels, self.norms):
            tokens = out.tokens if level == last else norm(out.hidden[level])
            maps.append(patch_map(tokens, out.grid, out.num_prefix))
        return self.affinity_head(maps)


def build_affinity_net(backbone: nn.Module, radius: int = PSA_RADIUS,
                       levels: Sequence[int] | None = None) -> ResNet38AffinityNet | ViTAffinityNet:
    """AffinityNet on ``backbone``: PSA's ResNet-38 network (the backbone's weights copied in, names unchanged) or
    the affinity head on a ViT. A ``ValueError`` says when the backbone or the settings do not fit."""
    if isinstance(backbone, VisionTransformer):
        return ViTAffinityNet(backbone, radius=radius, levels=levels)
    if isinstance(backbone, ResNet38):
        if levels is not None:
            raise ValueError("levels picks ViT blocks; the ResNet-38 AffinityNet reads conv4, conv5 and conv6")
        net = ResNet38AffinityNet(radius=radius, freeze_bn=backbone.freeze_bn)
        own = net.state_dict()
        own.update(backbone.state_dict())  # every backbone key exists in the network under the same name
        net.load_state_dict(own, strict=True)
        return net
    raise ValueError(f"AffinityNet needs a ViT or PSA's ResNet-38 backbone (model.name=resnet38d), not "
                     f"{type(backbone).__name__}")
