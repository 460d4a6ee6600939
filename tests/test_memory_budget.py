"""The memory budget of the localisers: the estimate (by hand), the size and chunk choice, and the maps it gives."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from wsss.errors import ConfigError, WSSSError
from wsss.localize import localize, normalize_maps
from wsss.localize.base import (BUDGET_ENV, Footprint, default_memory_budget, estimate_bytes, parse_memory_size,
                                plan_view)
from wsss.methods.acr import ACR
from wsss.methods.getam import GETAM
from wsss.models.vit import VisionTransformer

METHODS = ["cam", "gradcam", "rollout", "getam", "acr", "aream"]


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=5).eval()
    with torch.no_grad():  # larger-than-init weights: attention far from uniform, informative gradients
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))  # a 12 x 16 patch grid


# ------------------------------------------------------------------------------------------- the estimate


def test_estimate_against_numbers_worked_by_hand():
    fp = Footprint(heads=3, embed_dim=24, kept_blocks=2, grad_blocks=2, graph_blocks=2)
    # T = 17, batch 2, 3 classes, float32:
    # per image = 3 (2 + 2) 289 + 16 (2 + 1) 17 24 = 3468 + 19584 = 23052; per class = 3 (2 + 2) 289 = 3468
    # 4 x 2 x (23052 + 3 x 3468) = 8 x 33456
    assert estimate_bytes(17, fp, batch=2, classes=3, itemsize=4) == 267648
    # No gradient: no per-class term. (2 (4 + 2) + 1) 100 + 16 x 10 x 8 = 1300 + 1280, x 4 bytes.
    rollout_like = Footprint(heads=2, embed_dim=8, kept_blocks=4, headless_maps=1)
    assert estimate_bytes(10, rollout_like, classes=7) == 10320


def test_estimate_grows_as_tokens_squared():
    attention_only = Footprint(heads=6, embed_dim=0, kept_blocks=6, grad_blocks=6, graph_blocks=6)
    for t in (10, 101, 7501):
        assert estimate_bytes(2 * t, attention_only, classes=2) == 4 * estimate_bytes(t, attention_only, classes=2)
    # With the token-linear activations the quadratic term dominates at large T.
    full = Footprint(heads=6, embed_dim=384, kept_blocks=6, grad_blocks=6, graph_blocks=6)
    ratios = [estimate_bytes(2 * t, full) / estimate_bytes(t, full) for t in (1000, 7501, 100_000)]
    assert ratios == sorted(ratios) and 3.3 < ratios[0] and 3.99 < ratios[-1] < 4.0


def test_getam_on_a_1600x1200_image_of_vit_small():
    """The tester's case: ViT-S/16 (6 heads, width 384, 12 blocks), GETAM from block 6, one class."""
    vit_small = SimpleNamespace(depth=12, num_heads=6, embed_dim=384, patch_size=16, num_prefix=1)
    fp = GETAM(vit_small).memory_footprint()
    assert fp == Footprint(heads=6, embed_dim=384, kept_blocks=6, grad_blocks=6, graph_blocks=6)
    # T = 100 x 75 + 1 = 7501: 4 x (6 (6 + 2) T^2 + 16 x 7 x T x 384 + 6 (6 + 2) T^2) = 4 (96 T^2 + 43008 T)
    assert estimate_bytes(7501, fp) == 22896172416  # 21.3 GiB
    plan = plan_view((1200, 1600), 16, 1, fp, batch=2, classes=1, budget=4 * 2**30)  # with its flip
    assert plan.native_estimate == 22896172416 and (plan.batch_chunk, plan.class_chunk) == (1, 1)
    assert plan.fits and plan.estimate <= 4 * 2**30
    h, w = plan.size
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 4 / 3) < 0.05
    # The cost grows as T^2, so each side shrinks by about (4 / 21.3) ** (1 / 4): 100 x 75 -> 64 x 48 patches,
    # T = 3073: 4 (96 T^2 + 43008 T) = 4154892672 bytes; the next grid, 65 x 49 (T = 3186), needs 4445922816.
    assert (w // 16, h // 16) == (64, 48) and plan.estimate == 4154892672
    assert estimate_bytes(65 * 49 + 1, fp) == 4445922816 > 4 * 2**30


def test_method_footprints(model):
    with GETAM(model, start_layer=1) as loc:
        assert loc.memory_footprint() == Footprint(3, 24, kept_blocks=3, grad_blocks=3, graph_blocks=3)
    with ACR(model, start_layer=2) as loc:  # its affinity reads every block
        assert loc.memory_footprint() == Footprint(3, 24, kept_blocks=4, grad_blocks=2, graph_blocks=2,
                                                   headless_maps=5)


# ----------------------------------------------------------------------------------------- the size choice


def test_plan_prefers_chunks_then_reduces_the_size():
    fp = Footprint(heads=1, embed_dim=0, grad_blocks=1)  # 2 T^2 per image, 3 T^2 per class (bytes)
    # A 10 x 8 grid (patch 1, no prefix): T = 80, T^2 = 6400.
    # All at once: 2 x (2 + 3 x 3) x 6400 = 140800; one image: 70400; one image, one class: 32000.
    plan = plan_view((10, 8), 1, 0, fp, batch=2, classes=3, budget=140800, itemsize=1)
    assert (plan.size, plan.batch_chunk, plan.class_chunk, plan.estimate) == ((10, 8), 2, 3, 140800)
    plan = plan_view((10, 8), 1, 0, fp, batch=2, classes=3, budget=140799, itemsize=1)
    assert (plan.size, plan.batch_chunk, plan.class_chunk) == ((10, 8), 1, 3)
    plan = plan_view((10, 8), 1, 0, fp, batch=2, classes=3, budget=70399, itemsize=1)
    assert (plan.size, plan.batch_chunk, plan.class_chunk) == ((10, 8), 1, 2)  # (70399 - 12800) // 19200
    # Smaller grids, the longer side walking down: 9x7 (T^2 3969, 5 T^2 = 19845), 8x6 (11520), 7x6 (8820) ...
    plan = plan_view((10, 8), 1, 0, fp, batch=2, classes=3, budget=31999, itemsize=1)
    assert (plan.size, plan.batch_chunk, plan.class_chunk, plan.estimate) == ((9, 7), 1, 1, 19845)
    plan = plan_view((10, 8), 1, 0, fp, batch=2, classes=3, budget=11520, itemsize=1)
    assert (plan.size, plan.estimate, plan.fits) == ((8, 6), 11520, True)
    plan = plan_view((10, 8), 1, 0, fp, batch=2, classes=3, budget=11519, itemsize=1)
    assert (plan.size, plan.estimate) == ((7, 6), 8820)
    # Below the smallest grid allowed (4 patches on the shorter side: 5x4, 5 x 400 bytes), that one, flagged.
    plan = plan_view((10, 8), 1, 0, fp, batch=2, classes=3, budget=1, itemsize=1)
    assert (plan.size, plan.estimate, plan.fits) == ((5, 4), 2000, False)
    # Sizes are in pixels, multiples of the patch; the prefix tokens count.
    plan = plan_view((80, 64), 8, 1, fp, batch=1, classes=1, budget=5 * 49**2, itemsize=1)
    assert plan.size == (64, 48) and plan.estimate == 5 * 49**2  # 8 x 6 patches + 1


# ----------------------------------------------------------------------------------------------- the maps


def test_tiny_budget_reduces_the_size_and_the_maps_match_the_reduced_view(model, image, caplog):
    classes = torch.tensor([[0, 3]])
    with GETAM(model) as loc:
        fp = loc.memory_footprint()
        # Exactly one image and one class of a 6 x 8 grid: from 12 x 16 the walk stops at 8 x 6 patches.
        budget = estimate_bytes(6 * 8 + 1, fp)
        with caplog.at_level(logging.WARNING, logger="wsss.localize"):
            maps = loc(image, classes, memory_budget=budget)
        small = F.interpolate(image, size=(48, 64), mode="bilinear", align_corners=False, antialias=True)
        with torch.enable_grad():
            raw = loc.token_maps(small, classes)
        full = loc(image, classes, memory_budget=10**12)
    expected = normalize_maps(F.interpolate(raw, size=(96, 128), mode="bilinear", align_corners=True).clamp_min(0))
    assert maps.shape == (1, 2, 96, 128) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    assert (maps.amax(dim=(2, 3)) > 0.99).all() and (maps.amin(dim=(2, 3)) < 0.01).all()
    assert (maps - full).abs().max() > 0.05  # really computed at another size
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "a 128x96 image" in message and "computed at 64x48 (49 tokens)" in message
    assert "193 tokens" in message and "upsampled to 128x96" in message


@pytest.mark.parametrize("method", METHODS)
def test_every_method_stays_within_a_tiny_budget(model, image, method, caplog):
    with caplog.at_level(logging.WARNING, logger="wsss.localize"):
        maps = localize(model, image, [[1, 4]], method=method, scales=(1.0, 0.5), flip=True, memory_budget=1)
    assert maps.shape == (1, 2, 96, 128) and torch.isfinite(maps).all()
    assert (maps.amax(dim=(2, 3)) > 0.99).all()  # non-zero, normalised maps
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # One per view scale; the smallest grid allowed is 4 patches on the shorter side (4 x 5 of 12 x 16 / 6 x 8).
    assert len(warnings) == 2
    assert "computed at 40x32 (21 tokens)" in warnings[0] and "the smallest size allowed" in warnings[0]
    assert "(view 64x48, 49 tokens)" in warnings[1] and "computed at 40x32" in warnings[1]


@pytest.mark.parametrize("method", ["getam", "gradcam", "rollout"])
def test_chunks_give_the_same_maps(model, image, method, caplog):
    images = torch.cat([image, image.flip(-2)])
    classes = [[0, 2, 4], [1, 3]]
    unbounded = localize(model, images, classes, method=method, flip=True, memory_budget=10**12)
    from wsss.methods import REGISTRY
    with REGISTRY.localizer(method)(model) as loc:
        native = estimate_bytes(12 * 16 + 1, loc.memory_footprint())  # one image, one class, the full size
        with caplog.at_level(logging.INFO, logger="wsss.localize"):
            chunked = loc(images, classes, flip=True, memory_budget=native)
    torch.testing.assert_close(chunked, unbounded, atol=1e-5, rtol=1e-4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("per pass" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


# -------------------------------------------------------------------------------------- the budget itself


def test_memory_sizes_and_the_default_budget(monkeypatch):
    assert parse_memory_size("4G") == 4 * 2**30
    assert parse_memory_size("512MiB") == 512 * 2**20
    assert parse_memory_size("2.5GB") == int(2.5 * 2**30)
    assert parse_memory_size(" 1073741824 ") == 2**30
    assert parse_memory_size(1000) == 1000
    for bad in ("lots", "0", "-1G", "4X"):
        with pytest.raises(ConfigError):
            parse_memory_size(bad)
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    budget = default_memory_budget("cpu")
    import os
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < budget <= ram // 4
    monkeypatch.setenv(BUDGET_ENV, "3M")
    assert default_memory_budget("cpu") == 3 * 2**20


def test_budget_from_the_environment_reaches_the_maps(model, image, monkeypatch, caplog):
    monkeypatch.setenv(BUDGET_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="wsss.localize"):
        maps = localize(model, image, [[0]], method="cam")
    assert maps.shape == (1, 1, 96, 128) and "over the memory budget" in caplog.text


# ------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("scales", [(0.0,), (1.0, -0.5), (math.nan,), (math.inf,), ()])
def test_bad_scales_are_config_errors(model, image, scales):
    with pytest.raises(ConfigError, match="scale"):
        localize(model, image, [[0]], method="getam", scales=scales)


@pytest.mark.parametrize("method", ["getam", "acr"])
@pytest.mark.parametrize("layer", [99, 4, -5])
def test_start_layer_out_of_range_is_a_config_error(model, method, layer):
    with pytest.raises(ConfigError, match=rf"start_layer {layer} is out of range for a 4-block model") as info:
        localize(model, torch.randn(1, 3, 32, 32), [[0]], method=method, start_layer=layer)
    assert isinstance(info.value, WSSSError) and isinstance(info.value, ValueError)


def test_a_bad_budget_is_a_config_error(model, image):
    with pytest.raises(ConfigError, match="memory budget"):
        localize(model, image, [[0]], method="cam", memory_budget=0)
