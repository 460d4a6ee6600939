"""The ViT backbone: ImageNet predictions of the shared ViT-Ti, the attention/gradient options, any input size and
the four heads, each checked against values computed by hand in the test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.models import VisionTransformer, create_model, Capture

NANO = dict(patch_size=16, embed_dim=64, depth=4, num_heads=2)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> torch.nn.Module:
    """Large random weights, so attention is far from uniform and differences between paths show up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(scale * noise)
    return model.eval()


def nano(seed: int = 0, **kwargs) -> VisionTransformer:
    args = dict(NANO, img_size=64, num_classes=5)
    args.update(kwargs)
    return randomize(VisionTransformer(**args), seed)


def images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- ImageNet ViT-Ti


def preprocess(path) -> torch.Tensor:
    """Short side to 256 (bicubic, PIL), centre crop 224, mean = std = 0.5."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    im = im.resize(size, Image.BICUBIC)
    left, top = (size[0] - 224) // 2, (size[1] - 224) // 2  # floor, as the reference pipeline did
    arr = np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5


@pytest.fixture(scope="module")
def vit_tiny(vit_tiny_weights):
    return create_model("vit_tiny_patch16_224", weights=vit_tiny_weights).eval()


def test_vit_tiny_reproduces_imagenet_top1(vit_tiny, vit_tiny_weights):
    samples = vit_tiny_weights.parent / "imagenet_samples"
    expected = json.loads((samples / "expected_top1.json").read_text())
    assert len(expected) == 17
    names = sorted(expected)
    x = torch.stack([preprocess(samples / n) for n in names])
    with torch.no_grad():
        probs = vit_tiny(x).softmax(dim=-1)
    top_p, top_i = probs.max(dim=-1)
    assert top_i.tolist() == [expected[n]["top1"] for n in names]
    np.testing.assert_allclose(top_p.numpy(), [expected[n]["prob"] for n in names], atol=0.01)


def test_vit_tiny_capture_path_on_real_weights(vit_tiny, vit_tiny_weights):
    """The explicit-softmax path gives the fast path's logits on a trained network too."""
    x = preprocess(vit_tiny_weights.parent / "imagenet_samples" / "n01855032_1046.JPEG")[None]
    with torch.no_grad():
        fast = vit_tiny(x)
        slow = vit_tiny(x, capture=Capture(attn=True))
    assert len(slow.attn) == 12
    torch.testing.assert_close(slow.logits, fast, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- attention and gradients


def reference_block0_attention(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Block 0's attention written per head with explicit loops and dot products."""
    with torch.no_grad():
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.patch_size)
        tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + model.interpolate_pos_embed((patches.shape[2], patches.shape[3]))
        blk = model.blocks[0]
        h = F.layer_norm(tokens, (model.embed_dim,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        d, hd = model.embed_dim, model.embed_dim // model.num_heads
        out = torch.empty(x.shape[0], model.num_heads, tokens.shape[1], tokens.shape[1])
        for head in range(model.num_heads):
            q = qkv[..., head * hd:(head + 1) * hd]
            k = qkv[..., d + head * hd:d + (head + 1) * hd]
            scores = torch.einsum("bid,bjd->bij", q, k) / math.sqrt(hd)
            out[:, head] = torch.exp(scores - scores.amax(-1, keepdim=True))
            out[:, head] /= out[:, head].sum(-1, keepdim=True)
    return out


def test_fast_and_capture_paths_agree():
    model = nano()
    x = images(2, 64, 96)
    with torch.no_grad():
        fast = model(x, capture=Capture())
        slow = model(x, capture=Capture(attn=True, attn_logits=True, hidden=True))
    assert fast.attn == [] and fast.attn_logits == [] and fast.hidden == []
    torch.testing.assert_close(slow.logits, fast.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(slow.tokens, fast.tokens, atol=1e-5, rtol=0)
    assert len(slow.attn) == len(slow.attn_logits) == len(slow.hidden) == 4
    assert fast.logits.abs().max() > 0.1  # the comparison is not between two near-zero vectors
    for a, lg in zip(slow.attn, slow.attn_logits):
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(lg.softmax(-1), a, atol=1e-6, rtol=0)
        assert a.amax() > 0.5  # peaked, not uniform (1/T = 1/25)
    torch.testing.assert_close(slow.attn[0], reference_block0_attention(model, x), atol=1e-5, rtol=0)
    normed = F.layer_norm(slow.hidden[-1], (64,), model.norm.weight, model.norm.bias, eps=1e-6)
    torch.testing.assert_close(normed, slow.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(slow.patch_tokens, slow.tokens[:, 1:])


def test_grad_from_block_stops_gradients_below_it():
    model = nano()
    x = images(2, 64, 64)
    full_x = x.clone().requires_grad_()
    full = model(full_x, capture=Capture(attn=True))
    full.logits.sum().backward()
    assert full_x.grad is not None and full_x.grad.abs().sum() > 0
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    part_x = x.clone().requires_grad_()
    part = model(part_x, capture=Capture(attn=True, grad_from_block=2))
    torch.testing.assert_close(part.logits, full.logits, atol=0, rtol=0)
    for a, b in zip(part.attn, full.attn):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [a.requires_grad for a in part.attn] == [False, False, True, True]
    part.logits.sum().backward()
    assert part_x.grad is None
    for name, p in model.named_parameters():
        below = name.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.0.", "blocks.1."))
        if below:
            assert p.grad is None, name
        else:  # the blocks that did run with a graph get exactly the full backward's gradients
            torch.testing.assert_close(p.grad, full_grads[name], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- any input size


def test_non_square_input_uses_the_resized_position_embedding():
    model = nano()
    x = images(1, 224, 320)
    with torch.no_grad():
        out = model(x, capture=Capture())
        # the same network built for 224x320 with the resized table stored as its own
        native = VisionTransformer(**NANO, img_size=(224, 320), num_classes=5).eval()
        state = dict(model.state_dict(), pos_embed=model.interpolate_pos_embed((14, 20)))
        native.load_state_dict(state)
        ref = native(x)
    assert out.grid == (14, 20)
    assert native.base_grid == (14, 20)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    # the table matters: a bilinear resize of it gives other logits, so the comparison above can fail
    with torch.no_grad():
        table = model.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
        bilinear = F.interpolate(table, size=(14, 20), mode="bilinear", align_corners=False)
        native.pos_embed[:, 1:] = bilinear.flatten(2).transpose(1, 2)
        assert (native(x) - out.logits).abs().max() > 1e-3


def test_interpolate_pos_embed_matches_bicubic_resize():
    model = nano()
    assert model.base_grid == (4, 4)
    assert model.interpolate_pos_embed((4, 4)) is model.pos_embed
    with torch.no_grad():
        resized = model.interpolate_pos_embed((6, 9))
        table = model.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
        expected = F.interpolate(table, size=(6, 9), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(resized[:, :1], model.pos_embed[:, :1], atol=0, rtol=0)
    torch.testing.assert_close(resized[0, 1:].reshape(6, 9, 64), expected[0].permute(1, 2, 0), atol=1e-6, rtol=0)


def test_interpolate_pos_embed_keeps_rows_and_columns_apart():
    """Channel 0 holds the row index and channel 1 the column index: after resizing a non-square table, channel 0
    must still be constant along each row and channel 1 along each column."""
    model = VisionTransformer(**NANO, img_size=(64, 96), num_classes=5)
    assert model.base_grid == (4, 6)
    with torch.no_grad():
        model.pos_embed.zero_()
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
        model.pos_embed[0, 1:, 0] = rows.flatten()
        model.pos_embed[0, 1:, 1] = cols.flatten()
        out = model.interpolate_pos_embed((8, 5))[0, 1:].reshape(8, 5, 64)
    row_ch, col_ch = out[..., 0], out[..., 1]
    torch.testing.assert_close(row_ch, row_ch[:, :1].expand(8, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(col_ch, col_ch[:1, :].expand(8, 5), atol=1e-5, rtol=0)
    assert (row_ch[1:, 0] > row_ch[:-1, 0]).all() and (col_ch[0, 1:] > col_ch[0, :-1]).all()


def test_input_size_not_a_multiple_of_the_patch_raises():
    model = nano()
    with pytest.raises(ValueError, match="70x64 is not a multiple of the patch size 16"):
        model(images(1, 70, 64))


# ------------------------------------------------------------------------------------------------------- heads


def hand_cam(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """1x1 conv of the patch map written as a per-token dot product, then laid out row by row."""
    scores = torch.einsum("bnd,kd->bkn", tokens, weight) + bias[None, :, None]
    return scores.reshape(tokens.shape[0], weight.shape[0], *grid)


def test_token_head():
    model = nano()
    with torch.no_grad():
        out = model(images(2, 64, 64), capture=Capture())
    w, b = model.head.weight, model.head.bias
    torch.testing.assert_close(out.logits, out.tokens[:, 0] @ w.T + b, atol=1e-5, rtol=0)
    cw, cb = model.class_weights()
    assert cw is model.head.weight and cb is model.head.bias


def test_gap_head():
    model = nano(head_type="gap")
    with torch.no_grad():
        out = model(images(2, 64, 80), capture=Capture())
    w, b = model.head.weight, model.head.bias
    pooled = out.tokens[:, 1:].sum(1) / (4 * 5)
    torch.testing.assert_close(out.logits, pooled @ w.T + b, atol=1e-5, rtol=0)
    assert out.cam is None


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_conv_head_pools_the_cam(pool):
    model = nano(head_type="conv", pool=pool)
    with torch.no_grad():
        out = model(images(2, 48, 80), capture=Capture())
    assert out.grid == (3, 5)
    weight, bias = model.class_weights()
    torch.testing.assert_close(weight, model.head.weight[:, :, 0, 0], atol=0, rtol=0)
    cam = hand_cam(out.tokens[:, 1:], weight, bias, (3, 5))
    torch.testing.assert_close(out.cam, cam, atol=1e-5, rtol=1e-5)  # raw tokens: values of a few units
    flat = cam.flatten(2)
    pooled = flat.max(-1).values if pool == "max" else flat.sum(-1) / 15
    torch.testing.assert_close(out.logits, pooled, atol=1e-5, rtol=0)
    assert (flat.max(-1).values - flat.mean(-1)).min() > 1e-3  # avg and max differ, so the pool is tested


def test_mct_head():
    k = 3
    model = nano(head_type="mct", num_classes=k)
    assert model.num_prefix == k
    assert model.cls_token.shape[1] == k and model.pos_embed.shape[1] == k + 16
    with torch.no_grad():
        out = model(images(2, 64, 96), capture=Capture())
    assert out.num_prefix == k
    torch.testing.assert_close(out.logits, out.tokens[:, :k].sum(-1) / 64, atol=1e-5, rtol=0)
    # MCTformer-V2: the logits are the channel mean of the last block's raw class tokens (no final LayerNorm, which
    # would make every logit mean(beta) = 0 at initialisation), and they differ across classes from the start.
    with torch.no_grad():
        raw = model(images(2, 64, 96), capture=Capture(hidden=True))
    torch.testing.assert_close(raw.logits, raw.hidden[-1][:, :k].mean(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(raw.tokens, raw.hidden[-1])
    assert (raw.logits - raw.logits[:, :1]).abs().amax() > 1e-3
    normed = F.layer_norm(raw.hidden[-1], (64,), eps=1e-6)[:, :k].mean(-1)  # a fresh norm: gamma 1, beta 0
    assert normed.abs().max() < 1e-5  # what the normed head would have given: one value for every class
    # 3x3 conv on the patch map, written as unfold + matrix product
    patch_map = out.tokens[:, k:].transpose(1, 2).reshape(2, 64, 4, 6)
    cols = F.unfold(patch_map, kernel_size=3, padding=1)  # (B, 64*9, 24)
    cam = (model.head.weight.flatten(1) @ cols + model.head.bias[:, None]).reshape(2, k, 4, 6)
    torch.testing.assert_close(out.cam, cam, atol=1e-5, rtol=1e-5)  # raw tokens: values of a few units
    torch.testing.assert_close(out.patch_logits, cam.sum((2, 3)) / 24, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch_tokens, out.tokens[:, k:])
    with pytest.raises(ValueError, match="no linear class weights"):
        model.class_weights()


def test_distilled_head_averages_both_prefix_tokens():
    model = nano(distilled=True)
    assert model.num_prefix == 2
    with torch.no_grad():
        out = model(images(2, 64, 64), capture=Capture())
    head = out.tokens[:, 0] @ model.head.weight.T + model.head.bias
    dist = out.tokens[:, 1] @ model.head_dist.weight.T + model.head_dist.bias
    assert (head - dist).abs().max() > 0.1
    torch.testing.assert_close(out.logits, (head + dist) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_tokens, out.tokens[:, 2:])


def test_headless_model_returns_the_class_token():
    model = nano(num_classes=0)
    with torch.no_grad():
        out = model(images(1, 64, 64), capture=Capture())
    torch.testing.assert_close(out.logits, out.tokens[:, 0], atol=0, rtol=0)
    with pytest.raises(ValueError):
        model.class_weights()


def test_reset_classifier():
    model = nano()
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.reset_classifier(7)
    assert model.head.weight.shape == (7, 64)
    assert torch.equal(model.head.bias, torch.zeros(7))
    for k, v in body.items():
        assert torch.equal(model.state_dict()[k], v), k
    mct = nano(head_type="mct", num_classes=3)
    with pytest.raises(ValueError, match="one class token per class"):
        mct.reset_classifier(4)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="head_type"):
        VisionTransformer(**NANO, head_type="bogus")
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer(**NANO, pool="median")
    with pytest.raises(ValueError, match="distillation"):
        VisionTransformer(**NANO, head_type="mct", num_classes=3, distilled=True)
