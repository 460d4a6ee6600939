"""Conformer: the official checkpoint layout loads strictly, and the forward equals a functional transcription of
the official code (``pengzhiliang/Conformer`` with TransCAM's stride-1 last fusion and 3x3 CAM head)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.errors import CheckpointError
from wsss.models import Capture, create_model

TINY = dict(base_channel=16, channel_ratio=1, embed_dim=24, depth=6, num_heads=2)


def official_keys(base: int = 64, ratio: int = 4, dim: int = 384, depth: int = 12, classes: int = 1000
                  ) -> dict[str, tuple[int, ...]]:
    """Every key and shape of an official ImageNet Conformer checkpoint, spelled out from its layout."""
    keys: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, dim), "conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    def bottleneck(prefix: str, cin: int, cout: int, res: bool) -> None:
        med = cout // 4
        for j, (i, o, k) in enumerate([(cin, med, 1), (med, med, 3), (med, cout, 1)], start=1):
            keys[f"{prefix}.conv{j}.weight"] = (o, i, k, k)
            bn(f"{prefix}.bn{j}", o)
        if res:
            keys[f"{prefix}.residual_conv.weight"] = (cout, cin, 1, 1)
            bn(f"{prefix}.residual_bn", cout)

    def transformer(prefix: str) -> None:
        for n in ("norm1", "norm2"):
            keys[f"{prefix}.{n}.weight"] = keys[f"{prefix}.{n}.bias"] = (dim,)
        keys.update({f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
                     f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
                     f"{prefix}.mlp.fc1.weight": (4 * dim, dim), f"{prefix}.mlp.fc1.bias": (4 * dim,),
                     f"{prefix}.mlp.fc2.weight": (dim, 4 * dim), f"{prefix}.mlp.fc2.bias": (dim,)})

    bn("bn1", 64)
    c1, c2, c3 = base * ratio, base * ratio * 2, base * ratio * 4
    bottleneck("conv_1", 64, c1, True)
    keys["trans_patch_conv.weight"], keys["trans_patch_conv.bias"] = (dim, 64, 4, 4), (dim,)
    transformer("trans_1")
    third = depth // 3
    for i in range(2, depth + 1):
        c = c1 if i <= third else c2 if i <= 2 * third else c3
        first = i in (third + 1, 2 * third + 1)
        cin = {c2: c1, c3: c2}[c] if first else c
        p = f"conv_trans_{i}"
        bottleneck(f"{p}.cnn_block", cin, c, first)
        bottleneck(f"{p}.fusion_block", c, c, i == depth)
        keys[f"{p}.squeeze_block.conv_project.weight"] = (dim, c // 4, 1, 1)
        keys[f"{p}.squeeze_block.conv_project.bias"] = (dim,)
        keys[f"{p}.squeeze_block.ln.weight"] = keys[f"{p}.squeeze_block.ln.bias"] = (dim,)
        keys[f"{p}.expand_block.conv_project.weight"] = (c // 4, dim, 1, 1)
        keys[f"{p}.expand_block.conv_project.bias"] = (c // 4,)
        bn(f"{p}.expand_block.bn", c // 4)
        transformer(f"{p}.trans_block")
    keys["trans_norm.weight"] = keys["trans_norm.bias"] = (dim,)
    keys.update({"trans_cls_head.weight": (classes, dim), "trans_cls_head.bias": (classes,),
                 "conv_cls_head.weight": (classes, c3), "conv_cls_head.bias": (classes,)})  # Linear in the original
    return keys


def fake_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: (torch.tensor(3) if not s else torch.rand(s, generator=g) + 0.5) for k, s in keys.items()}


def test_official_small_checkpoint_layout_loads_strictly(tmp_path):
    keys = official_keys()
    trunk = {k: s for k, s in keys.items() if not k.startswith(("trans_cls_head", "conv_cls_head"))}
    # Conformer-S: 37.7M parameters in the paper (its two ImageNet heads included).
    n = sum(torch.Size(s).numel() for k, s in keys.items() if "running" not in k and "num_batches" not in k)
    assert round(n / 1e6, 1) == 37.7
    state = fake_checkpoint(keys)
    path = tmp_path / "Conformer_small_patch16.pth"
    torch.save({"model": state}, path)
    model = create_model("conformer_small_patch16", weights=path, num_classes=20, head="conformer")
    mine = model.state_dict()
    assert set(trunk) == {k for k in mine if not k.startswith(model.head_keys)}
    for k in trunk:
        assert torch.equal(mine[k], state[k]), k
    assert mine["conv_cls_head.weight"].shape == (20, 1024, 3, 3)


def test_a_checkpoint_missing_a_trunk_key_is_refused(tmp_path):
    state = fake_checkpoint(official_keys())
    del state["conv_trans_7.squeeze_block.ln.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="conv_trans_7.squeeze_block.ln.weight"):
        create_model("conformer_small_patch16", weights=path, num_classes=20, head="conformer")


def test_a_trained_conformer_reloads_with_its_heads(tmp_path):
    from safetensors.torch import save_file

    from wsss.models import checkpoint

    torch.manual_seed(0)
    model = randomised(create_model("conformer_tiny_patch16", head="conformer", num_classes=5, **TINY))
    path = tmp_path / "c.safetensors"
    save_file(model.state_dict(), path)
    again = create_model("conformer_tiny_patch16", weights=path, head="conformer", **TINY)
    assert again.num_classes == 5
    x = torch.randn(1, 3, 32, 48)
    assert torch.allclose(model(x), again.eval()(x))
    # The wsss checkpoint format records the architecture and rebuilds it (the full-size preset here).
    full = randomised(create_model("conformer_tiny_patch16", head="conformer", num_classes=5))
    spec = checkpoint.describe(full, "conformer_tiny_patch16", classes=[f"c{i}" for i in range(5)])
    checkpoint.save(tmp_path / "model.safetensors", full, spec)
    loaded, read = checkpoint.load(tmp_path / "model.safetensors")
    assert read.head == "conformer" and read.num_classes == 5
    torch.testing.assert_close(loaded(x), full(x))


# --- a functional transcription of the official forward --------------------------------------------------------

def _bn(x, s, p, eps):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
                        False, 0.0, eps)


def _bottleneck(x, s, p, stride=1, x_t=None):
    eps = 1e-6
    res = x
    y = F.relu(_bn(F.conv2d(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1", eps))
    if x_t is not None:
        y = y + x_t
    x2 = F.relu(_bn(F.conv2d(y, s[f"{p}.conv2.weight"], stride=stride, padding=1), s, f"{p}.bn2", eps))
    y = _bn(F.conv2d(x2, s[f"{p}.conv3.weight"]), s, f"{p}.bn3", eps)
    if f"{p}.residual_conv.weight" in s:
        res = _bn(F.conv2d(res, s[f"{p}.residual_conv.weight"], stride=stride), s, f"{p}.residual_bn", eps)
    return F.relu(y + res), x2


def _transformer(x, s, p, heads):
    b, t, d = x.shape
    h = F.layer_norm(x, (d,), s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"], 1e-6)
    qkv = F.linear(h, s[f"{p}.attn.qkv.weight"], s[f"{p}.attn.qkv.bias"]).reshape(b, t, 3, heads, d // heads)
    q, k, v = qkv.unbind(2)
    attn = torch.einsum("bqhc,bkhc->bhqk", q, k).mul((d // heads) ** -0.5).softmax(-1)
    y = torch.einsum("bhqk,bkhc->bqhc", attn, v).reshape(b, t, d)
    x = x + F.linear(y, s[f"{p}.attn.proj.weight"], s[f"{p}.attn.proj.bias"])
    h = F.layer_norm(x, (d,), s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"], 1e-6)
    h = F.linear(F.gelu(F.linear(h, s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"])), s[f"{p}.mlp.fc2.weight"],
                 s[f"{p}.mlp.fc2.bias"])
    return x + h, attn


def reference_forward(s, x, depth, heads):
    """(CNN logits, transformer logits, CAM, per-block attention) as the official code computes them."""
    base = F.max_pool2d(F.relu(_bn(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), s, "bn1", 1e-5)), 3, 2, 1)
    feat, _ = _bottleneck(base, s, "conv_1")
    t = F.conv2d(base, s["trans_patch_conv.weight"], s["trans_patch_conv.bias"], stride=4)
    t = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], 1)
    t, a = _transformer(t, s, "trans_1", heads)
    attns = [a]
    third = depth // 3
    for i in range(2, depth + 1):
        p = f"conv_trans_{i}"
        stride = 2 if i in (third + 1, 2 * third + 1) else 1
        dw = 4 if i <= third else 2 if i <= 2 * third else 1
        feat, x2 = _bottleneck(feat, s, f"{p}.cnn_block", stride)
        d = t.shape[-1]
        st = F.avg_pool2d(F.conv2d(x2, s[f"{p}.squeeze_block.conv_project.weight"],
                                   s[f"{p}.squeeze_block.conv_project.bias"]), dw, dw).flatten(2).transpose(1, 2)
        st = F.gelu(F.layer_norm(st, (d,), s[f"{p}.squeeze_block.ln.weight"], s[f"{p}.squeeze_block.ln.bias"], 1e-6))
        st = torch.cat([t[:, :1], st], 1)
        t, a = _transformer(st + t, s, f"{p}.trans_block", heads)
        attns.append(a)
        gh, gw = x2.shape[-2] // dw, x2.shape[-1] // dw
        r = t[:, 1:].transpose(1, 2).reshape(t.shape[0], d, gh, gw)
        r = F.relu(_bn(F.conv2d(r, s[f"{p}.expand_block.conv_project.weight"],
                                s[f"{p}.expand_block.conv_project.bias"]), s, f"{p}.expand_block.bn", 1e-6))
        r = F.interpolate(r, scale_factor=dw, mode="nearest")
        feat, _ = _bottleneck(feat, s, f"{p}.fusion_block", 1, r)
    cam = F.conv2d(feat, s["conv_cls_head.weight"], s["conv_cls_head.bias"], padding=1)
    t = F.layer_norm(t, (t.shape[-1],), s["trans_norm.weight"], s["trans_norm.bias"], 1e-5)
    return cam.mean((2, 3)), F.linear(t[:, 0], s["trans_cls_head.weight"], s["trans_cls_head.bias"]), cam, attns


def randomised(model):
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_forward_equals_the_official_transcription():
    torch.manual_seed(0)
    # In float64, so that 1e-5 tests the transcription and not float32 rounding through 6 coupled stages.
    model = randomised(create_model("conformer_small_patch16", head="conformer", num_classes=3, **TINY)).double()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    out = model(x, capture=Capture(attn=True, attn_logits=True, hidden=True))
    logits, trans_logits, cam, attns = reference_forward(model.state_dict(), x, depth=6, heads=2)
    assert out.grid == (4, 6) and out.num_prefix == 1
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.token_logits, trans_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cam, cam, atol=1e-5, rtol=1e-5)
    assert len(out.attn) == len(out.attn_logits) == len(out.hidden) == 6
    for mine, ref in zip(out.attn, attns):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attn[2], out.attn_logits[2].softmax(-1))
    assert [f.shape[-2:] for f in out.stem_features] == [(16, 24), (8, 12), (4, 6)]
    torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)


def test_blocks_below_grad_from_block_get_no_gradient():
    torch.manual_seed(0)
    model = randomised(create_model("conformer_small_patch16", head="conformer", num_classes=3, **TINY))
    out = model(torch.randn(1, 3, 32, 32), capture=Capture(attn=True, grad_from_block=3, capture_from_block=3))
    assert out.attn[:3] == [None, None, None] and all(a is not None for a in out.attn[3:])
    out.logits.sum().backward()
    assert model.conv_trans_3.trans_block.attn.qkv.weight.grad is None
    assert model.conv_trans_4.trans_block.attn.qkv.weight.grad.abs().sum() > 0


def test_bad_inputs_and_settings_are_refused():
    model = create_model("conformer_small_patch16", head="conformer", num_classes=3, **TINY)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="prefix_only_last"):
        model(torch.randn(1, 3, 32, 32), capture=Capture(prefix_only_last=True))
    with pytest.raises(ValueError, match="multiple of 3"):
        create_model("conformer_small_patch16", head="conformer", num_classes=3, **{**TINY, "depth": 4})
    with pytest.raises(ValueError, match="head='conformer'"):
        create_model("conformer_small_patch16", num_classes=3)
    with pytest.raises(ValueError, match="belongs to the Conformer"):
        create_model("vit_tiny_patch16_224", head="conformer", num_classes=3)
