"""The R50+ViT hybrid stem (``wsss.models.resnetv2``): timm's checkpoint layout, its numbers, its shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.models.resnetv2 import HybridEmbed, StdConv2dSame

# --- the checkpoint layout, as timm's _resnetv2((3, 4, 9)) + HybridEmbed(patch_size=1) build it ----------------
DEPTHS = (3, 4, 9)
WIDTHS = (256, 512, 1024)  # stage outputs; the bottleneck is a quarter of that
STEM = 64


def expected_stem_keys() -> dict[str, tuple[int, ...]]:
    """Every ``patch_embed.*`` tensor of timm's ``vit_base_r50_s16_384`` with its shape."""
    b = "patch_embed.backbone."
    keys: dict[str, tuple[int, ...]] = {
        b + "stem.conv.weight": (64, 3, 7, 7),
        b + "stem.norm.weight": (64,),
        b + "stem.norm.bias": (64,),
    }
    prev = STEM
    for i, (depth, out) in enumerate(zip(DEPTHS, WIDTHS)):
        mid = out // 4
        for j in range(depth):
            p = f"{b}stages.{i}.blocks.{j}."
            cin = prev if j == 0 else out
            if j == 0:  # every stage's first block projects the shortcut (stage 0 too: 64 -> 256); timm builds it first
                keys[p + "downsample.conv.weight"] = (out, cin, 1, 1)
                keys[p + "downsample.norm.weight"] = keys[p + "downsample.norm.bias"] = (out,)
            keys[p + "conv1.weight"] = (mid, cin, 1, 1)
            keys[p + "norm1.weight"] = keys[p + "norm1.bias"] = (mid,)
            keys[p + "conv2.weight"] = (mid, mid, 3, 3)
            keys[p + "norm2.weight"] = keys[p + "norm2.bias"] = (mid,)
            keys[p + "conv3.weight"] = (out, mid, 1, 1)
            keys[p + "norm3.weight"] = keys[p + "norm3.bias"] = (out,)
        prev = out
    keys["patch_embed.proj.weight"] = (768, 1024, 1, 1)
    keys["patch_embed.proj.bias"] = (768,)
    return keys


@pytest.fixture(scope="module")
def embed() -> HybridEmbed:
    torch.manual_seed(0)
    m = HybridEmbed().eval()
    with torch.no_grad():  # random affine params too, so the reference sees non-trivial norms and bias
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return m


def test_state_dict_matches_timm_layout(embed: HybridEmbed) -> None:
    expected = expected_stem_keys()
    assert len(expected) == 3 + 9 * sum(DEPTHS) + 3 * len(DEPTHS) + 2 == 158
    got = {"patch_embed." + k: tuple(v.shape) for k, v in embed.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order as well (timm's module order)

    fresh = HybridEmbed()
    sd = {k[len("patch_embed."):]: torch.randn(s) for k, s in expected.items()}
    result = fresh.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.backbone.stages[2].blocks[8].conv3.weight, sd["backbone.stages.2.blocks.8.conv3.weight"])
    assert embed.patch_size == 16


# --- an independent functional implementation over the state dict -----------------------------------------------
def _tf_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _conv(sd: dict, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = sd[name + ".weight"]
    flat = w.flatten(1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    w = ((flat - mean) / torch.sqrt(var + 1e-8)).view_as(w)
    return F.conv2d(_tf_same(x, w.shape[-1], stride), w, None, stride)


def _gn(sd: dict, name: str, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    x = F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], 1e-5)
    return F.relu(x) if relu else x


def reference_forward(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = _gn(sd, "backbone.stem.norm", _conv(sd, "backbone.stem.conv", x, 2))
    x = F.max_pool2d(_tf_same(x, 3, 2, float("-inf")), 3, 2)
    feats = []
    for i, depth in enumerate(DEPTHS):
        for j in range(depth):
            p = f"backbone.stages.{i}.blocks.{j}."
            s = 2 if (i > 0 and j == 0) else 1
            short = _gn(sd, p + "downsample.norm", _conv(sd, p + "downsample.conv", x, s), False) if j == 0 else x
            y = _gn(sd, p + "norm1", _conv(sd, p + "conv1", x))
            y = _gn(sd, p + "norm2", _conv(sd, p + "conv2", y, s))
            y = _gn(sd, p + "norm3", _conv(sd, p + "conv3", y), False)
            x = F.relu(y + short)
        feats.append(x)
    tokens = F.conv2d(x, sd["proj.weight"], sd["proj.bias"])
    return tokens.flatten(2).transpose(1, 2), feats


def test_forward_matches_functional_reference(embed: HybridEmbed) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 72, 104)  # not a multiple of 16: SAME padding is asymmetric somewhere
    with torch.no_grad():
        tokens32, _, _ = embed(x)
        # float64 so that 1e-5 measures the arithmetic, not float32 rounding through 16 normalised blocks
        m64 = HybridEmbed().double().eval()
        m64.load_state_dict(embed.state_dict())
        tokens, grid, feats = m64(x.double())
        ref_tokens, ref_feats = reference_forward(m64.state_dict(), x.double())
    assert grid == (5, 7) == (math.ceil(72 / 16), math.ceil(104 / 16))
    assert tokens.shape == (2, 35, 768)
    assert [tuple(f.shape) for f in feats] == [(2, 256, 18, 26), (2, 512, 9, 13), (2, 1024, 5, 7)]
    for f, r in zip(feats, ref_feats):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens32.double(), tokens, atol=1e-3, rtol=1e-3)  # float32 path, rounding only


@pytest.mark.parametrize("size", [(33, 47), (64, 64), (17, 16)])
def test_grid_is_ceil_of_size_over_16(embed: HybridEmbed, size: tuple[int, int]) -> None:
    with torch.no_grad():
        tokens, grid, feats = embed(torch.randn(1, 3, *size))
    assert grid == (math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert tokens.shape == (1, grid[0] * grid[1], 768)
    assert [f.shape[-2:] for f in feats] == [
        (math.ceil(size[0] / r), math.ceil(size[1] / r)) for r in (4, 8, 16)
    ]


def test_weight_standardisation() -> None:
    torch.manual_seed(2)
    conv = StdConv2dSame(8, 16, 3).double()
    with torch.no_grad():
        conv.weight.mul_(5).add_(torch.randn(16, 1, 1, 1, dtype=torch.double) * 3)  # far from standardised
        w = conv.standardized_weight().flatten(1)
    torch.testing.assert_close(w.mean(1), torch.zeros(16, dtype=torch.double), atol=1e-10, rtol=0)
    # eps 1e-8 sits inside the square root, so the variance is var / (var + 1e-8), 1 to about 1e-7 here
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(16, dtype=torch.double), atol=1e-6, rtol=0)
    assert conv.eps == 1e-8 and conv.bias is None


def test_full_model_has_timm_stem_keys() -> None:
    from wsss.models import create_model

    torch.manual_seed(3)
    m = create_model("vit_base_r50_s16_384", num_classes=5, head="token").eval()
    keys = {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith("patch_embed.")}
    assert keys == expected_stem_keys()
    with torch.no_grad():
        logits = m(torch.randn(1, 3, 64, 96))
    assert logits.shape == (1, 5)


def test_backward_through_stem() -> None:
    # The in-place ReLUs must not clobber anything autograd needs (CAM methods take gradients through the stem).
    torch.manual_seed(4)
    m = HybridEmbed(layers=(1, 1, 1), embed_dim=32)
    x = torch.randn(1, 3, 40, 56, requires_grad=True)
    tokens, grid, feats = m(x)
    (tokens.square().mean() + sum(f.mean() for f in feats)).backward()
    assert grid == (3, 4) and x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())
