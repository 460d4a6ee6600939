"""``evaluate_split`` and ``wsss eval`` end to end on tiny on-disk datasets."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.cli import eval as eval_cli
from wsss.cli.main import main
from wsss.data.io import save_maps, write_mask
from wsss.errors import ConfigError, DataError
from wsss.evaluate import ConfusionMatrix, ThresholdSweep, evaluate_split, read_split_ids
from wsss.pseudo.labels import maps_to_labels

# Two 2x4 images, classes background/cat/dog. Non-ignored (gt, pred) counts give the matrix
#   rows = gt: [[6, 1, 0], [0, 3, 1], [1, 0, 3]]
# so IoU = 6/(7+7-6) = 0.75, 3/(4+4-3) = 0.6, 3/(4+4-3) = 0.6; mIoU 0.65; pixel accuracy 12/15.
GTS = {
    "img_a": np.array([[0, 0, 1, 1], [0, 255, 1, 1]], dtype=np.uint8),
    "img_b": np.array([[2, 2, 0, 0], [2, 2, 0, 0]], dtype=np.uint8),
}
PREDS = {
    "img_a": np.array([[0, 1, 1, 1], [0, 0, 1, 2]], dtype=np.uint8),
    "img_b": np.array([[2, 2, 0, 0], [2, 0, 0, 0]], dtype=np.uint8),
}
NAMES = ["background", "cat", "dog"]


def _dataset(root: Path, gts: dict[str, np.ndarray], names: list[str], split: str = "val") -> Path:
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(gts) + "\n")
    for image_id, gt in gts.items():
        write_mask(root / "SegmentationClass" / f"{image_id}.png", gt)
    return root


def _label_preds(folder: Path, preds: dict[str, np.ndarray]) -> Path:
    for image_id, pred in preds.items():
        write_mask(folder / f"{image_id}.png", pred)
    return folder


def _labels(maps: np.ndarray, classes: np.ndarray, threshold: float | None) -> np.ndarray:
    return maps_to_labels(torch.from_numpy(maps), classes, threshold).numpy()


def test_eval_scores_pseudo_labels_over_their_labelled_pixels(tmp_path):
    """255 in a prediction is "no label": the metrics cover the labelled pixels and the coverage says how many."""
    from wsss.cli.main import main

    data = _dataset(tmp_path / "data", GTS, NAMES)
    preds = {k: v.copy() for k, v in PREDS.items()}
    preds["img_a"][0, :2] = 255  # one right (0 -> 0) and one wrong (0 -> 1) pixel left unlabelled
    folder = _label_preds(tmp_path / "pseudo", preds)
    assert main(["eval", "--data", str(data), "--split", "val", "--pred", str(folder), "--out", str(tmp_path / "m")]) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    # rows = gt: [[5, 0, 0], [0, 3, 1], [1, 0, 3]] -> IoU 5/6, 3/4, 3/5; 13 of 15 labelled gt pixels labelled.
    assert metrics["coverage"] == pytest.approx(13 / 15)
    assert metrics["miou"] == pytest.approx((5 / 6 + 3 / 4 + 3 / 5) / 3)
    assert main(["eval", "--data", str(data), "--split", "val", "--pred", str(folder), "--limit", "1",
                 "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["num_images"] == 1


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wsss")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


@pytest.mark.parametrize("workers", [0, 2])
def test_label_pngs_hand_computed(tmp_path, workers):
    root = _dataset(tmp_path / "data", GTS, NAMES)
    pred = _label_preds(tmp_path / "pred", PREDS)
    m = evaluate_split(root, "val", pred, num_workers=workers, progress=False)
    np.testing.assert_array_equal(m["confusion_matrix"], [[6, 1, 0], [0, 3, 1], [1, 0, 3]])
    np.testing.assert_allclose(m["iou"], [0.75, 0.6, 0.6])
    assert m["miou"] == pytest.approx(0.65)
    assert m["pixel_accuracy"] == pytest.approx(12 / 15)
    assert m["num_images"] == 2 and m["threshold"] is None
    assert m["class_names"] == NAMES


def test_cli_end_to_end_via_parser(tmp_path, capsys):
    root = _dataset(tmp_path / "data", GTS, NAMES)
    pred = _label_preds(tmp_path / "pred", PREDS)
    args = _parse(["--data", str(root), "--split", "val", "--pred", str(pred)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "mIoU:           65.00" in out
    assert any(line.split()[:2] == ["cat", "60.00"] for line in out.splitlines())
    data = json.loads((pred / "metrics.json").read_text())  # default OUT is the prediction folder
    assert data["miou"] == pytest.approx(0.65)
    assert data["iou"] == pytest.approx({"background": 0.75, "cat": 0.6, "dog": 0.6})
    assert data["pixel_accuracy"] == pytest.approx(0.8)
    assert data["precision"]["cat"] == pytest.approx(3 / 4)
    assert data["recall"]["background"] == pytest.approx(6 / 7)
    assert data["num_images"] == 2 and data["split"] == "val"
    assert "threshold" not in data and "curve" not in data


def test_limit_scores_the_first_images_of_the_split(tmp_path):
    root = _dataset(tmp_path / "data", GTS, NAMES)
    pred = _label_preds(tmp_path / "pred", {"img_a": PREDS["img_a"]})  # img_b has no prediction
    assert main(["eval", "--data", str(root), "--split", "val", "--pred", str(pred), "--limit", "1"]) == 0
    data = json.loads((pred / "metrics.json").read_text())
    assert data["num_images"] == 1 and data["limit"] == 1
    expected = ConfusionMatrix(3)
    expected.update(PREDS["img_a"], GTS["img_a"])
    assert data["miou"] == pytest.approx(expected.compute()["miou"])
    assert main(["eval", "--data", str(root), "--split", "val", "--pred", str(pred)]) == 2  # img_b is missing
    with pytest.raises(SystemExit) as info:
        main(["eval", "--data", str(root), "--split", "val", "--pred", str(pred), "--limit", "0"])
    assert info.value.code == 64


def test_cli_random_dataset_matches_a_confusion_matrix_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    gts, preds = {}, {}
    for i in range(4):
        gt = rng.integers(0, 4, size=(15, 20)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = 255
        gts[f"{i:03d}"] = gt
        preds[f"{i:03d}"] = np.where(rng.random(gt.shape) < 0.7, np.minimum(gt, 3), rng.integers(0, 4, gt.shape))
    names = ["background", "a", "b", "c"]
    root = _dataset(tmp_path / "data", gts, names)
    pred = _label_preds(tmp_path / "pred", {k: v.astype(np.uint8) for k, v in preds.items()})
    out = tmp_path / "report"
    ns = argparse.Namespace(
        data=root,
        split="val",
        pred=pred,
        out=out,
        threshold=None,
        sweep=False,
        thresholds=None,
        workers=0,
        limit=None,
        absent_as_zero=False,
    )
    assert eval_cli.run(ns) == 0
    matrix = np.zeros((4, 4), dtype=np.int64)
    for key in gts:
        for g, p in zip(gts[key].ravel(), preds[key].ravel()):
            if g != 255:
                matrix[g, p] += 1
    ious = [matrix[c, c] / (matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]) for c in range(4)]
    data = json.loads((out / "metrics.json").read_text())
    assert data["miou"] == pytest.approx(np.mean(ious))
    assert data["confusion_matrix"] == matrix.tolist()


def _maps_dataset(tmp_path: Path, has_background: bool):
    rng = np.random.default_rng(5)
    names = (["background"] if has_background else []) + ["a", "b", "c", "d"]
    first = 1 if has_background else 0
    gts, maps = {}, {}
    for i in range(3):
        gt = rng.integers(0, len(names), size=(10, 14)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = 255
        classes = rng.choice(np.arange(first, len(names)), size=2, replace=False)
        gts[f"m{i}"] = gt
        maps[f"m{i}"] = (rng.random((2, 10, 14)), classes)
    root = _dataset(tmp_path / "data", gts, names)
    pred = tmp_path / "maps"
    for key, (m, classes) in maps.items():
        save_maps(pred / f"{key}.npz", m, classes)
    # what load_maps gives back: float16 on disk, float32 in memory
    loaded = {k: (m.astype(np.float16).astype(np.float32), c) for k, (m, c) in maps.items()}
    return root, pred, gts, loaded, len(names)


def test_maps_with_a_threshold_and_a_sweep(tmp_path, capsys):
    root, pred, gts, maps, num_classes = _maps_dataset(tmp_path, has_background=True)
    ref = ConfusionMatrix(num_classes)
    for key, gt in gts.items():
        ref.update(_labels(*maps[key], 0.4), gt)
    m = evaluate_split(root, "val", pred, threshold=0.4, progress=False)
    np.testing.assert_array_equal(m["confusion_matrix"], ref.matrix)
    assert m["threshold"] == 0.4

    sweep = ThresholdSweep(num_classes, np.round(np.arange(0.1, 0.9, 0.1), 10))
    for key, gt in gts.items():
        sweep.update(*maps[key], gt)
    best_t, best = sweep.best()
    argv = ["--data", str(root), "--split", "val", "--pred", str(pred), "--out", str(tmp_path / "o")]
    args = _parse(argv + ["--sweep", "--thresholds", "0.1", "0.9", "0.1"])
    assert args.func(args) == 0
    assert f"best threshold {best_t:.2f}" in capsys.readouterr().out
    data = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert data["threshold"] == pytest.approx(best_t)
    assert data["miou"] == pytest.approx(best["miou"])
    assert [t for t, _ in data["curve"]] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert [v for _, v in data["curve"]] == pytest.approx(sweep.curve()[:, 1].tolist())


def test_maps_without_background_need_no_threshold(tmp_path):
    root, pred, gts, maps, num_classes = _maps_dataset(tmp_path, has_background=False)
    ref = ConfusionMatrix(num_classes)
    for key, gt in gts.items():
        ref.update(_labels(*maps[key], None), gt)
    m = evaluate_split(root, "val", pred, progress=False)
    np.testing.assert_array_equal(m["confusion_matrix"], ref.matrix)
    with pytest.raises(ConfigError, match="no background"):
        evaluate_split(root, "val", pred, threshold=0.3, progress=False)


def test_errors_name_the_file(tmp_path):
    root = _dataset(tmp_path / "data", GTS, NAMES)
    pred = _label_preds(tmp_path / "pred", {"img_a": PREDS["img_a"]})
    with pytest.raises(DataError, match="img_b") as info:
        evaluate_split(root, "val", pred, progress=False)
    assert info.value.path == pred / "img_b.png"
    with pytest.raises(DataError, match="img_b"):  # nothing is substituted on the thread pool either
        evaluate_split(root, "val", pred, num_workers=2, progress=False)

    write_mask(pred / "img_b.png", np.zeros((3, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="3x4 but the ground truth") as info:
        evaluate_split(root, "val", pred, progress=False)
    assert info.value.path == pred / "img_b.png"

    bad = PREDS["img_b"].copy()
    bad[0, 0] = 7  # not a class of the dataset, at a labelled pixel
    write_mask(pred / "img_b.png", bad)
    with pytest.raises(DataError, match="outside") as info:
        evaluate_split(root, "val", pred, progress=False)
    assert info.value.path == pred / "img_b.png"

    shutil.rmtree(pred)
    pred.mkdir()
    save_maps(pred / "img_a.npz", np.zeros((1, 2, 4)), [1])
    with pytest.raises(DataError, match="need a threshold"):
        evaluate_split(root, "val", pred, progress=False)
    with pytest.raises(DataError, match="img_b"):
        evaluate_split(root, "val", pred, threshold=0.5, progress=False)
    with pytest.raises(DataError, match="test.txt"):
        evaluate_split(root, "test", pred, progress=False)
    with pytest.raises(ConfigError):
        evaluate_split(root, "val", pred, threshold=0.5, sweep=True, progress=False)


def test_cli_argument_errors(tmp_path):
    root = _dataset(tmp_path / "data", GTS, NAMES)
    with pytest.raises(SystemExit):  # --threshold and --sweep are exclusive
        _parse(["--data", str(root), "--split", "val", "--pred", ".", "--threshold", "0.3", "--sweep"])
    args = _parse(["--data", str(root), "--split", "val", "--pred", ".", "--thresholds", "0", "1", "0.1"])
    with pytest.raises(ConfigError, match="--sweep"):
        args.func(args)
    args = _parse(["--data", str(root), "--split", "val", "--pred", ".", "--sweep", "--thresholds", "1", "0", "1"])
    with pytest.raises(ConfigError, match="--thresholds"):
        args.func(args)


def test_read_split_ids(tmp_path):
    root = _dataset(tmp_path / "data", GTS, NAMES)
    assert read_split_ids(root, "val") == ["img_a", "img_b"]
    # SegmentationClassAug-style lines name the image path; the id is its stem
    (root / "ImageSets" / "Segmentation" / "aug.txt").write_text("/JPEGImages/img_b.jpg /SegClsAug/img_b.png\n")
    assert read_split_ids(root, "aug") == ["img_b"]


def test_real_voc_mini_ground_truth_scores_one(shared_data, tmp_path):
    root = shared_data / "voc_mini"
    split = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))[0]
    pred = tmp_path / "pred"
    pred.mkdir()
    for image_id in read_split_ids(root, split):
        shutil.copy(root / "SegmentationClass" / f"{image_id}.png", pred / f"{image_id}.png")
    m = evaluate_split(root, split, pred, num_workers=2, progress=False)
    present = ~np.isnan(m["iou"])
    assert present.sum() >= 2 and np.all(m["iou"][present] == 1.0)
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0
