"""Refinement: PAMR and PAR against per-pixel loop references, the affinity walk against matrix powers, the CRF."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from wsss.errors import ConfigError, WSSSError
from wsss.refine import (
    CRF_PRESETS,
    CRFParams,
    PAMR,
    PAR,
    crf_params,
    dense_crf,
    make_refiner,
    pamr,
    par,
    propagate,
    psa_background,
    psa_crf,
    refine_with_affinity,
    with_background,
)

DILATIONS = (1, 2, 4, 8, 12, 24)


# ----------------------------------------------------------------------------- slow references


def _clamped(array: np.ndarray, y: int, x: int) -> np.ndarray:
    """array[..., y, x] with coordinates clamped into the image (= replicate padding)."""
    height, width = array.shape[-2:]
    return array[..., min(max(y, 0), height - 1), min(max(x, 0), width - 1)]


def _ring(dilations) -> list[tuple[int, int]]:
    signs = [s for s in itertools.product((-1, 0, 1), repeat=2) if s != (0, 0)]
    return [(d * sy, d * sx) for d in dilations for sy, sx in signs]


def _propagate_slow(kernels: dict, maps: np.ndarray, iterations: int) -> np.ndarray:
    """kernels[(y, x)] = list of (weight, dy, dx); maps (K, H, W)."""
    height, width = maps.shape[-2:]
    for _ in range(iterations):
        new = np.zeros_like(maps)
        for y in range(height):
            for x in range(width):
                for weight, dy, dx in kernels[(y, x)]:
                    new[:, y, x] += weight * _clamped(maps, y + dy, x + dx)
        maps = new
    return maps


def slow_pamr(image: np.ndarray, maps: np.ndarray, iterations: int, dilations) -> np.ndarray:
    """GETAM's PAMR for one (3, H, W) image, one pixel and one neighbour at a time."""
    height, width = image.shape[-2:]
    kernels = {}
    for y in range(height):
        for x in range(width):
            centre = image[:, y, x]
            stencil = [
                _clamped(image, y + d * sy, x + d * sx) for d in dilations for sy in (-1, 0, 1) for sx in (-1, 0, 1)
            ]
            sigma = np.std(np.stack(stencil), axis=0, ddof=1)
            logits = np.array([
                np.mean(-np.abs(centre - _clamped(image, y + dy, x + dx)) / (1e-8 + 0.1 * sigma))
                for dy, dx in _ring(dilations)
            ])
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            kernels[(y, x)] = [(w, dy, dx) for w, (dy, dx) in zip(weights, _ring(dilations))]
    return _propagate_slow(kernels, maps, iterations)


def slow_par(image: np.ndarray, maps: np.ndarray, iterations: int, dilations, w_pos: float) -> np.ndarray:
    """AFA's PAR for one (3, H, W) image, one pixel and one neighbour at a time."""
    height, width = image.shape[-2:]
    ring = _ring(dilations)
    dist = np.array([math.sqrt(dy * dy + dx * dx) for dy, dx in ring])
    pos_logits = -((dist / (np.std(dist, ddof=1) + 1e-8) / 0.3) ** 2)
    pos = np.exp(pos_logits - pos_logits.max())
    pos /= pos.sum()
    kernels = {}
    for y in range(height):
        for x in range(width):
            centre = image[:, y, x]
            neighbours = np.stack([_clamped(image, y + dy, x + dx) for dy, dx in ring])  # (48, 3)
            sigma = np.std(neighbours, axis=0, ddof=1)
            logits = np.array([np.mean(-((np.abs(centre - n) / (sigma + 1e-8) / 0.3) ** 2)) for n in neighbours])
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            weights = weights + w_pos * pos
            kernels[(y, x)] = [(w, dy, dx) for w, (dy, dx) in zip(weights, ring)]
    return _propagate_slow(kernels, maps, iterations)


@pytest.fixture(scope="module")
def small_pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(2, 3, 9, 11)).astype(np.float64)
    maps = rng.random((2, 2, 9, 11))
    return image, maps


# ----------------------------------------------------------------------------- PAMR / PAR


def test_pamr_matches_per_pixel_reference(small_pair):
    image, maps = small_pair
    fast = pamr(torch.from_numpy(image), torch.from_numpy(maps), iterations=10, dilations=DILATIONS).numpy()
    slow = np.stack([slow_pamr(image[b], maps[b], 10, DILATIONS) for b in range(2)])
    assert np.abs(fast - slow).max() <= 1e-5
    assert np.abs(fast - maps).max() > 1e-2  # it did change the maps


def test_par_matches_per_pixel_reference(small_pair):
    image, maps = small_pair
    image01 = image / 255.0
    fast = par(torch.from_numpy(image01), torch.from_numpy(maps), iterations=10, dilations=DILATIONS, w_pos=0.01)
    fast = fast.numpy()
    slow = np.stack([slow_par(image01[b], maps[b], 10, DILATIONS, 0.01) for b in range(2)])
    assert np.abs(fast - slow).max() <= 1e-5


def test_pamr_float32_close_to_float64(small_pair):
    image, maps = small_pair
    ref = pamr(torch.from_numpy(image), torch.from_numpy(maps)).numpy()
    single = pamr(torch.from_numpy(image).float(), torch.from_numpy(maps).float()).numpy()
    assert np.abs(ref - single).max() < 1e-4


def test_pamr_keeps_constant_maps_and_par_scales_them_by_1_01_per_step(small_pair):
    image, _ = small_pair
    const = torch.full((2, 1, 9, 11), 0.25, dtype=torch.float64)
    assert torch.allclose(pamr(torch.from_numpy(image), const), const, atol=1e-12)
    refined = par(torch.from_numpy(image) / 255, const, iterations=3)
    assert torch.allclose(refined, const * 1.01**3, atol=1e-12)


def test_modules_equal_functions(small_pair):
    image, maps = small_pair
    img, m = torch.from_numpy(image), torch.from_numpy(maps)
    assert torch.equal(PAMR(iterations=2, dilations=(1, 3))(img, m), pamr(img, m, 2, (1, 3)))
    assert torch.equal(PAR(iterations=2, dilations=(1, 3))(img / 255, m), par(img / 255, m, 2, (1, 3)))


def test_pamr_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="matching image"):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4))


# ----------------------------------------------------------------------------- affinity walk


def _transition_reference(aff: np.ndarray, normalize: str) -> np.ndarray:
    n = aff.shape[0]
    trans = np.zeros_like(aff)
    for i in range(n):
        for j in range(n):
            if normalize == "row":
                trans[i, j] = aff[i, j] / sum(aff[i, k] for k in range(n))
            elif normalize == "column":
                trans[i, j] = aff[j, i] / sum(aff[k, i] for k in range(n))
            else:
                trans[i, j] = aff[i, j]
    return trans


@pytest.mark.parametrize("normalize", ["row", "column", "none"])
@pytest.mark.parametrize("steps,log_steps", [(1, 0), (3, 0), (2, 2)])
def test_propagate_matches_matrix_power(normalize, steps, log_steps):
    rng = np.random.default_rng(1)
    aff = rng.random((2, 6, 6)) + 0.05
    maps = rng.random((2, 3, 6))
    out = propagate(
        torch.from_numpy(maps), torch.from_numpy(aff), power=2.0, steps=steps, log_steps=log_steps,
        normalize=normalize, eps=0.0,
    ).numpy()
    for b in range(2):
        trans = _transition_reference(aff[b] ** 2, normalize)
        expected = (np.linalg.matrix_power(trans, steps * 2**log_steps) @ maps[b].T).T
        assert np.abs(out[b] - expected).max() <= 1e-9


def test_propagate_symmetrize_and_mask_by_hand():
    aff = torch.tensor([[[1.0, 3.0], [1.0, 1.0]]], dtype=torch.float64)
    maps = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    # symmetrised W = [[1, 2], [2, 1]]; rows / 3: token 0 keeps 1/3, token 1 gets 2/3
    out = propagate(maps, aff, symmetrize=True, eps=0.0)
    assert torch.allclose(out, torch.tensor([[[1 / 3, 2 / 3]]], dtype=torch.float64))
    # masking the off-diagonal leaves the identity walk
    out = propagate(maps, aff, mask=torch.eye(2, dtype=torch.bool), eps=0.0)
    assert torch.allclose(out, maps)


def test_refine_with_affinity_uniform_walk_gives_the_mean():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, :2, :2] = 1.0  # block means on a 2x2 grid: 1, 0, 0, 0
    out = refine_with_affinity(maps, torch.ones(1, 4, 4), (2, 2))
    assert torch.allclose(out, torch.full((1, 1, 4, 4), 0.25), atol=1e-6)


# ----------------------------------------------------------------------------- refiner


def test_make_refiner_pamr_resizes_image_and_reuses_kernel(small_pair):
    image, _ = small_pair
    img_u8 = image[0].transpose(1, 2, 0).astype(np.uint8)
    scores = torch.rand(1, 3, 9, 11)
    refiner = make_refiner("pamr", img_u8, iterations=4)
    expected = pamr(torch.from_numpy(img_u8).permute(2, 0, 1)[None].float(), scores, 4)
    assert torch.allclose(refiner(scores), expected, atol=1e-6)
    half = torch.rand(1, 3, 4, 5)
    small_img = torch.nn.functional.interpolate(torch.from_numpy(img_u8).permute(2, 0, 1)[None].float(), size=(4, 5),
                                                mode="bilinear", align_corners=False)
    assert torch.allclose(make_refiner("par", img_u8, iterations=2)(half), par(small_img / 255, half, 2), atol=1e-6)
    assert make_refiner("none", img_u8) is None


def test_make_refiner_on_a_batch_equals_one_refiner_per_image():
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, size=(2, 9, 11, 3)).astype(np.uint8)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (B, 3, H, W) in 0..255
    for kind in ("pamr", "par"):
        for size in ((9, 11), (4, 5)):  # full size and a resized one
            scores = torch.rand(2, 3, *size)
            together = make_refiner(kind, batch, iterations=3)(scores)
            for i in range(2):
                alone = make_refiner(kind, images[i], iterations=3)(scores[i : i + 1])
                torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=1e-5)
            swapped = make_refiner(kind, batch.flip(0), iterations=3)(scores)
            assert (swapped - together).abs().max() > 1e-3  # each image guides its own scores
    with pytest.raises(ValueError, match="one image"):
        make_refiner("crf", batch)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        make_refiner("par", batch[:, :2])


def test_make_refiner_affinity_and_errors():
    scores = torch.rand(1, 2, 4, 4)
    aff = torch.rand(4, 4)
    out = make_refiner("affinity", None, affinity=aff, grid=(2, 2))(scores)
    assert torch.allclose(out, refine_with_affinity(scores, aff[None], (2, 2)))
    with pytest.raises(ValueError, match="affinity"):
        make_refiner("affinity", None)
    with pytest.raises(ValueError, match="unknown refinement"):
        make_refiner("blur", np.zeros((2, 2, 3), np.uint8))


# ----------------------------------------------------------------------------- background helpers and CRF


def test_psa_background_by_hand():
    maps = torch.tensor([[[0.2, 1.0]], [[0.5, 0.0]]])
    assert torch.allclose(psa_background(maps, 2.0), torch.tensor([[0.25, 0.0]]))
    assert torch.equal(psa_background(torch.zeros(0, 1, 2), 12), torch.ones(1, 2))
    stacked = with_background(maps, 0.3)
    assert torch.allclose(stacked[:, 0, 0], torch.tensor([0.3, 0.2, 0.5]))


def test_crf_presets_are_those_of_the_spec():
    assert crf_params("psa") == CRFParams(3, 3, 80, 13, 10, 10)
    assert crf_params("getam") == CRFParams(3, 3, 83, 5, 4, 20)
    assert crf_params("aream") == CRFParams(4, 3, 83, 5, 3, 10)
    assert set(CRF_PRESETS) == {"psa", "getam", "aream"}
    with pytest.raises(ConfigError, match="unknown CRF preset"):
        crf_params("fast")


def test_dense_crf_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(WSSSError, match=r'pip install "wsss\[crf\]"'):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5, np.float32))


def _two_region_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    height, width = 32, 40
    truth = np.zeros((height, width), np.int64)
    truth[:, 20:] = 1
    image = np.where(truth[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, axis=2)
    noisy = np.where(rng.random((height, width)) < 0.25, 1 - truth, truth)
    probs = np.stack([np.where(noisy == 0, 0.6, 0.4), np.where(noisy == 1, 0.6, 0.4)]).astype(np.float32)
    return image, probs, truth, noisy


def test_dense_crf_recovers_two_noisy_regions():
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the [crf] extra) is not installed")
    image, probs, truth, noisy = _two_region_problem()
    assert (noisy != truth).mean() > 0.2
    marginals = dense_crf(image, probs, "psa")
    assert marginals.shape == probs.shape
    assert np.allclose(marginals.sum(0), 1.0, atol=1e-4)
    assert (marginals.argmax(0) == truth).mean() > 0.99


def test_crf_refiner_and_psa_crf_match_dense_crf():
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the [crf] extra) is not installed")
    image, probs, _, _ = _two_region_problem(1)
    refined = make_refiner("crf", image, crf="aream")(torch.from_numpy(probs)[None])
    assert np.allclose(refined[0].numpy(), dense_crf(image, probs, "aream"), atol=1e-6)
    maps = probs[1:]
    stacked = np.concatenate([(1 - maps.max(0, keepdims=True)) ** 4, maps])
    assert np.allclose(psa_crf(image, maps, 4), dense_crf(image, stacked), atol=1e-6)
