"""Every localiser and every training objective on every backbone family, at a non-square input.

The backbones are narrow, shallow versions of the presets (the same layout: prefix tokens, stems, norms). The
batched GETAM/ACR maps are checked against a per-class loop written here, one forward and one backward per class,
each block's gradient taken separately.
"""

from __future__ import annotations

import pytest
import torch

from wsss.data.classes import ClassSet
from wsss.localize import localize
from wsss.methods import REGISTRY
from wsss.models import Capture, create_model
from wsss.train.objectives import build_objective

SMALL = dict(embed_dim=24, depth=4, num_heads=2)

BACKBONES = {
    # name: (create_model arguments, input size (H, W): non-square)
    "vit": (dict(name="vit_tiny_patch16_224", **SMALL), (48, 80)),
    "deit_distilled": (dict(name="deit_tiny_distilled_patch16_224", **SMALL), (48, 80)),
    "dinov2_reg4": (dict(name="vit_small_patch14_reg4_dinov2", **SMALL), (42, 70)),
    "clip": (dict(name="vit_base_patch16_clip_224", **SMALL), (48, 80)),
    "hybrid_r50": (dict(name="vit_base_r50_s16_384", hybrid_layers=(1, 1, 1), **SMALL), (48, 80)),
    "conformer": (dict(name="conformer_small_patch16", head="conformer", embed_dim=24, num_heads=2,
                       channel_ratio=1, base_channel=16, depth=6), (64, 96)),
}

METHODS = ("cam", "gradcam", "rollout", "getam", "acr", "aream")
NUM_CLASSES = 4


def build(family: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    args, (h, w) = BACKBONES[family]
    args = dict(args)
    name = args.pop("name")
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES, **args)
    # Weights far from their initialisation, so attention is not uniform and gradients are informative.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim > 1:  # weight matrices and kernels; norms and biases keep their values
                p.add_(torch.randn_like(p) * 0.1)
            elif pname.endswith("gamma"):  # DINOv2's LayerScale starts at 1e-5: let the blocks matter
                p.fill_(1.0)
    return model.eval(), torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed + 1))


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def backbone(request):
    return (request.param, *build(request.param))


@pytest.mark.parametrize("method", METHODS)
def test_every_localiser_gives_finite_maps_in_unit_range(backbone, method):
    family, model, x = backbone
    classes = [[0, 2], [3]]
    maps = localize(model, x, classes, method=method)
    assert maps.shape == (2, 2, *x.shape[-2:])
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    # Min-max normalised with an absolute eps of 1e-6: a max well above 0 says the map is not empty (GETAM's
    # squared gradients of these random narrow models are small enough for the eps to show).
    assert float(maps[0, 0].max()) > 0.9, f"{family}/{method}: the first map is empty"
    assert maps[1, 1].abs().max() == 0, "a padded class slot must be an empty map"


def loop_token_maps(model, x, classes: list[list[int]], method: str) -> list[torch.Tensor]:
    """GETAM / ACR on the token grid, one class at a time: a fresh forward, the class's logit, and the gradient of
    each read block's attention taken on its own. The score is the class token's own classifier (the Conformer's
    transformer head; every other model's only head)."""
    depth = model.depth
    start = depth // 2 if method == "getam" else depth - 2
    maps = []
    for b, cls in enumerate(classes):
        rows = []
        for c in cls:
            out = model(x[b : b + 1], capture=Capture(attn=True))
            p, grid = out.num_prefix, out.grid
            score = out.logits if out.token_logits is None else out.token_logits
            acc = torch.zeros(grid[0] * grid[1])
            for layer in range(start, depth):
                (g,) = torch.autograd.grad(score[0, c], out.attn[layer], retain_graph=True)
                a_row, g_row = out.attn[layer][0, :, 0, p:], g[0, :, 0, p:]  # the class token's row, patch columns
                if method == "getam":
                    acc += torch.clamp(a_row * g_row, min=0).mean(0) * torch.clamp(g_row, min=0).mean(0)
                else:
                    acc += torch.clamp(g_row, min=0).mean(0)
            acc = torch.clamp(acc, min=0)
            if method == "acr":
                affinity = sum(a[0].mean(0)[p:, p:] for a in out.attn).detach()
                acc = affinity @ acc
            rows.append(acc.reshape(grid))
        maps.append(torch.stack(rows))
    return maps


@pytest.mark.parametrize("method", ["getam", "acr"])
def test_batched_gradient_maps_equal_a_per_class_loop(backbone, method):
    family, model, x = backbone
    classes = [[0, 3, 1], [2]]
    with REGISTRY.localizer(method)(model) as loc:
        padded = torch.tensor([[0, 3, 1], [2, -1, -1]])
        ours = loc.token_maps(x, padded)
    ref = loop_token_maps(model, x, classes, method)
    for b, cls in enumerate(classes):
        scale = ref[b].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(ours[b, : len(cls)] / scale, ref[b] / scale, atol=1e-5, rtol=1e-4)
        assert ref[b].abs().max() > 0, f"{family}/{method}: the reference map is empty"


OBJECTIVES = {
    # method options that put each objective in its full phase at step 0 on a 4-block model
    "baseline": {},
    "acr": {},
    "aream": {"warmup_steps": 0, "layer_index": 2},
    "getam": {"cls_steps": 0, "dim": 16},
}


@pytest.mark.parametrize("family", sorted(BACKBONES))
@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_every_training_objective_takes_a_step(family, method):
    model, x = build(family)
    classes = ClassSet(("background", "a", "b", "c", "d"))
    objective = build_objective({"name": method, **OBJECTIVES[method]}, classes=classes)
    build_model = getattr(objective, "build_model", None)
    model = (build_model(model) if build_model is not None else model).train()
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    loss, logs = objective(model, {"image": x, "label": labels}, 0)
    assert torch.isfinite(loss), logs
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
