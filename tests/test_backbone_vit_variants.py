"""DINOv2 (LayerScale, registers, patch 14) and CLIP (pre-norm, QuickGELU, projection) as ViT presets.

Each preset's key list is written out here from timm's layout (``vision_transformer.py``: ``vit_*_dinov2`` and
``vit_base_patch16_clip_224``), and each forward is checked against a functional ViT written with plain ``F.*`` calls
on the state dict, at a non-square input.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss.models import Capture, create_model

torch.set_grad_enabled(True)


def vit_keys(dim: int, depth: int, patch: int, n_pos: int, *, layer_scale: bool = False, reg: int = 0,
             pre_norm: bool = False, patch_bias: bool = True, head: int = 0) -> dict[str, tuple[int, ...]]:
    """timm's key list with shapes for a ViT of this layout (written independently of the model code)."""
    keys: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, dim), "pos_embed": (1, n_pos, dim),
                                        "patch_embed.proj.weight": (dim, 3, patch, patch)}
    if patch_bias:
        keys["patch_embed.proj.bias"] = (dim,)
    if reg:
        keys["reg_token"] = (1, reg, dim)
    if pre_norm:
        keys.update({"norm_pre.weight": (dim,), "norm_pre.bias": (dim,)})
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
        if layer_scale:
            keys.update({b + "ls1.gamma": (dim,), b + "ls2.gamma": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    if head:
        keys.update({"head.weight": (head, dim), "head.bias": (head,)})
    return keys


def hybrid_keys() -> dict[str, tuple[int, ...]]:
    """timm's ``vit_base_r50_s16_384``: the ResNetV2-50 stem (test_backbone_hybrid's list) feeding ViT-B/16."""
    from test_backbone_hybrid import expected_stem_keys

    keys = vit_keys(768, 12, 1, 1 + 24 * 24, head=1000)
    del keys["patch_embed.proj.weight"], keys["patch_embed.proj.bias"]
    return {**expected_stem_keys(), **keys}


CHECKPOINTS = {
    "vit_base_r50_s16_384": (hybrid_keys(), 1000),
    # name: (keys of the published checkpoint, num_classes it carries)
    "vit_small_patch14_dinov2": (vit_keys(384, 12, 14, 1 + 37 * 37, layer_scale=True), 0),
    "vit_base_patch14_dinov2": (vit_keys(768, 12, 14, 1 + 37 * 37, layer_scale=True), 0),
    "vit_small_patch14_reg4_dinov2": (vit_keys(384, 12, 14, 37 * 37, layer_scale=True, reg=4), 0),
    "vit_base_patch14_reg4_dinov2": (vit_keys(768, 12, 14, 37 * 37, layer_scale=True, reg=4), 0),
    "vit_base_patch16_clip_224": (vit_keys(768, 12, 16, 197, pre_norm=True, patch_bias=False, head=512), 512),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_published_key_list_loads_strictly(name, tmp_path):
    keys, classes = CHECKPOINTS[name]
    model = create_model(name, num_classes=classes)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == keys
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in keys.items()}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = create_model(name, weights=tmp_path / "w.safetensors")
    assert loaded.num_classes == classes
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert loaded.base_grid == {"dinov2": (37, 37), "r50": (24, 24)}.get(next(
        (k for k in ("dinov2", "r50") if k in name), None), (14, 14))


# --- a functional ViT, on the state dict --------------------------------------------------------------------------

def functional_vit(sd: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, patch: int, eps: float,
                   reg: int = 0, no_embed_class: bool = False, pre_norm: bool = False,
                   quick_gelu: bool = False, hybrid: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits (class token through ``head`` when present, else the normed class token) and each block's
    post-softmax attention, written from the papers' equations with no module code. ``hybrid``: the tokens come
    from test_backbone_hybrid's functional ResNet stem."""
    b = x.shape[0]
    if hybrid:
        from test_backbone_hybrid import reference_forward

        stem = {k[len("patch_embed."):]: v for k, v in sd.items() if k.startswith("patch_embed.")}
        patches, _ = reference_forward(stem, x)
        gh, gw = math.ceil(x.shape[-2] / 16), math.ceil(x.shape[-1] / 16)
    else:
        feat = F.conv2d(x, sd["patch_embed.proj.weight"], sd.get("patch_embed.proj.bias"), stride=patch)
        gh, gw = feat.shape[-2:]
        patches = feat.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    n_pos_prefix = 0 if no_embed_class else 1 + reg
    side = math.isqrt(pos.shape[1] - n_pos_prefix)
    grid_pos = pos[:, n_pos_prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    prefix = [sd["cls_token"].expand(b, -1, -1)]
    if reg:
        prefix.append(sd["reg_token"].expand(b, -1, -1))
    if no_embed_class:
        z = torch.cat(prefix + [patches + grid_pos], dim=1)
    else:
        z = torch.cat(prefix + [patches], dim=1) + torch.cat([pos[:, :n_pos_prefix], grid_pos], dim=1)
    d = z.shape[-1]
    if pre_norm:
        z = F.layer_norm(z, (d,), sd["norm_pre.weight"], sd["norm_pre.bias"], eps)
    attns = []
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = F.layer_norm(z, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        attns.append(a)
        y = (a @ v).transpose(1, 2).reshape(b, -1, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        z = z + y * sd.get(p + "ls1.gamma", torch.ones(d))
        h = F.layer_norm(z, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        h = h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        z = z + h * sd.get(p + "ls2.gamma", torch.ones(d))
        i += 1
    z = F.layer_norm(z, (d,), sd["norm.weight"], sd["norm.bias"], eps)
    cls = z[:, 0]
    return (cls @ sd["head.weight"].T + sd["head.bias"] if "head.weight" in sd else cls), attns


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale: far from its 1e-5 init so the test sees it
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


VARIANTS = {
    # name, overrides that keep it small, functional-reference options
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(reg=4, no_embed_class=True, patch=14, eps=1e-6)),
    "dinov2": ("vit_small_patch14_dinov2", dict(patch=14, eps=1e-6)),
    "clip": ("vit_base_patch16_clip_224", dict(pre_norm=True, quick_gelu=True, patch=16, eps=1e-5)),
    "hybrid_r50": ("vit_base_r50_s16_384", dict(hybrid=True, patch=16, eps=1e-6)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_equals_functional_reference_at_non_square_input(variant):
    name, opts = VARIANTS[variant]
    torch.manual_seed(0)
    # Narrow and shallow versions of the preset, so the test is fast: the layout (tokens, norms, scales) is the same.
    model = randomized(create_model(name, num_classes=7, embed_dim=48, depth=3, num_heads=3))
    p = opts["patch"]
    x = torch.randn(2, 3, 3 * p, 5 * p)
    out = model(x, capture=Capture(attn=True))
    ref_logits, ref_attn = functional_vit(model.state_dict(), x, heads=3, **opts)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=1e-5)
    for a, r in zip(out.attn, ref_attn):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert out.grid == (3, 5)
    assert out.num_prefix == 1 + opts.get("reg", 0)
    assert out.patch_tokens.shape[1] == 15
    # The fast path (no capture) gives the same logits.
    torch.testing.assert_close(model(x), ref_logits, atol=1e-5, rtol=1e-5)


def test_register_tokens_are_prefix_tokens_not_patches():
    model = randomized(create_model("vit_small_patch14_reg4_dinov2", num_classes=3, embed_dim=24, depth=2,
                                    num_heads=2))
    x = torch.randn(1, 3, 28, 42)
    out = model(x, capture=Capture(attn=True))
    assert out.num_prefix == 5 and out.tokens.shape[1] == 5 + 6
    # The registers carry no position embedding: moving the image changes no register's input, only the patches'.
    assert model.pos_embed.shape[1] == 37 * 37


def test_quick_gelu_is_what_clip_uses():
    model = create_model("vit_base_patch16_clip_224", num_classes=0, embed_dim=24, depth=1, num_heads=2)
    act = model.blocks[0].mlp.act
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))
    assert model.patch_embed.proj.bias is None


def test_mct_head_with_registers_reads_only_the_class_tokens():
    model = randomized(create_model("vit_small_patch14_reg4_dinov2", num_classes=3, head="mct", embed_dim=24,
                                    depth=2, num_heads=2))
    x = torch.randn(1, 3, 28, 28)
    out = model(x, capture=Capture(hidden=True))
    assert out.num_prefix == 3 + 4
    torch.testing.assert_close(out.logits, out.tokens[:, :3].mean(-1))


# --- pretrained tags through create_model ------------------------------------------------------------------------

def test_pretrained_tag_loads_the_file_it_names(monkeypatch, tmp_path, vit_tiny_weights):
    from wsss.errors import CheckpointError

    monkeypatch.setenv("WSSS_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors").symlink_to(vit_tiny_weights)
    tagged = create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    direct = create_model("vit_tiny_patch16_224", weights=vit_tiny_weights)
    assert tagged.num_classes == 1000
    for (k, a), b in zip(tagged.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="augreg_in21k_ft_in1k"):  # a bare name lists the tags
        create_model("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="pretrained=True"):  # a tag without pretrained=True is not ignored
        create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    with pytest.raises(ValueError, match="not both"):
        create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True, weights=vit_tiny_weights)


def test_config_model_section_checks_the_weights_source():
    from wsss.errors import ConfigError
    from wsss.train.config import validate_config

    with pytest.raises(ConfigError, match="model.pretrained"):
        validate_config({"model": {"name": "vit_small_patch14_dinov2.lvd142m"}})
    with pytest.raises(ConfigError, match="tagged name"):
        validate_config({"model": {"name": "vit_small_patch14_dinov2", "pretrained": True}})
