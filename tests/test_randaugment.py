"""RandAugment with timm's policy-string semantics, and RandomErasing in pixel mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from wsss.data.randaugment import RandAugment, RandomErasing, level_to_arg
from wsss.data.transforms import build_transforms
from wsss.errors import ConfigError

# timm auto_augment.py, _RAND_INCREASING_TRANSFORMS (the op set of "-inc1"), spelled out here on its own.
TIMM_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


def test_policy_string_means_what_it_means_in_timm():
    ra = RandAugment.from_policy("rand-m9-mstd0.5-inc1")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.magnitude_max, ra.p) == (2, 9.0, 0.5, 10.0, 0.5)
    assert list(ra.ops) == TIMM_INCREASING
    plain = RandAugment.from_policy("rand-m7-n3-p0.3")
    assert (plain.num_ops, plain.magnitude, plain.p) == (3, 7.0, 0.3)
    assert "PosterizeIncreasing" not in plain.ops and "Posterize" in plain.ops and len(plain.ops) == 15
    for bad in ("auto-m9", "rand-m9-q2", "rand-mx"):
        with pytest.raises(ConfigError):
            RandAugment.from_policy(bad)


def test_sampled_ops_and_magnitudes_follow_the_policy():
    ra = RandAugment.from_policy("rand-m9-mstd0.5-inc1")
    g = torch.Generator().manual_seed(0)
    draws = [op for _ in range(6000) for op in ra.draw(g)]
    assert len(draws) == 12000  # two ops per call
    names = [d.name for d in draws]
    freq = np.array([names.count(op) for op in TIMM_INCREASING]) / len(names)
    assert np.abs(freq - 1 / 15).max() < 0.012  # uniform with replacement
    assert abs(np.mean([d.applied for d in draws]) - 0.5) < 0.02  # each op fires with p = 0.5
    mags = np.array([d.magnitude for d in draws])
    assert mags.max() <= 10.0 and mags.min() >= 0.0
    # clip(N(9, 0.5), 0, 10): mean 9 (the clip at 10 is 2 sigma away), std just under 0.5
    assert abs(mags.mean() - 9.0) < 0.02 and 0.45 < mags.std() < 0.5
    rot = np.array([d.arg for d in draws if d.name == "Rotate"])
    assert abs((rot < 0).mean() - 0.5) < 0.05 and np.allclose(np.abs(rot), [3 * m for d in draws
                                                                           if d.name == "Rotate" for m in [d.magnitude]])
    fixed = RandAugment.from_policy("rand-m9-inc1")
    assert {d.magnitude for _ in range(50) for d in fixed.draw(g)} == {9.0}


@pytest.mark.parametrize("op,negate,expected", [
    ("Rotate", False, 27.0), ("Rotate", True, -27.0), ("ShearX", False, 0.27), ("TranslateYRel", True, -0.405),
    ("PosterizeIncreasing", False, 1), ("SolarizeIncreasing", False, 256 - 230), ("SolarizeAdd", False, 99),
    ("ColorIncreasing", False, 1.81), ("SharpnessIncreasing", True, 0.19), ("AutoContrast", False, None),
    ("Posterize", False, 3), ("Brightness", False, 1.72),
])
def test_levels_at_magnitude_9(op, negate, expected):
    """timm's *_level_to_arg at m = 9, worked by hand: level 0.9 -> 30*0.9, 0.3*0.9, 0.45*0.9, 4 - int(3.6),
    256 - int(230.4), int(99.0), 1 +- 0.9*0.9, int(3.6), 0.9*1.8 + 0.1."""
    got = level_to_arg(op, 9.0, negate)
    assert got == expected if expected is None or isinstance(expected, int) else got == pytest.approx(expected)


def _label_image() -> tuple[torch.Tensor, torch.Tensor]:
    """A 40x60 image whose red channel encodes a 3-stripe label map (exact in uint8)."""
    mask = torch.zeros(40, 60, dtype=torch.long)
    mask[:, 20:40], mask[:, 40:] = 1, 2
    img = torch.zeros(3, 40, 60)
    img[0] = mask.float() * 100 / 255
    img[1] = torch.linspace(0, 1, 60)[None, :].expand(40, 60).mul(255).round() / 255
    return img, mask


def test_geometric_ops_move_image_and_mask_together():
    img, mask = _label_image()
    ra = RandAugment(ops=["TranslateXRel"], num_ops=1, magnitude=5.0, p=1.0, fill=(7, 7, 7),
                     interpolation="bilinear")
    g = torch.Generator().manual_seed(1)
    (op,) = ra.draw(torch.Generator().manual_seed(1))
    out, out_mask = ra(img, mask, g)
    shift = op.arg * 60  # PIL's affine reads the input at x + shift
    assert abs(abs(shift) - 13.5) < 1e-6
    kept = out_mask != 255
    assert kept.float().mean() < 0.85 and (~kept).any()
    # where the mask is kept, the red channel still encodes the same label; vacated pixels are the fill colour
    red = (out[0] * 255).round().long()
    interior = kept.clone()
    interior[:, 1:] &= kept[:, :-1]
    interior[:, :-1] &= kept[:, 1:]
    edges = torch.zeros_like(kept)
    for x in (19, 20, 39, 40):  # the stripe borders after the shift are interpolated in the image only
        edges |= (torch.arange(60)[None, :] - x).abs().expand(40, 60) <= 14
    sure = interior & ~edges
    assert sure.any() and torch.equal(red[sure], out_mask[sure] * 100)
    assert torch.all((out[:, ~kept] * 255).round() == 7)


def test_colour_ops_equal_pil_on_the_same_pixels():
    """An op on wsss's float image is PIL's op on its uint8 pixels (timm's ops are PIL's)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    img = torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255)
    for name, pil in [("Equalize", ImageOps.equalize), ("AutoContrast", ImageOps.autocontrast),
                      ("Invert", ImageOps.invert), ("SolarizeIncreasing", lambda im: ImageOps.solarize(im, 26))]:
        ra = RandAugment(ops=[name], num_ops=1, magnitude=9.0, p=1.0)
        out, none = ra(img, None, torch.Generator().manual_seed(0))
        ref = np.asarray(pil(Image.fromarray(array)), dtype=np.float32).transpose(2, 0, 1) / 255
        assert none is None and torch.equal(out, torch.from_numpy(ref)), name
    ra = RandAugment(ops=["SolarizeAdd"], num_ops=1, magnitude=9.0, p=1.0)
    out, _ = ra(img, None, torch.Generator().manual_seed(0))
    expected = np.where(array < 128, np.minimum(array.astype(int) + 99, 255), array)
    assert torch.equal((out * 255).round().long(), torch.from_numpy(expected.transpose(2, 0, 1)).long())


def test_random_erasing_pixel_mode():
    img = torch.zeros(3, 60, 80)
    mask = torch.ones(60, 80, dtype=torch.long)
    never = RandomErasing(p=0.0)
    assert never(img, mask, torch.Generator().manual_seed(0))[0] is img
    always = RandomErasing(p=1.0, mode="pixel")
    areas = []
    for seed in range(200):
        out, m = always(img, mask, torch.Generator().manual_seed(seed))
        assert m is mask
        erased = (out != 0).any(0)
        if not erased.any():
            continue  # no box fitted in 10 tries
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert erased.sum() == h * w  # one rectangle
        areas.append(h * w / (60 * 80))
        assert 0.3 / 1.2 <= h / w <= 1.2 / 0.3
        box = out[:, erased]
        assert abs(float(box.std()) - 1.0) < 0.35  # per-pixel N(0, 1), not a constant
    assert len(areas) > 150 and 0.015 <= min(areas) and max(areas) <= 0.34
    a = always(img, mask, torch.Generator().manual_seed(5))[0]
    b = always(img, mask, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)


def test_transform_config_places_them_like_timm():
    t = build_transforms({"crop": 32, "scale": [0.5, 1.0], "hflip": True, "rand_augment": "rand-m9-mstd0.5-inc1",
                          "random_erasing": 0.25, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    names = [type(s).__name__ for s in t.transforms]
    assert names == ["ToTensor", "RandomHorizontalFlip", "RandomResizedCrop", "RandAugment", "Normalize",
                     "RandomErasing"]
    assert t.transforms[3].fill == (124, 116, 104)  # timm's img_mean for the ImageNet mean
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), dtype=np.uint8)
    out, m = t(image, mask, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and m.shape == (32, 32) and torch.isfinite(out).all()
    assert math.isclose(t.transforms[5].p, 0.25)
