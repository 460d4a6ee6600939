"""Paired transforms: values against hand-computed numbers and independent references (PIL, colorsys)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data.transforms import (
    CenterCrop,
    ColorJitter,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizeLong,
    RandomResizedCrop,
    RandomScale,
    Resize,
    ToTensor,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    build_transforms,
    crop,
    denormalize,
    eval_transforms,
    hsv_to_rgb,
    resize,
    rgb_to_hsv,
)
from wsss.errors import ConfigError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _arange_image(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose every pixel is unique (channel 0 = flat index) and the same index as mask."""
    index = torch.arange(h * w, dtype=torch.float32).reshape(h, w)
    image = torch.stack([index, index + 0.25, index + 0.5])
    return image, index.long()


def test_to_tensor_values():
    array = np.array([[[0, 51, 255], [255, 102, 0]]], dtype=np.uint8)  # 1x2 pixels
    image, mask = ToTensor()(array, np.array([[3, 255]], dtype=np.uint8))
    expected = torch.tensor([[[0.0, 1.0]], [[0.2, 0.4]], [[1.0, 0.0]]])
    assert image.dtype == torch.float32 and torch.allclose(image, expected)
    assert mask.dtype == torch.int64 and mask.tolist() == [[3, 255]]
    # already a float tensor: unchanged
    assert ToTensor()(image)[0] is image


def test_hflip_of_known_array():
    image = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]).expand(3, 2, 3)
    mask = torch.tensor([[0, 1, 2], [3, 4, 255]])
    out_image, out_mask = RandomHorizontalFlip(p=1.0)(image, mask, _gen(0))
    assert out_image[0].tolist() == [[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]
    assert out_mask.tolist() == [[2, 1, 0], [255, 4, 3]]
    same_image, same_mask = RandomHorizontalFlip(p=0.0)(image, mask, _gen(0))
    assert torch.equal(same_image, image) and torch.equal(same_mask, mask)


def test_flip_probability_is_about_p():
    image, mask = _arange_image(2, 3)
    gen = _gen(1)
    flips = sum(int(RandomHorizontalFlip(0.3)(image, mask, gen)[1][0, 0]) != 0 for _ in range(400))
    assert 90 <= flips <= 150  # 120 expected


def test_crop_function_matches_slice_and_pads():
    image, mask = _arange_image(5, 6)
    out_image, out_mask = crop(image, mask, 1, 2, 3, 3)
    assert torch.equal(out_image, image[:, 1:4, 2:5]) and torch.equal(out_mask, mask[1:4, 2:5])
    # Box hanging off the top-left corner: the outside is padding.
    out_image, out_mask = crop(image, mask, -1, -2, 3, 4, pad_image=(0.1, 0.2, 0.3), pad_mask=255)
    assert out_mask.tolist() == [[255, 255, 255, 255], [255, 255, 0, 1], [255, 255, 6, 7]]
    assert out_image[:, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert out_image[0, 1:, 2:].tolist() == [[0.0, 1.0], [6.0, 7.0]]


def test_random_crop_contents_equal_the_right_slice():
    h, w = 9, 11
    image, mask = _arange_image(h, w)
    tops, lefts = set(), set()
    for seed in range(40):
        out_image, out_mask = RandomCrop((4, 5))(image, mask, _gen(seed))
        first = int(out_mask[0, 0])
        top, left = divmod(first, w)
        tops.add(top)
        lefts.add(left)
        assert 0 <= top <= h - 4 and 0 <= left <= w - 5
        assert torch.equal(out_mask, mask[top : top + 4, left : left + 5])
        assert torch.equal(out_image, image[:, top : top + 4, left : left + 5])
    assert len(tops) >= 4 and len(lefts) >= 5  # offsets really vary


def test_random_crop_pads_small_images():
    image, mask = _arange_image(2, 3)
    placements = set()
    for seed in range(30):
        out_image, out_mask = RandomCrop((4, 5), pad_image=-7.0, pad_mask=255)(image, mask, _gen(seed))
        inside = out_mask != 255
        assert int(inside.sum()) == 6
        rows, cols = torch.nonzero(inside, as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        placements.add((top, left))
        assert torch.equal(out_mask[top : top + 2, left : left + 3], mask)
        assert torch.equal(out_image[:, top : top + 2, left : left + 3], image)
        assert bool((out_image[:, ~inside] == -7.0).all())
    assert len(placements) > 3  # the image lands at random offsets in the canvas


def test_center_crop_hand_computed():
    image, mask = _arange_image(5, 5)
    _, out = CenterCrop(3)(image, mask)
    assert out.tolist() == [[6, 7, 8], [11, 12, 13], [16, 17, 18]]
    small_image, small_mask = _arange_image(2, 2)
    out_image, out = CenterCrop(4, pad_image=0.0)(small_image, small_mask)
    assert out.tolist() == [[255] * 4, [255, 0, 1, 255], [255, 2, 3, 255], [255] * 4]
    assert out_image[0, 0].tolist() == [0.0] * 4


def test_nearest_mask_resize_never_invents_labels_and_is_exact():
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(rng.choice([0, 3, 7, 255], size=(17, 23)))
    image = torch.rand(3, 17, 23)
    for size in [(5, 9), (40, 31), (17, 50)]:
        _, out = resize(image, mask, size)
        assert set(out.unique().tolist()) <= {0, 3, 7, 255}
    # Upsampling by 2 repeats each label 2x2; downsampling by 2 keeps pixel 2i+1 (nearest pixel centre).
    small = torch.tensor([[1, 2], [3, 4]])
    _, up = resize(torch.zeros(3, 2, 2), small, (4, 4))
    assert up.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    big = torch.arange(16).reshape(4, 4)
    _, down = resize(torch.zeros(3, 4, 4), big, (2, 2))
    assert down.tolist() == [[5, 7], [13, 15]]


@pytest.mark.parametrize("size", [(20, 30), (90, 70)])
def test_bilinear_resize_matches_pil(size):
    rng = np.random.default_rng(1)
    channel = rng.random((48, 64)).astype(np.float32)
    ours, _ = resize(torch.from_numpy(channel)[None].expand(3, -1, -1), None, size)
    pil = np.asarray(Image.fromarray(channel, mode="F").resize((size[1], size[0]), Image.BILINEAR))
    assert np.abs(ours[0].numpy() - pil).max() < 2e-3


def test_resize_short_side_and_fixed():
    image = torch.rand(3, 30, 60)
    assert Resize(15)(image)[0].shape == (3, 15, 30)
    assert Resize((7, 9))(image)[0].shape == (3, 7, 9)
    tall = torch.rand(3, 90, 40)
    assert Resize(20)(tall)[0].shape == (3, 45, 20)


def test_random_resize_long_range_and_aspect():
    image, mask = torch.rand(3, 100, 50), torch.zeros(100, 50, dtype=torch.long)
    longs = set()
    for seed in range(60):
        out_image, out_mask = RandomResizeLong(30, 35)(image, mask, _gen(seed))
        h, w = out_image.shape[-2:]
        assert out_mask.shape == (h, w)
        assert 30 <= h <= 35 and w == round(h / 2)
        longs.add(h)
    assert longs == set(range(30, 36))  # both ends reachable


def test_random_scale_factor_range():
    image = torch.rand(3, 40, 60)
    sizes = set()
    for seed in range(40):
        out, _ = RandomScale((0.5, 1.5))(image, None, _gen(seed))
        h, w = out.shape[-2:]
        assert 20 <= h <= 60 and abs(w / h - 1.5) < 0.06
        sizes.add(h)
    assert len(sizes) > 10


def test_random_resized_crop_box_and_content():
    image, mask = _arange_image(40, 50)
    t = RandomResizedCrop((16, 16), scale=(0.2, 0.6), ratio=(0.5, 2.0))
    for seed in range(20):
        top, left, h, w = t.box(40, 50, _gen(seed))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 50
        assert 0.2 * 2000 * 0.85 <= h * w <= 0.6 * 2000 * 1.15
        # The transform with the same generator state crops that very box, then resizes it.
        out_image, out_mask = t(image, mask, _gen(seed))
        box = (slice(top, top + h), slice(left, left + w))
        ref_image, ref_mask = resize(image[(slice(None), *box)], mask[box], (16, 16))
        assert torch.equal(out_mask, ref_mask) and torch.allclose(out_image, ref_image)
    # Full-area square box on a square image at the same size is the identity.
    sq_image, sq_mask = _arange_image(12, 12)
    out_image, out_mask = RandomResizedCrop(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))(sq_image, sq_mask, _gen(0))
    assert torch.equal(out_mask, sq_mask) and torch.equal(out_image, sq_image)


def test_rgb_hsv_matches_colorsys():
    rng = np.random.default_rng(2)
    rgb = rng.random((3, 7, 9)).astype(np.float32)
    rgb[:, 0, 0] = 0.5  # grey: hue and saturation 0
    hsv = rgb_to_hsv(torch.from_numpy(rgb)).numpy()
    for y in range(7):
        for x in range(9):
            expected = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
            assert hsv[:, y, x] == pytest.approx(expected, abs=1e-5)
    back = hsv_to_rgb(torch.from_numpy(hsv)).numpy()
    assert np.abs(back - rgb).max() < 1e-5


def test_colour_adjustments_hand_computed():
    red = torch.tensor([1.0, 0.0, 0.0]).reshape(3, 1, 1).expand(3, 2, 2)
    assert adjust_hue(red, 1 / 3)[:, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    assert adjust_hue(red, -1 / 3)[:, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
    pixel = torch.tensor([0.2, 0.4, 0.8]).reshape(3, 1, 1)
    grey = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.8
    assert adjust_saturation(pixel, 0.0).flatten().tolist() == pytest.approx([grey] * 3)
    two = torch.tensor([[[0.0, 1.0]]]).expand(3, 1, 2)  # black and white: mean grey 0.5
    assert adjust_contrast(two, 0.5)[0, 0].tolist() == pytest.approx([0.25, 0.75])


def test_color_jitter_brightness_only_scales_uniformly():
    image = torch.rand(3, 8, 8) * 0.5
    mask = torch.arange(64).reshape(8, 8)
    factors = []
    for seed in range(20):
        out, out_mask = ColorJitter(brightness=0.4)(image, mask, _gen(seed))
        ratio = out / image
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5)
        factors.append(float(ratio.flatten()[0]))
        assert out_mask is mask
    assert 0.6 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.4
    unchanged, _ = ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.0)(image, mask, _gen(0))
    assert torch.equal(unchanged, image)


def test_normalize_numbers_and_inverse():
    image = torch.tensor([0.75, 0.5, 0.0]).reshape(3, 1, 1)
    out, _ = Normalize(mean=(0.5, 0.25, 0.5), std=(0.25, 0.5, 0.1))(image)
    assert out.flatten().tolist() == pytest.approx([1.0, 0.5, -5.0])
    assert denormalize(out, (0.5, 0.25, 0.5), (0.25, 0.5, 0.1)).flatten().tolist() == pytest.approx([0.75, 0.5, 0.0])


def test_same_seed_same_output_and_different_seed_differs():
    pipeline = build_transforms(
        {"resize_long": [40, 60], "hflip": True, "color_jitter": [0.4, 0.4, 0.4, 0.1], "crop": 32}
    )
    array = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = np.random.default_rng(4).integers(0, 5, (50, 70)).astype(np.uint8)
    a = pipeline(array, mask, _gen(7))
    b = pipeline(array, mask, _gen(7))
    c = pipeline(array, mask, _gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # Without a generator the global torch RNG is used, reproducibly after manual_seed.
    torch.manual_seed(5)
    d = pipeline(array, mask)
    torch.manual_seed(5)
    e = pipeline(array, mask)
    assert torch.equal(d[0], e[0])


def test_build_transforms_from_brief_example():
    cfg = {"crop": 24, "scale": [0.5, 1.0], "hflip": True, "color_jitter": [0.4, 0.4, 0.4, 0.1],
           "mean": [0.5] * 3, "std": [0.5] * 3}
    pipeline = build_transforms(cfg)
    assert any(isinstance(t, RandomResizedCrop) for t in pipeline.transforms)
    array = np.full((40, 30, 3), 255, dtype=np.uint8)
    image, mask = pipeline(array, np.zeros((40, 30), np.uint8), _gen(0))
    assert image.shape == (3, 24, 24) and mask.shape == (24, 24)
    assert image.max() <= 1.0 + 1e-6 and image.min() >= -1.0 - 1e-6


def test_random_crop_padding_normalises_to_zero_in_factory():
    pipeline = build_transforms({"crop": 20, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2]})
    array = np.full((10, 12, 3), 255, dtype=np.uint8)
    image, mask = pipeline(array, np.ones((10, 12), np.uint8), _gen(0))
    pad = mask == 255
    assert int(pad.sum()) == 400 - 120
    assert torch.allclose(image[:, pad], torch.zeros(1))
    expected = torch.tensor([3.0, 2.5, 2.0]).reshape(3, 1).expand(3, 120)  # (1 - mean) / std
    assert torch.allclose(image[:, ~pad], expected)


def test_build_transforms_rejects_bad_config():
    with pytest.raises(ConfigError, match="unknown transform keys"):
        build_transforms({"crop": 10, "flip": True})
    with pytest.raises(ConfigError, match="crop_mode"):
        build_transforms({"crop": 10, "crop_mode": "diagonal"})
    with pytest.raises(ConfigError):
        build_transforms({"resize_long": [50, 10]})


def test_eval_transforms_values():
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[..., 0] = 255
    image, mask = eval_transforms((2, 3), mean=(0.5,) * 3, std=(0.5,) * 3)(array, np.zeros((4, 6), np.uint8))
    assert image.shape == (3, 2, 3)
    assert image[0].unique().tolist() == [1.0] and image[1].unique().tolist() == [-1.0]
    assert isinstance(eval_transforms(), Compose)


def test_hide_patches_blanks_whole_cells_reproducibly():
    from wsss.data.transforms import HidePatches

    image = torch.rand(3, 20, 28) + 1.0  # strictly positive, so a hidden pixel is exactly 0
    mask = torch.zeros(20, 28, dtype=torch.long)
    t = HidePatches(8, 0.5)
    out, out_mask = t(image, mask, torch.Generator().manual_seed(3))
    again, _ = t(image, mask, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert out_mask is mask
    hidden = out[0] == 0
    # Every 8x8 cell (the last row/column of cells is partial) is either all hidden or all kept, in every channel.
    for r in range(0, 20, 8):
        for c in range(0, 28, 8):
            cell = hidden[r : r + 8, c : c + 8]
            assert cell.all() or not cell.any()
    assert torch.equal(out == 0, (out[0] == 0).expand_as(out))
    kept = ~hidden
    assert torch.equal(out[:, kept], image[:, kept])
    fractions = [(HidePatches(4, 0.3)(torch.ones(3, 64, 64), None, torch.Generator().manual_seed(s))[0][0] == 0)
                 .float().mean().item() for s in range(40)]
    assert abs(sum(fractions) / len(fractions) - 0.3) < 0.05


def test_build_transforms_adds_hide_patches_after_normalisation():
    t = build_transforms({"crop": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "hide_patches": [4, 0.5]})
    assert type(t.transforms[-1]).__name__ == "HidePatches"
    assert type(t.transforms[-2]).__name__ == "Normalize"
