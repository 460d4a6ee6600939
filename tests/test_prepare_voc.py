"""VOC + SBD -> train_aug on a tiny fake VOCdevkit and SBD built here."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli import prepare as prepare_cli
from wsss.data.classes import ClassSet
from wsss.data.io import read_mask, write_mask
from wsss.data.prepare_voc import VOC_CLASSES, prepare_voc, read_sbd_mat, train_aug_ids
from wsss.errors import DataError

scipy_io = pytest.importorskip("scipy.io")

H, W = 5, 7
# VOC: train a1 a2, val v1. SBD: train a1 s1 v1, val s2. train_aug = {a1, a2, s1, s2}: v1 is VOC val.
VOC_TRAIN, VOC_VAL = ["a1", "a2"], ["v1"]
SBD_TRAIN, SBD_VAL = ["a1", "s1", "v1"], ["s2"]


def _voc_mask(value: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[1:3, 2:5] = value
    mask[0, :] = 255  # VOC's boundary band
    return mask


def _sbd_mask(values: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:, :3] = values[0]
    mask[:2, 4:] = values[1]
    return mask


VOC_MASKS = {"a1": _voc_mask(15), "a2": _voc_mask(7), "v1": _voc_mask(20)}
SBD_MASKS = {"a1": _sbd_mask((3, 3)), "s1": _sbd_mask((12, 1)), "v1": _sbd_mask((2, 2)), "s2": _sbd_mask((20, 0))}


def _save_mat(path: Path, seg: np.ndarray) -> None:
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8)
    scipy_io.savemat(path, {"GTcls": {"Segmentation": seg, "CategoriesPresent": present,
                                      "Boundaries": np.zeros((1, 1))}})


def _write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    for k, i in enumerate(sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))):
        Image.fromarray(np.full((H, W, 3), 10 * k, dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    for i, mask in VOC_MASKS.items():
        write_mask(voc / "SegmentationClass" / f"{i}.png", mask)
    _write_list(voc / "ImageSets" / "Segmentation" / "train.txt", VOC_TRAIN)
    _write_list(voc / "ImageSets" / "Segmentation" / "val.txt", VOC_VAL)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for i, mask in SBD_MASKS.items():
        _save_mat(sbd / "cls" / f"{i}.mat", mask)
    _write_list(sbd / "train.txt", SBD_TRAIN)
    _write_list(sbd / "val.txt", SBD_VAL)
    return tmp_path / "VOCdevkit", tmp_path / "benchmark_RELEASE"


def test_train_aug_ids_by_hand():
    assert train_aug_ids(SBD_TRAIN, SBD_VAL, VOC_TRAIN, VOC_VAL) == ["a1", "a2", "s1", "s2"]
    assert train_aug_ids(["x", "y"], ["y", "z"], ["w"], ["z", "q"]) == ["w", "x", "y"]


def test_read_sbd_mat_returns_the_stored_array(tmp_path: Path):
    seg = np.array([[0, 1, 2], [20, 15, 0]], dtype=np.uint8)
    _save_mat(tmp_path / "x.mat", seg)
    out = read_sbd_mat(tmp_path / "x.mat")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, seg)


def test_read_sbd_mat_rejects_bad_files(tmp_path: Path):
    scipy_io.savemat(tmp_path / "other.mat", {"GTinst": {"Segmentation": np.zeros((2, 2))}})
    with pytest.raises(DataError, match="GTcls.Segmentation"):
        read_sbd_mat(tmp_path / "other.mat")
    _save_mat(tmp_path / "big.mat", np.array([[0, 21]], dtype=np.uint8))
    with pytest.raises(DataError, match=r"\[21\]"):
        read_sbd_mat(tmp_path / "big.mat")
    with pytest.raises(DataError, match="not found"):
        read_sbd_mat(tmp_path / "missing.mat")


def test_prepare_voc_builds_the_dataset(sources, tmp_path: Path, caplog):
    voc, sbd = sources
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = prepare_voc(voc, sbd, out, strict=False)
    assert "train_aug has 4 ids, expected 10582" in caplog.text
    assert summary.split_sizes == {"train_aug": 4, "train": 2, "val": 1}
    assert (summary.num_from_voc, summary.num_from_sbd, summary.num_written) == (3, 2, 5)

    seg = out / "ImageSets" / "Segmentation"
    assert seg.joinpath("train_aug.txt").read_text().split() == ["a1", "a2", "s1", "s2"]
    assert seg.joinpath("train.txt").read_text().split() == VOC_TRAIN
    assert seg.joinpath("val.txt").read_text().split() == VOC_VAL
    # VOC's mask wins where VOC has one (a1, v1 are also in SBD); the others are SBD's array unchanged.
    for i in ("a1", "a2", "v1"):
        np.testing.assert_array_equal(read_mask(out / "SegmentationClass" / f"{i}.png"), VOC_MASKS[i])
    for i in ("s1", "s2"):
        np.testing.assert_array_equal(read_mask(out / "SegmentationClass" / f"{i}.png"), SBD_MASKS[i])
    with Image.open(out / "SegmentationClass" / "s1.png") as im:
        assert im.mode == "P"
    assert sorted(p.stem for p in (out / "SegmentationClass").iterdir()) == ["a1", "a2", "s1", "s2", "v1"]

    assert ClassSet.from_file(out / "classes.txt").names == VOC_CLASSES
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {"a1": [15], "a2": [7], "s1": [1, 12], "s2": [20], "v1": [20]}
    assert (out / "JPEGImages").is_symlink()
    assert (out / "JPEGImages" / "s2.jpg").resolve() == (voc / "VOC2012" / "JPEGImages" / "s2.jpg").resolve()


def test_prepare_voc_is_strict_by_default(sources, tmp_path: Path):
    voc, sbd = sources
    with pytest.raises(DataError, match="train_aug has 4 ids, expected 10582.*--no-strict"):
        prepare_voc(voc, sbd, tmp_path / "out")


def test_prepare_voc_resumes_and_overwrites(sources, tmp_path: Path):
    voc, sbd = sources
    out = tmp_path / "out"
    prepare_voc(voc, sbd, out, strict=False)
    # A mask already there is kept as is on a second run (the marker value proves it was not rewritten).
    marker = np.full((H, W), 4, dtype=np.uint8)
    write_mask(out / "SegmentationClass" / "s1.png", marker)
    again = prepare_voc(voc, sbd, out, strict=False)
    assert (again.num_written, again.num_skipped) == (0, 5)
    np.testing.assert_array_equal(read_mask(out / "SegmentationClass" / "s1.png"), marker)
    assert json.loads((out / "labels.json").read_text())["s1"] == [4]
    redo = prepare_voc(voc, sbd, out, strict=False, overwrite=True)
    assert redo.num_written == 5
    np.testing.assert_array_equal(read_mask(out / "SegmentationClass" / "s1.png"), SBD_MASKS["s1"])


def test_prepare_voc_copies_images_with_workers(sources, tmp_path: Path):
    voc, sbd = sources
    serial, pooled = tmp_path / "serial", tmp_path / "pooled"
    prepare_voc(voc, sbd, serial, strict=False)
    prepare_voc(voc, sbd, pooled, strict=False, workers=2, copy_images=True)
    assert not (pooled / "JPEGImages").is_symlink()
    assert sorted(p.name for p in (pooled / "JPEGImages").iterdir()) == [
        "a1.jpg", "a2.jpg", "s1.jpg", "s2.jpg", "v1.jpg"]
    for i in ("a1", "a2", "s1", "s2", "v1"):
        np.testing.assert_array_equal(read_mask(pooled / "SegmentationClass" / f"{i}.png"),
                                      read_mask(serial / "SegmentationClass" / f"{i}.png"))
    assert (pooled / "labels.json").read_text() == (serial / "labels.json").read_text()


def test_prepare_voc_reports_every_problem(sources, tmp_path: Path):
    voc, sbd = sources
    _save_mat(sbd / "dataset" / "cls" / "s1.mat", np.array([[0, 33]], dtype=np.uint8))
    (sbd / "dataset" / "cls" / "s2.mat").unlink()
    (voc / "VOC2012" / "JPEGImages" / "a2.jpg").unlink()
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, tmp_path / "out", strict=False)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "s1.mat" in message and "[33]" in message
    assert "s2: no mask" in message
    assert "a2: " in message and "no image file for id 'a2' (a2.jpg" in message
    assert not (tmp_path / "out" / "labels.json").exists()


def test_prepare_voc_rejects_wrong_folders(sources, tmp_path: Path):
    voc, sbd = sources
    with pytest.raises(DataError, match="not a VOC 2012 folder"):
        prepare_voc(sbd, sbd, tmp_path / "out")
    with pytest.raises(DataError, match="not an SBD folder"):
        prepare_voc(voc, voc, tmp_path / "out")
    with pytest.raises(DataError, match="must differ"):
        prepare_voc(voc, sbd, voc / "VOC2012")


def test_cli_prepare_voc(sources, tmp_path: Path, capsys):
    voc, sbd = sources
    parser = argparse.ArgumentParser()
    prepare_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare", "voc", "--voc", str(voc), "--sbd", str(sbd), "--out",
                              str(tmp_path / "out"), "--no-strict", "--workers", "0"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "train_aug 4, train 2, val 1" in text
    assert "3 from VOC, 2 from SBD" in text
    args = parser.parse_args(["prepare", "voc", "--voc", str(voc), "--sbd", str(sbd), "--out",
                              str(tmp_path / "strict"), "--workers", "0"])
    with pytest.raises(DataError, match="expected 10582"):
        args.func(args)


def test_dataset_presets_agree_with_the_converters():
    from importlib import resources

    import yaml

    from wsss.data.prepare_voc import VOC_CLASSES

    folder = resources.files("wsss") / "configs" / "datasets"
    voc = yaml.safe_load((folder / "voc.yaml").read_text())["dataset"]
    coco = yaml.safe_load((folder / "coco.yaml").read_text())["dataset"]
    assert tuple(voc["classes"]) == VOC_CLASSES and voc["num_classes"] == 21 == len(VOC_CLASSES)
    assert coco["num_classes"] == 81
    if "classes" in coco:
        assert len(coco["classes"]) == 81 and coco["classes"][0] == "background"
