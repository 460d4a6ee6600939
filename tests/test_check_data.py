"""check-data: clean real datasets pass; a tiny dataset with one of each problem reports them all."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli import check_data as check_cli
from wsss.data.check import check_dataset
from wsss.data.io import write_mask

H, W = 4, 6


def _image(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 30, 10)).save(path)


def _mask(value_rows: list[int], w: int = W) -> np.ndarray:
    """A mask whose row r is filled with value_rows[r]."""
    return np.repeat(np.array(value_rows, dtype=np.uint8)[:, None], w, axis=1)


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """Classes bg/cat/dog; ids: good (clean), noimg, nomask, badimg, badlabel, size, empty; good listed twice."""
    root = tmp_path / "ds"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    ids = ["good", "noimg", "nomask", "badimg", "badlabel", "size", "empty", "good"]
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    for i in ("good", "nomask", "badlabel", "size", "empty"):
        _image(root / "JPEGImages" / f"{i}.jpg")
    (root / "JPEGImages" / "badimg.jpg").write_bytes(b"not a jpeg at all")
    masks = {
        "good": _mask([0, 1, 1, 255]),  # 6 bg, 12 cat, 6 ignore
        "noimg": _mask([2, 2, 2, 2]),
        "badimg": _mask([0, 2, 2, 2]),
        "badlabel": _mask([0, 7, 1, 1]),
        "size": _mask([0, 2, 2], w=5),  # 3x5 against a 4x6 image
        "empty": _mask([0, 0, 255, 255]),
    }
    for i, m in masks.items():
        write_mask(root / "SegmentationClass" / f"{i}.png", m)
    return root


def _kinds(report) -> list[tuple[str, str]]:
    """(file name, problem keyword) pairs, for comparing with a hand-written list."""
    keywords = ("listed 2 times", "no image file for id", "mask file not found", "cannot decode image",
                "outside the 3 classes", "differs from the image", "no foreground class")
    out = []
    for path, problem in report.problems:
        hits = [k for k in keywords if k in problem]
        assert len(hits) == 1, problem
        out.append((Path(path).name, hits[0]))
    return sorted(out)


def test_every_problem_is_reported(broken: Path):
    report = check_dataset(broken, "train")
    assert not report.ok
    assert _kinds(report) == sorted([
        ("train.txt", "listed 2 times"),
        ("JPEGImages", "no image file for id"),
        ("nomask.png", "mask file not found"),
        ("badimg.jpg", "cannot decode image"),
        ("badlabel.png", "outside the 3 classes"),
        ("size.png", "differs from the image"),
        ("empty.png", "no foreground class"),
    ])
    assert report.num_images == 7
    # Statistics over the readable masks good, noimg, badimg, size, empty (by hand, rows x width):
    # bg: 6 + 0 + 6 + 5 + 12 = 29; cat: 12; dog: 24 + 18 + 10 = 52; ignore: 6 + 12 = 18.
    np.testing.assert_array_equal(report.pixels_per_class, [29, 12, 52])
    assert report.ignore_pixels == 18
    np.testing.assert_array_equal(report.images_per_class, [4, 1, 3])
    np.testing.assert_allclose(report.pixel_fraction, np.array([29, 12, 52]) / 93)
    assert report.label_set_sizes == {0: 1, 1: 4}


def test_workers_give_the_same_report(broken: Path):
    serial, pooled = check_dataset(broken, "train"), check_dataset(broken, "train", num_workers=2)
    assert pooled.problems == serial.problems
    np.testing.assert_array_equal(pooled.pixels_per_class, serial.pixels_per_class)
    np.testing.assert_array_equal(pooled.images_per_class, serial.images_per_class)


def test_missing_class_list_and_split(tmp_path: Path):
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    report = check_dataset(tmp_path, "val")
    assert [(Path(p).name, msg) for p, msg in report.problems] == [
        ("classes.txt", "class list not found"), ("val.txt", "split list not found")]
    assert check_dataset(tmp_path / "nowhere", "val").problems[0][1] == "dataset folder not found"


def test_labels_only_dataset_checks_labels_json(tmp_path: Path):
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nc\nd\ne\nf\ng\n")
    for i in "abcdefg":
        _image(tmp_path / "JPEGImages" / f"{i}.jpg")
    entries = {"a": [1, "Dog"], "b": [], "c": [0, 5], "e": [0, "dog"], "f": ["background"], "g": ["cow"],
               "x": [1]}
    (tmp_path / "labels.json").write_text(json.dumps(entries))
    report = check_dataset(tmp_path, "train")
    assert not report.has_masks
    labels = str(tmp_path / "labels.json")
    assert {path for path, _ in report.problems} == {labels}
    assert sorted(msg.split(";")[0] for _, msg in report.problems) == [
        "image 'b': empty label set",
        "image 'f': empty label set",  # background only
        "key 'c': label index 5 is outside the classes 0..2",
        "key 'g': unknown class 'cow'",
        "no entry for image 'd' of split 'train'",
        f"no image file for id 'x' (x.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp, any letter case) in "
        f"{tmp_path / 'JPEGImages'}",  # an entry with no image
    ]
    np.testing.assert_array_equal(report.images_per_class, [0, 1, 2])
    assert report.label_set_sizes == {0: 2, 1: 1, 2: 1}
    assert "image labels only" in report.format()


def test_cli_exit_codes_and_output(broken: Path, capsys):
    parser = argparse.ArgumentParser()
    check_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["check-data", "--data", str(broken), "--split", "train", "--max-problems", "3"])
    assert args.func(args) == 1
    text = capsys.readouterr().out
    assert "7 problem(s)" in text and "problems (first 3 of 7)" in text and "... and 4 more" in text
    assert "cat" in text and "label" in text  # the class table


def test_shared_horses_are_clean(shared_data: Path, capsys):
    report = check_dataset(shared_data / "horses", "all")
    assert report.problems == []
    assert report.num_images == 328
    np.testing.assert_array_equal(report.images_per_class, [328, 328])
    assert report.label_set_sizes == {1: 328}
    parser = argparse.ArgumentParser()
    check_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["check-data", "--data", str(shared_data / "camvid"), "--split", "val"])
    assert args.func(args) == 0
    assert "101 images, 11 classes, masks, 0 problem(s)" in capsys.readouterr().out
