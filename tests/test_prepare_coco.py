"""COCO instances -> VOC-style masks on a tiny hand-made annotation file, checked pixel by pixel."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli import prepare as prepare_cli
from wsss.data.classes import ClassSet
from wsss.data.io import read_mask
from wsss.data.prepare_coco import category_map, decode_segmentation, paint_mask, prepare_coco
from wsss.errors import DataError

mask_api = pytest.importorskip("pycocotools.mask")

H, W = 8, 10
# Category ids are out of order and with gaps: labels follow the sorted ids, person=1, car=2, dog=3.
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
PERSON, CAR, DOG = 1, 2, 3
T1, T2, V1 = "COCO_train2014_000000000001", "COCO_train2014_000000000002", "COCO_val2014_000000000003"


def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """A rectangle polygon; pycocotools fills rows y0..y1-1 and columns x0..x1-1 (checked below)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(region: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros, as COCO stores crowds (written independently)."""
    flat = region.flatten(order="F").astype(int).tolist()
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [region.shape[0], region.shape[1]], "counts": counts}


CROWD = np.zeros((H, W), dtype=bool)
CROWD[0:6, 0:6] = True  # 36 pixels


def _ann(ann_id: int, image_id: int, cat: int, seg, crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg, "iscrowd": crowd,
            "area": 0.0, "bbox": [0, 0, 1, 1]}


TRAIN = {
    "images": [{"id": 1, "file_name": f"{T1}.jpg", "height": H, "width": W},
               {"id": 2, "file_name": f"{T2}.jpg", "height": H, "width": W}],
    # Image 1: a large car (7x6 = 42 px) listed first and a small dog (4x3 = 12 px) overlapping it.
    "annotations": [_ann(10, 1, 3, _box(0, 0, 7, 6)), _ann(11, 1, 18, _box(5, 3, 9, 6))],
    "categories": CATEGORIES,
}
VAL = {
    "images": [{"id": 3, "file_name": f"{V1}.jpg", "height": H, "width": W}],
    # Image 3: a crowd of people (36 px) with a small person inside it (4 px), a car (40 px) larger than the
    # crowd and partly under it, and a small dog away from both.
    "annotations": [
        _ann(20, 3, 1, _uncompressed_rle(CROWD), crowd=1),
        _ann(21, 3, 1, _box(1, 1, 3, 3)),
        _ann(22, 3, 3, _box(0, 4, 10, 8)),
        _ann(23, 3, 18, _box(8, 0, 10, 2)),
    ],
    "categories": list(reversed(CATEGORIES)),
}


def _expected_t1() -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[0:6, 0:7] = CAR
    m[3:6, 5:9] = DOG  # the smaller dog stays on top of the car
    return m


def _expected_v1() -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[4:8, 0:10] = CAR  # largest: painted first
    m[0:6, 0:6] = 255  # the crowd covers the car where they overlap
    m[1:3, 1:3] = PERSON  # smaller than the crowd: stays a person
    m[0:2, 8:10] = DOG
    return m


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(TRAIN))
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(VAL))
    for split, data in (("train", TRAIN), ("val", VAL)):
        (root / f"{split}2014").mkdir()
        for im in data["images"]:
            Image.new("RGB", (W, H), (im["id"], 0, 0)).save(root / f"{split}2014" / im["file_name"])
    return root


def test_polygon_and_rle_decoding_by_hand():
    box = decode_segmentation(_box(1, 2, 5, 6), H, W)
    expected = np.zeros((H, W), dtype=bool)
    expected[2:6, 1:5] = True
    np.testing.assert_array_equal(box, expected)
    np.testing.assert_array_equal(decode_segmentation(_uncompressed_rle(CROWD), H, W), CROWD)
    compressed = mask_api.encode(np.asfortranarray(CROWD.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()  # as stored in JSON
    np.testing.assert_array_equal(decode_segmentation(compressed, H, W), CROWD)
    # A degenerate 2-point polygon has no area (pycocotools alone would read it as a box).
    assert not decode_segmentation([[1, 1, 4, 4]], H, W).any()
    with pytest.raises(ValueError, match="differs"):
        decode_segmentation(_uncompressed_rle(CROWD), H + 1, W)


def test_paint_mask_order_does_not_depend_on_listing_order():
    anns = [(1, CAR, _box(0, 0, 7, 6)), (2, DOG, _box(5, 3, 9, 6))]
    np.testing.assert_array_equal(paint_mask(H, W, anns), _expected_t1())
    np.testing.assert_array_equal(paint_mask(H, W, anns[::-1]), _expected_t1())
    # Equal areas: the higher annotation id is painted last.
    same = [(7, DOG, _box(0, 0, 2, 2)), (5, CAR, _box(1, 1, 3, 3))]
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[1:3, 1:3] = CAR
    expected[0:2, 0:2] = DOG
    np.testing.assert_array_equal(paint_mask(H, W, same), expected)


def test_category_map_is_sorted_by_coco_id():
    assert category_map(CATEGORIES) == {1: {"coco_id": 1, "name": "person"}, 2: {"coco_id": 3, "name": "car"},
                                        3: {"coco_id": 18, "name": "dog"}}
    with pytest.raises(DataError, match="duplicate"):
        category_map(CATEGORIES + [{"id": 3, "name": "truck"}])


def test_prepare_coco_builds_the_dataset(coco_root: Path):
    summary = prepare_coco(coco_root, 2014, strict=False)
    out = coco_root / "voc_layout"
    assert summary.out == out
    assert summary.split_sizes == {"train": 2, "val": 1}
    assert summary.labelled_sizes == {"train": 1, "val": 1}
    assert summary.unlabelled == {"train": [T2], "val": []}
    np.testing.assert_array_equal(read_mask(out / "SegmentationClass" / f"{T1}.png", 4), _expected_t1())
    np.testing.assert_array_equal(read_mask(out / "SegmentationClass" / f"{T2}.png", 4), np.zeros((H, W)))
    np.testing.assert_array_equal(read_mask(out / "SegmentationClass" / f"{V1}.png", 4), _expected_v1())

    assert ClassSet.from_file(out / "classes.txt").names == ("background", "person", "car", "dog")
    assert json.loads((out / "category_map.json").read_text()) == {
        "1": {"coco_id": 1, "name": "person"}, "2": {"coco_id": 3, "name": "car"},
        "3": {"coco_id": 18, "name": "dog"}}
    # Image-level labels come from every annotation, the crowd included; T2 has none, hence no entry.
    assert json.loads((out / "labels.json").read_text()) == {T1: [CAR, DOG], V1: [PERSON, CAR, DOG]}
    lists = out / "ImageSets" / "Segmentation"
    assert lists.joinpath("train.txt").read_text().split() == [T1]
    assert lists.joinpath("train_full.txt").read_text().split() == [T1, T2]
    assert lists.joinpath("val.txt").read_text().split() == [V1]
    link = out / "JPEGImages" / f"{V1}.jpg"
    assert link.is_symlink() and link.resolve() == (coco_root / "val2014" / f"{V1}.jpg").resolve()


def test_prepare_coco_resumes_and_matches_with_workers(coco_root: Path, tmp_path: Path):
    first = prepare_coco(coco_root, 2014, tmp_path / "serial", strict=False)
    assert (first.num_written, first.num_skipped) == (3, 0)
    again = prepare_coco(coco_root, 2014, tmp_path / "serial", strict=False)
    assert (again.num_written, again.num_skipped) == (0, 3)
    pooled = prepare_coco(coco_root, 2014, tmp_path / "pooled", strict=False, workers=2, copy_images=True)
    assert pooled.num_written == 3
    for stem in (T1, T2, V1):
        np.testing.assert_array_equal(read_mask(tmp_path / "pooled" / "SegmentationClass" / f"{stem}.png"),
                                      read_mask(tmp_path / "serial" / "SegmentationClass" / f"{stem}.png"))
        assert not (tmp_path / "pooled" / "JPEGImages" / f"{stem}.jpg").is_symlink()


def test_prepare_coco_checks_counts_and_categories(coco_root: Path):
    with pytest.raises(DataError, match="instances_train2014.json: train has 2 ids, expected 82783"):
        prepare_coco(coco_root, 2014)
    bad = dict(TRAIN, annotations=TRAIN["annotations"] + [_ann(12, 2, 44, _box(0, 0, 2, 2))])
    (coco_root / "annotations" / "instances_train2014.json").write_text(json.dumps(bad))
    (coco_root / "train2014" / f"{T1}.jpg").unlink()
    with pytest.raises(DataError) as info:
        prepare_coco(coco_root, 2014, strict=False)
    assert "2 problem(s)" in str(info.value)
    assert "unknown category ids [44]" in str(info.value)
    assert f"{T1}.jpg not found" in str(info.value)


def test_prepare_coco_rejects_differing_categories(coco_root: Path):
    other = dict(VAL, categories=CATEGORIES[:2])
    (coco_root / "annotations" / "instances_val2014.json").write_text(json.dumps(other))
    with pytest.raises(DataError, match="categories differ"):
        prepare_coco(coco_root, 2014, strict=False)


def test_cli_prepare_coco(coco_root: Path, tmp_path: Path, capsys):
    parser = argparse.ArgumentParser()
    prepare_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare", "coco", "--coco", str(coco_root), "--out", str(tmp_path / "o"),
                              "--splits", "val", "--no-strict", "--workers", "0"])
    assert args.func(args) == 0
    assert "val: 1 images (val_full.txt), 1 with annotations" in capsys.readouterr().out
    assert (tmp_path / "o" / "SegmentationClass" / f"{V1}.png").is_file()
    assert not (tmp_path / "o" / "SegmentationClass" / f"{T1}.png").exists()
    # Adding the other split later keeps the first split's image labels.
    args = parser.parse_args(["prepare", "coco", "--coco", str(coco_root), "--out", str(tmp_path / "o"),
                              "--splits", "train", "--no-strict", "--workers", "0"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "o" / "labels.json").read_text()) == {T1: [CAR, DOG], V1: [PERSON, CAR, DOG]}
