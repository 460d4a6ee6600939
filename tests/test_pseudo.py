"""Pseudo labels: hand-made maps whose label maps are written out, the percentile rule, the opening."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.pseudo import (
    binary_opening,
    label_completion,
    label_completion_with_saliency,
    maps_to_labels,
    percentile_threshold,
    psa_labels,
    two_threshold_labels,
)
from wsss.refine import make_refiner, par

T = torch.tensor


# ----------------------------------------------------------------------------- threshold rules


def test_threshold_labels_by_hand():
    # classes given out of order: channel 0 is label 15, channel 1 is label 3
    maps = T([
        [[0.9, 0.5, 0.2], [0.7, 0.7, 0.0]],   # label 15
        [[0.1, 0.4, 0.6], [0.7, 0.2, 0.0]],   # label 3
    ])
    labels = maps_to_labels(maps, [15, 3], 0.5)
    # 0.5 == t is background (ties go to the background); 0.7 vs 0.7 goes to the lower label 3
    assert labels.tolist() == [[15, 0, 3], [3, 15, 0]]
    assert labels.dtype == torch.int64
    no_bg = maps_to_labels(maps, [15, 3], 0.5, background_label=255)
    assert no_bg.tolist() == [[15, 255, 3], [3, 15, 255]]


def test_psa_labels_by_hand():
    maps = T([[[0.45, 0.55, 0.9, 0.0]]])  # alpha = 1: background 1 - max
    assert psa_labels(maps, [7], alpha=1).tolist() == [[0, 7, 7, 0]]
    # alpha = 12: (1 - 0.45)^12 = 7.7e-4, so the weak pixel becomes foreground too
    assert psa_labels(maps, [7], alpha=12).tolist() == [[7, 7, 7, 0]]


def test_two_thresholds_by_hand():
    maps = T([[[0.8, 0.5, 0.2], [0.36, 0.34, 0.56]]])
    expected = [[4, 255, 0], [255, 0, 4]]
    for softmax in (False, True):
        labels = two_threshold_labels(maps[None], T([[4]]), high=0.55, low=0.35, softmax=softmax, scale=1.0)
        assert labels.tolist() == [expected]


def test_two_thresholds_two_classes_by_hand():
    maps = T([
        [[0.6, 0.4, 0.1]],  # label 2
        [[0.1, 0.2, 0.3]],  # label 9
    ])
    labels = two_threshold_labels(maps[None], T([[2, 9]]), high=0.55, low=0.25, scale=1.0)
    # pixel 0: class 2 above both; pixel 1: between -> 255; pixel 2: only label 9 beats the low threshold -> 255
    assert labels.tolist() == [[[2, 255, 255]]]
    # The stored order and an unused slot (-1, whatever its scores) change nothing; background_label is used.
    noise = torch.full((1, 1, 3), 5.0)
    swapped = two_threshold_labels(torch.cat([noise, maps.flip(0)])[None], T([[-1, 9, 2]]), high=0.55, low=0.25,
                                   scale=1.0)
    assert swapped.tolist() == [[[2, 255, 255]]]
    none_used = two_threshold_labels(maps[None], T([[-1, -1]]), scale=1.0, background_label=255)
    assert none_used.tolist() == [[[255, 255, 255]]]
    with pytest.raises(ValueError):
        two_threshold_labels(maps[None], T([[2, 9]]), high=0.3, low=0.5)


def test_refine_hook_sees_half_size_and_decides():
    maps = torch.zeros(1, 9, 11)
    maps[0, :, :5] = 0.9
    seen = []

    def swap(scores):
        seen.append(tuple(scores.shape))
        return scores.flip(1)  # exchanges background and class: every label flips

    labels = maps_to_labels(maps, [1], 0.5, refine=swap, softmax=True, scale=0.5)
    assert seen == [(1, 2, 4, 5)]  # int(9 / 2), int(11 / 2), as AReAM's cam_to_seg
    plain = maps_to_labels(maps, [1], 0.5, refine=lambda scores: scores, softmax=True, scale=0.5)
    assert torch.equal(labels, 1 - plain)
    assert 0 < int(plain.sum()) < plain.numel()


def test_two_thresholds_with_par_follow_cam_to_seg():
    """A batch of two images (one refiner on the batch, an unused slot full of high scores) against AReAM's
    cam_to_seg written out image by image."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(2, 12, 14, 3)).astype(np.uint8)
    maps = torch.from_numpy(rng.random((2, 3, 12, 14)).astype(np.float32))
    maps[1, 1:] = 0.99  # unused slots: never a label
    classes = T([[8, 3, -1], [5, -1, -1]])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    got = two_threshold_labels(maps, classes, refine=make_refiner("par", batch))
    # A single image with a numpy refiner gives the same labels as its row of the batch.
    single = two_threshold_labels(maps[:1], classes[:1], refine=make_refiner("par", images[0]))
    assert torch.equal(single[0], got[0])

    def cam_to_seg(image, class_maps, labels, tau):
        img = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        img_half = F.interpolate(img, size=(6, 7), mode="bilinear", align_corners=False)
        cams = torch.cat([torch.full((1, 12, 14), tau), class_maps])[None]
        cams = F.interpolate(cams, size=(6, 7), mode="bilinear", align_corners=False).softmax(1)
        refined = F.interpolate(par(img_half, cams), size=(12, 14), mode="bilinear", align_corners=False)
        return torch.tensor([0] + labels)[refined.argmax(1)[0]]

    for i, (used_maps, labels) in enumerate([(maps[0, [1, 0]], [3, 8]), (maps[1, :1], [5])]):
        high, low = cam_to_seg(images[i], used_maps, labels, 0.55), cam_to_seg(images[i], used_maps, labels, 0.35)
        expected = high.clone()
        expected[high == 0] = 255
        expected[(high == 0) & (low == 0)] = 0
        assert torch.equal(got[i], expected), i
    assert {3, 8} <= set(got[0].unique().tolist()) and 5 in set(got[1].unique().tolist())
    assert 0 in set(got.unique().tolist())


# ----------------------------------------------------------------------------- label completion


def test_percentile_rule_on_known_values():
    values = torch.arange(1, 21, dtype=torch.float32) / 20  # 0.05 ... 1.00, n = 20
    values = torch.cat([values, torch.zeros(7), -torch.ones(3)])  # zeros and negatives do not count
    assert percentile_threshold(values, 0.9) == pytest.approx(0.95)  # sorted index floor(18.0) = 18
    assert percentile_threshold(values[:10], 0.9) == pytest.approx(0.5)  # n = 10: index 9 = the maximum
    assert percentile_threshold(values[:13], 0.9) == pytest.approx(0.6)  # n = 13: floor(11.7) = 11 -> 0.60
    assert percentile_threshold(torch.tensor([0.0, 0.7]), 0.9) is None  # n = 1: index 0 -> skipped


# Hand-made case, written out step by step in test_label_completion_with_saliency_by_hand.
P2 = [[0.9, 0.8, 0.0, 0.0, 0.85],
      [0.7, 0.05, 0.0, 0.0, 0.0],
      [0.0, 0.0, 0.0, 0.3, 0.0]]
P5 = [[0.0, 0.0, 0.5, 0.92, 0.93],
      [0.0, 0.0, 0.04, 0.95, 0.0],
      [0.0, 0.0, 0.0, 0.2, 0.0]]
SAL = [[1, 1, 1, 0, 0],
       [1, 0, 0, 1, 0],
       [0, 0, 1, 1, 0]]


def test_label_completion_with_saliency_by_hand():
    # step 1 (bg = (1 - max)^32; 0.95^32 = 0.19 beats 0.05, 0.96^32 = 0.27 beats 0.04):
    #   [[2, 2, 5, 5, 5], [2, bg, bg, 5, bg], [bg, bg, bg, 2, bg]]
    # step 2 (bg -> 255, saliency 0 -> 0):
    #   [[2, 2, 5, 0, 0], [2, 0, 0, 5, 0], [0, 0, 255, 2, 0]]
    # step 3 with cut 0.3 (n = 6 positives per class, sorted index int(1.8) = 1):
    #   label 2: tau = 0.3, claims (0, 4) (0.85, still 0) although label 5 is higher there;
    #   label 5: tau = 0.2, claims (0, 3) (0.92); (0, 4) is already taken by label 2.
    maps = T([P5, P2])  # out of order on purpose
    labels, saliency = label_completion_with_saliency(maps, [5, 2], T(SAL), cut_threshold=0.3, opening=0)
    assert labels.tolist() == [[2, 2, 5, 5, 2],
                               [2, 0, 0, 5, 0],
                               [0, 0, 255, 2, 0]]
    assert saliency.tolist() == [[1, 1, 1, 255, 255],
                                 [1, 0, 0, 1, 0],
                                 [0, 0, 1, 1, 0]]


def test_label_completion_without_saliency_by_hand():
    # the CAM foreground stands in for the saliency: step 2 changes nothing and no pixel above a
    # class's threshold is still background, so the labels are the step-1 argmax.
    labels = label_completion(T([P2, P5]), [2, 5], None, cut_threshold=0.3, opening=0)
    assert labels.tolist() == [[2, 2, 5, 5, 5],
                               [2, 0, 0, 5, 0],
                               [0, 0, 0, 2, 0]]


def test_label_completion_default_cut_claims_top_decile():
    # one class, saliency background everywhere except nothing: every labelled pixel must come from completion
    values = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10) / 100  # n = 100: tau = sorted[90] = 0.91
    labels = label_completion(values[None], [1], torch.zeros(10, 10), opening=0)
    expected = (values > 0.91).long()
    assert torch.equal(labels, expected)
    assert int(labels.sum()) == 9


def test_label_completion_opening_drops_specks_and_keeps_opencv_shift():
    maps = torch.zeros(1, 20, 20)
    maps[0, 4:16, 4:16] = 0.8  # a 12 x 12 object
    maps[0, 0:3, 17:20] = 0.8  # a 3 x 3 speck in the corner
    sal = (maps[0] > 0).float()  # saliency agrees with the maps
    textbook = label_completion(maps, [6], sal, opening=10, opencv_anchor=False)
    expected = torch.zeros(20, 20, dtype=torch.int64)
    expected[4:16, 4:16] = 6
    assert torch.equal(textbook, expected)
    # OpenCV's even-kernel opening is shifted one pixel down-right, so the top row and left column go
    shifted = label_completion(maps, [6], sal)
    expected_cv = torch.zeros(20, 20, dtype=torch.int64)
    expected_cv[5:16, 5:16] = 6
    assert torch.equal(shifted, expected_cv)


# ----------------------------------------------------------------------------- opening


def test_opening_by_hand():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1:4, 1:4] = True      # survives a 3x3 opening
    mask[5, 0:3] = True        # a line: removed
    mask[0, 5] = True          # a speck on the border: removed
    opened = binary_opening(mask, 3)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:4, 1:4] = True
    assert torch.equal(opened, expected)
    # a 2-pixel strip along the border survives: outside the image counts as foreground for the erosion
    strip = torch.zeros(6, 6, dtype=torch.bool)
    strip[0:2, :] = True
    assert torch.equal(binary_opening(strip, 3), strip)


def _slow_opening(mask: np.ndarray, size: int, opencv_anchor: bool) -> np.ndarray:
    height, width = mask.shape
    anchor = size // 2

    def fg(y, x):
        return True if not (0 <= y < height and 0 <= x < width) else bool(mask[y, x])

    eroded = np.zeros_like(mask, dtype=bool)
    for y in range(height):
        for x in range(width):
            eroded[y, x] = all(fg(y - anchor + i, x - anchor + j) for i in range(size) for j in range(size))
    before = anchor if opencv_anchor else size - 1 - anchor
    out = np.zeros_like(mask, dtype=bool)
    for y in range(height):
        for x in range(width):
            out[y, x] = any(
                eroded[p, q]
                for p in range(y - before, y - before + size)
                for q in range(x - before, x - before + size)
                if 0 <= p < height and 0 <= q < width
            )
    return out


@pytest.mark.parametrize("size", [3, 4])
@pytest.mark.parametrize("opencv_anchor", [False, True])
def test_opening_matches_loop_reference(size, opencv_anchor):
    mask = np.random.default_rng(size).random((12, 13)) < 0.7
    got = binary_opening(torch.from_numpy(mask), size, opencv_anchor=opencv_anchor).numpy()
    assert np.array_equal(got, _slow_opening(mask, size, opencv_anchor))
    assert got.sum() < mask.sum()  # it removed something
