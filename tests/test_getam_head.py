"""GETAM's classification head: the project readout, 1x1 and 3x3/2 convolutions, GAP and a linear layer on block
11's raw output, so that every block's class-token attention row gets a gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.localize import localize
from wsss.models import Capture, create_model
from wsss.models.checkpoint import describe, load, save


def _model(head: str = "getam", seed: int = 0):
    torch.manual_seed(seed)
    return create_model("vit_nano_patch16", num_classes=5, head=head).eval()


def test_logits_follow_the_head_written_out():
    model = _model()
    x = torch.randn(2, 3, 48, 80)
    out = model(x, capture=Capture(hidden=True))
    tokens = out.hidden[-1]  # block 11's raw output: GETAM's hook sits before the final LayerNorm
    head = model.head
    patches, cls = tokens[:, 1:], tokens[:, :1]
    projected = F.gelu(F.linear(torch.cat([patches, cls.expand_as(patches)], -1), head.readout[0].weight,
                                head.readout[0].bias))
    grid = projected.transpose(1, 2).reshape(2, -1, 3, 5)
    y = F.conv2d(F.conv2d(grid, head.conv1.weight, head.conv1.bias), head.conv2.weight, head.conv2.bias, stride=2,
                 padding=1)
    assert y.shape[-2:] == (2, 3)  # the stride-2 map, ceil(3 / 2) x ceil(5 / 2)
    expected = F.linear(y.mean(dim=(2, 3)), head.fc.weight, head.fc.bias)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    normed = model.norm(tokens)  # with the final norm the logits would differ
    assert not torch.allclose(normed, tokens)


def test_every_block_class_token_row_gets_a_gradient():
    x = torch.randn(1, 3, 64, 64)
    for head, last_row_zero in (("gap", True), ("getam", False)):
        model = _model(head)
        out = model(x, capture=Capture(attn=True, grad_from_block=0))
        grads = torch.autograd.grad(out.logits[:, 1].sum(), out.attn)
        rows = [float(g[:, :, 0].abs().max()) for g in grads]
        assert all(r > 0 for r in rows[:-1])
        assert (rows[-1] == 0.0) is last_row_zero, (head, rows[-1])


def test_maps_checkpoints_and_imagenet_weights(tmp_path, vit_tiny_weights):
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    for method in ("getam", "cam", "acr", "gradcam"):
        maps = localize(model, x, [[1, 3]], method=method)
        assert maps.shape == (1, 2, 64, 64) and torch.isfinite(maps).all() and maps.amax() > 0
    save(tmp_path / "m.safetensors", model, describe(model, "vit_nano_patch16", None))
    loaded, spec = load(tmp_path / "m.safetensors")
    assert spec.head == "getam"
    torch.testing.assert_close(loaded(x), model(x))
    fresh = create_model("vit_tiny_patch16_224", weights=vit_tiny_weights, num_classes=20, head="getam")
    assert fresh.num_classes == 20 and fresh.head.fc.out_features == 20
    with pytest.raises(ValueError):
        create_model("vit_nano_patch16", num_classes=5, head="getam_v2")
