"""Confusion matrix, threshold sweep and report: values against hand-computed numbers and slow references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wsss.evaluate import (
    ConfusionMatrix,
    ThresholdSweep,
    format_table,
    metrics_from_matrix,
    pixel_counts,
    threshold_grid,
    write_metrics_json,
)
from wsss.pseudo.labels import maps_to_labels

# A 2x3 example with 3 classes. Non-ignored (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,1); the pixel
# with gt 255 is skipped whatever its prediction. Rows = gt:  [[1,1,0],[0,2,0],[0,1,0]].
GT = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [1, 1, 2]], dtype=np.uint8)
MATRIX = np.array([[1, 1, 0], [0, 2, 0], [0, 1, 0]])


def _as(kind: str, a: np.ndarray):
    if kind == "uint8":
        return a.astype(np.uint8)
    if kind == "int64":
        return a.astype(np.int64)
    return torch.from_numpy(a.astype(np.int64))


@pytest.mark.parametrize("kind", ["uint8", "int64", "torch"])
def test_hand_computed_example(kind):
    cm = ConfusionMatrix(3, class_names=["a", "b", "c"])
    cm.update(_as(kind, PRED), _as(kind, GT))
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    m = cm.compute()
    # IoU = tp / (row + col - tp): 1/(2+1-1), 2/(2+4-2), 0/(1+0-0)
    np.testing.assert_allclose(m["iou"], [0.5, 0.5, 0.0])
    assert m["miou"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(m["recall"], [0.5, 1.0, 0.0])
    # class 2 is never predicted: precision 0/0 is undefined
    np.testing.assert_allclose(m["precision"], [1.0, 0.5, np.nan])
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["mean_accuracy"] == pytest.approx(0.5)
    assert m["num_images"] == 1
    assert m["confusion_matrix"].dtype == np.int64


@pytest.mark.parametrize("kind", ["uint8", "int64", "torch"])
def test_unlabelled_predictions_are_left_out_and_counted(kind):
    # A pseudo label leaves pixels (0, 1) and (1, 0) unlabelled (255), and (1, 2) where the gt is ignored too.
    # Kept (gt, pred): (0,0) (1,1) (2,1) -> rows = gt [[1,0,0],[0,1,0],[0,1,0]]; coverage 3 of 5 labelled gt pixels.
    pred = np.array([[0, 255, 1], [255, 1, 255]])
    cm = ConfusionMatrix(3)
    cm.update(_as(kind, pred), _as(kind, GT))
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    assert cm.unlabelled == 2
    m = cm.compute()
    assert m["coverage"] == pytest.approx(3 / 5)
    np.testing.assert_allclose(m["iou"], [1.0, 0.5, 0.0])  # over the labelled pixels only
    assert ConfusionMatrix(3).compute()["coverage"] != ConfusionMatrix(3).compute()["coverage"]  # NaN: nothing seen
    full = ConfusionMatrix(3)
    full.update(_as(kind, PRED), _as(kind, GT))
    assert full.compute()["coverage"] == 1.0
    # Merging and all_reduce keep the count; other out-of-range values are still refused.
    assert (cm + full).unlabelled == 2 and (cm + full).compute()["coverage"] == pytest.approx(8 / 10)
    with pytest.raises(ValueError, match="prediction"):
        cm.update(_as(kind, np.array([[0, 7, 1], [1, 1, 1]])), _as(kind, GT))


def test_any_shape_and_torch_matches_numpy():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(2, 3, 7, 9))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, 5, size=gt.shape)
    ref = np.zeros((5, 5), dtype=np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):  # slow reference
        if g != 255:
            ref[g, p] += 1
    np.testing.assert_array_equal(pixel_counts(pred.astype(np.uint8), gt.astype(np.uint8), 5), ref)
    np.testing.assert_array_equal(pixel_counts(pred, gt, 5), ref)
    np.testing.assert_array_equal(pixel_counts(torch.from_numpy(pred), torch.from_numpy(gt), 5), ref)


def test_absent_class_is_nan_or_zero():
    cm = ConfusionMatrix(4)  # class 3 appears in neither gt nor prediction
    cm.update(PRED, GT)
    m = cm.compute()
    assert math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx(1 / 3)  # mean over the 3 defined classes
    assert math.isnan(m["precision"][3]) and math.isnan(m["recall"][3])
    z = cm.compute(absent_as_zero=True)
    np.testing.assert_allclose(z["iou"], [0.5, 0.5, 0.0, 0.0])
    assert z["miou"] == pytest.approx(0.25)  # the PSA/ACR/AReAM mean counts it as 0
    np.testing.assert_allclose(z["precision"], [1.0, 0.5, 0.0, 0.0])


def test_precision_recall_numbers():
    matrix = np.array([[50, 10, 0], [5, 30, 5], [0, 0, 0]])
    m = metrics_from_matrix(matrix)
    np.testing.assert_allclose(m["precision"][:2], [50 / 55, 30 / 40])
    np.testing.assert_allclose(m["recall"][:2], [50 / 60, 30 / 40])
    np.testing.assert_allclose(m["iou"], [50 / 65, 30 / 50, 0.0])
    # class 2 is predicted (5 pixels) but never true: precision 0, recall undefined
    assert m["precision"][2] == 0.0 and math.isnan(m["recall"][2])
    assert m["mean_accuracy"] == pytest.approx((50 / 60 + 30 / 40) / 2)
    assert m["pixel_accuracy"] == pytest.approx(80 / 100)


@pytest.mark.parametrize("kind", ["uint8", "int64", "torch"])
def test_ignore_and_out_of_range(kind):
    cm = ConfusionMatrix(3)
    pred = PRED.copy()
    pred[1, 2] = 200  # at the ignored pixel: not an error
    cm.update(_as(kind, pred), _as(kind, GT))
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    bad_pred = PRED.copy()
    bad_pred[0, 0] = 3
    with pytest.raises(ValueError, match="prediction"):
        cm.update(_as(kind, bad_pred), _as(kind, GT))
    bad_gt = GT.copy()
    bad_gt[0, 0] = 7
    with pytest.raises(ValueError, match="ground truth"):
        cm.update(_as(kind, PRED), _as(kind, bad_gt))
    with pytest.raises(ValueError, match="shape"):
        cm.update(_as(kind, PRED[:, :2]), _as(kind, GT))
    np.testing.assert_array_equal(cm.matrix, MATRIX)  # failed updates add nothing


def test_merge_of_halves_equals_whole():
    rng = np.random.default_rng(1)
    whole, first, second = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    for i in range(4):
        gt = rng.integers(0, 6, size=(11, 13)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.integers(0, 6, size=gt.shape).astype(np.uint8)
        whole.update(pred, gt)
        first.update(pred[:5], gt[:5])
        second.update(pred[5:], gt[5:])
    summed = first + second
    np.testing.assert_array_equal(summed.matrix, whole.matrix)
    assert summed.compute()["miou"] == pytest.approx(whole.compute()["miou"])
    assert first.matrix.sum() + second.matrix.sum() == whole.matrix.sum()
    first.merge(second)
    np.testing.assert_array_equal(first.matrix, whole.matrix)
    assert first.num_images == 8
    first.reset()
    assert first.matrix.sum() == 0 and first.num_images == 0
    with pytest.raises(ValueError):
        first.merge(ConfusionMatrix(5))


def test_all_reduce_without_distributed_is_a_no_op():
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    cm.all_reduce()
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    assert cm.num_images == 1


def _all_reduce_worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cm = ConfusionMatrix(3)
    half = slice(0, 1) if rank == 0 else slice(1, 2)  # each process sees one row of the example
    cm.update(PRED[half], GT[half])
    sweep = ThresholdSweep(3, thresholds=[0.0, 0.5])
    sweep.update(np.full((1, 1, 3), 0.25 + 0.5 * rank), [1], GT[half])
    cm.all_reduce()
    sweep.all_reduce()
    if rank == 0:
        np.savez(out_file, matrix=cm.matrix, n=cm.num_images, sweep=sweep.matrices, sweep_n=sweep.num_images)
    dist.destroy_process_group()


def test_all_reduce_sums_over_two_processes(tmp_path):
    out = tmp_path / "out.npz"
    # fork: the children need no re-import of torch (a spawn costs seconds on a loaded machine)
    mp.start_processes(
        _all_reduce_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True, start_method="fork"
    )
    with np.load(out) as z:
        np.testing.assert_array_equal(z["matrix"], MATRIX)
        assert int(z["n"]) == 2
        # row 0 (gt 0,0,1) has peak 0.25: fg (label 1) at t=0, bg at t=0.5; row 1 (gt 1,2) peak 0.75: fg at both
        expected = np.array([[[0, 2, 0], [0, 2, 0], [0, 1, 0]], [[2, 0, 0], [1, 1, 0], [0, 1, 0]]])
        np.testing.assert_array_equal(z["sweep"], expected)
        assert int(z["sweep_n"]) == 2


# ----------------------------------------------------------------------------------- maps and sweeps


def test_maps_to_labels_hand_example():
    maps = torch.tensor([[[0.2, 0.5], [0.4, 0.9]], [[0.3, 0.6], [0.4, 0.9]]])
    # with background at t=0.4: 0.3 < t -> bg; 0.6 -> class 5; 0.4 ties t -> bg wins; 0.9 tie -> the lower label
    assert maps_to_labels(maps, [3, 5], 0.4).tolist() == [[0, 5], [0, 3]]
    assert maps_to_labels(maps, [3, 5], 0.0).tolist() == [[5, 5], [3, 3]]
    assert maps_to_labels(maps, [3, 5], None).tolist() == [[5, 5], [3, 3]]
    # The stored order does not matter: ties go to the lower label, not to the first map.
    assert maps_to_labels(maps.flip(0), [5, 3], 0.4).tolist() == [[0, 5], [0, 3]]
    assert maps_to_labels(maps.flip(0), [5, 3], None).tolist() == [[5, 5], [3, 3]]
    zeros = torch.zeros(2, 2, 2)
    assert maps_to_labels(zeros, [4, 1], None).tolist() == [[1, 1], [1, 1]]
    assert maps_to_labels(zeros[:0], [], 0.3).tolist() == [[0, 0], [0, 0]]
    assert maps_to_labels(maps, [3, 5], 0.95, background_label=255).tolist() == [[255, 255], [255, 255]]
    # The threshold is compared in the maps' dtype: float32 0.55 ties with t = 0.55 (it is 0.55000001 in float64).
    assert maps_to_labels(torch.tensor([[[0.55]]]), [2], 0.55).tolist() == [[0]]
    assert maps_to_labels(torch.tensor([[[0.55]]], dtype=torch.float64), [2], 0.5499999).tolist() == [[2]]
    with pytest.raises(ValueError):
        maps_to_labels(zeros[:0], [], None)  # without a threshold there is nothing to label with
    with pytest.raises(ValueError):
        maps_to_labels(maps, [0, 5], 0.5)  # background is never a stored map
    with pytest.raises(ValueError):
        maps_to_labels(maps, [3, 3], 0.5)  # one map per class


def _pixel_rule(maps: np.ndarray, classes, thresholds, has_background: bool) -> np.ndarray:
    """(T, H, W) labels, pixel by pixel: the lowest label among the maps with the largest value; with a background
    class, background unless that value beats t (compared in float32, the maps' dtype)."""
    k, h, w = maps.shape
    out = np.zeros((len(thresholds), h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            best_value, best_label = None, None
            for c in range(k):
                value, label = float(maps[c, y, x]), int(classes[c])
                if best_value is None or value > best_value or (value == best_value and label < best_label):
                    best_value, best_label = value, label
            for i, t in enumerate(thresholds):
                if not has_background:
                    out[i, y, x] = best_label
                elif best_value is not None and best_value > float(np.float32(t)):
                    out[i, y, x] = best_label
    return out


def _random_image(rng, num_classes: int, has_background: bool, size=(9, 12), num_maps=None):
    first = 1 if has_background else 0
    k = rng.integers(1, 4) if num_maps is None else num_maps
    classes = rng.choice(np.arange(first, num_classes), size=k, replace=False)
    # multiples of 0.01 land exactly on grid thresholds, so ties (bg wins) are exercised
    maps = (rng.integers(0, 101, size=(k,) + size) / 100).astype(np.float32)
    gt = rng.integers(0, num_classes, size=size).astype(np.uint8)
    gt[rng.random(size) < 0.15] = 255
    return maps, classes, gt


def _reference_matrices(images, num_classes, thresholds, has_background):
    out = np.zeros((len(thresholds), num_classes, num_classes), dtype=np.int64)
    for maps, classes, gt in images:
        labels = _pixel_rule(maps, classes, thresholds, has_background)
        for i in range(len(thresholds)):
            for y, x in zip(*np.nonzero(gt != 255)):
                out[i, gt[y, x], labels[i, y, x]] += 1
    return out


def _reference_miou(matrix: np.ndarray) -> float:
    ious = []
    for c in range(len(matrix)):
        union = matrix[c, :].sum() + matrix[:, c].sum() - matrix[c, c]
        if union:
            ious.append(matrix[c, c] / union)
    return sum(ious) / len(ious)


@pytest.mark.parametrize("has_background", [True, False])
def test_sweep_matches_slow_reference(has_background):
    rng = np.random.default_rng(2)
    thresholds = np.arange(100) / 100
    images = [_random_image(rng, 6, has_background) for _ in range(5)]
    if has_background:
        images.append(_random_image(rng, 6, True, num_maps=0))  # no class present: all background
    sweep = ThresholdSweep(6, thresholds, has_background=has_background)
    for maps, classes, gt in images:
        sweep.update(maps, classes, gt)
    ref = _reference_matrices(images, 6, thresholds, has_background)
    np.testing.assert_array_equal(sweep.matrices, ref)
    if has_background:
        assert not np.array_equal(ref[0], ref[50])  # the threshold matters on this data
    curve = sweep.curve()
    ref_miou = [_reference_miou(m) for m in ref]
    np.testing.assert_allclose(curve[:, 1], ref_miou)
    np.testing.assert_allclose(curve[:, 0], thresholds)
    best_t, best = sweep.best()
    assert best_t == thresholds[int(np.nanargmax(ref_miou))]
    assert best["miou"] == pytest.approx(max(ref_miou))
    assert best["threshold"] == best_t and best["num_images"] == len(images)


def test_sweep_float16_maps_and_a_coarse_grid():
    rng = np.random.default_rng(3)
    thresholds = threshold_grid(0.05, 0.95, 0.15)
    images = []
    for _ in range(3):
        maps, classes, gt = _random_image(rng, 5, True)
        images.append((rng.random(maps.shape).astype(np.float16).astype(np.float32), classes, gt))
    sweep = ThresholdSweep(5, thresholds)
    for image in images:
        sweep.update(*image)
    np.testing.assert_array_equal(sweep.matrices, _reference_matrices(images, 5, thresholds, True))


def test_sweep_merge_and_errors():
    rng = np.random.default_rng(4)
    images = [_random_image(rng, 4, True) for _ in range(4)]
    whole, a, b = ThresholdSweep(4), ThresholdSweep(4), ThresholdSweep(4)
    for i, image in enumerate(images):
        whole.update(*image)
        (a if i % 2 else b).update(*image)
    np.testing.assert_array_equal((a + b).matrices, whole.matrices)
    a.merge(b)
    np.testing.assert_array_equal(a.matrices, whole.matrices)
    assert a.num_images == 4
    np.testing.assert_array_equal(whole.confusion(30).matrix, whole.matrices[30])
    with pytest.raises(ValueError):
        a.merge(ThresholdSweep(4, thresholds=[0.1, 0.2]))
    with pytest.raises(ValueError, match="increasing"):
        ThresholdSweep(4, thresholds=[0.2, 0.1])
    maps, classes, gt = images[0]
    with pytest.raises(ValueError, match="size"):
        whole.update(maps[:, :-1], classes, gt)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        whole.update(bad, classes, gt)
    whole.reset()
    assert whole.matrices.sum() == 0


def _greedy_best(curve: np.ndarray) -> float:
    """A sweep that stops at the first decrease (what the exhaustive search must not do)."""
    for i in range(1, len(curve)):
        if curve[i, 1] < curve[i - 1, 1]:
            return float(curve[i - 1, 0])
    return float(curve[-1, 0])


def test_best_threshold_is_the_global_maximum_of_a_two_peak_curve():
    # One foreground class (label 1). Pixel peaks and their ground truth:
    #   bg at 0.15 (x100) turns correct at t >= 0.15  -> first peak
    #   fg at 0.25 (x60)  turns wrong   at t >= 0.25  -> dip
    #   bg at 0.55 (x300) turns correct at t >= 0.55  -> second, higher peak
    #   fg at 0.80 (x200) turns wrong   at t >= 0.80
    peaks = np.repeat([0.0, 0.15, 0.25, 0.55, 0.80, 1.0], [100, 100, 60, 300, 200, 100])
    gt = np.repeat([0, 0, 1, 0, 1, 1], [100, 100, 60, 300, 200, 100]).astype(np.uint8)
    sweep = ThresholdSweep(2)
    sweep.update(peaks[None, None, :].astype(np.float32), [1], gt[None, :])
    curve = sweep.curve()
    best_t, best = sweep.best()
    assert _greedy_best(curve) == pytest.approx(0.24)  # the first peak, 0.15..0.24
    assert best_t == pytest.approx(0.55)
    assert best["miou"] == pytest.approx(np.nanmax(curve[:, 1]))
    # at t=0.55: bg correct 500 of 500, fg 300 of 360 correct, 60 fg pixels predicted bg
    assert best["miou"] == pytest.approx((500 / 560 + 300 / 360) / 2)


def test_threshold_grid():
    grid = threshold_grid(0, 1, 0.01)
    assert len(grid) == 100 and grid[7] == 0.07 and grid[-1] == 0.99
    grid = threshold_grid(0.01, 0.80, 0.01)  # AReAM's --start 1 --stop 80
    assert len(grid) == 79 and grid[0] == 0.01 and grid[-1] == 0.79
    with pytest.raises(ValueError):
        threshold_grid(0.5, 0.1, 0.1)


# ----------------------------------------------------------------------------------- report


def test_format_table_and_json(tmp_path):
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    names = ["background", "cat", "dog", "bird"]
    metrics = cm.compute()
    metrics["threshold"] = 0.35
    metrics["curve"] = np.array([[0.3, 0.25], [0.35, 1 / 3]])
    table = format_table(metrics, names)
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line and line[0].isalpha()}
    assert lines["background"] == ["50.00", "100.00", "50.00"]
    assert lines["dog"] == ["0.00", "-", "0.00"]
    assert lines["bird"] == ["-", "-", "-"]
    assert "mIoU:           33.33" in table
    assert "pixel accuracy: 60.00" in table

    path = tmp_path / "sub" / "metrics.json"
    write_metrics_json(path, metrics, names, extra={"split": "val"})
    data = json.loads(path.read_text())
    assert data["miou"] == pytest.approx(1 / 3)
    assert data["iou"] == {"background": 0.5, "cat": 0.5, "dog": 0.0, "bird": None}
    assert data["precision"]["cat"] == 0.5 and data["precision"]["dog"] is None
    assert data["recall"]["background"] == 0.5
    assert data["pixel_accuracy"] == pytest.approx(0.6)
    assert data["threshold"] == 0.35 and data["num_images"] == 1 and data["split"] == "val"
    assert data["curve"] == [[0.3, 0.25], [0.35, pytest.approx(1 / 3)]]
    assert data["confusion_matrix"][0] == [1, 1, 0, 0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temporary left behind
