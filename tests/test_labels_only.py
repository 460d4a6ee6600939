"""LabelledImageFolder: images + a CSV or JSON of image-level labels, no masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data.classes import ClassSet
from wsss.data.labels_only import LabelledImageFolder
from wsss.errors import DataError

CLASSES = "background\ncat\ndog\ntraffic light\n"


def _png(path: Path, seed: int, h: int = 3, w: int = 4) -> np.ndarray:
    """Write a random RGB PNG (lossless, so pixel values can be compared) and return its array."""
    array = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    images = {"a": _png(tmp_path / "images" / "a.png", 0), "b": _png(tmp_path / "images" / "b.png", 1, 5, 2),
              "sub/c": _png(tmp_path / "images" / "sub" / "c.png", 2)}
    (tmp_path / "classes.txt").write_text(CLASSES)
    return tmp_path, images


def test_csv_names_indices_and_separators(folder):
    root, images = folder
    (root / "labels.csv").write_text('image,labels\na.png,cat;dog\nb,2 0\n\nsub/c.png,"traffic light;Cat"\n')
    ds = LabelledImageFolder(root)
    assert len(ds) == 3 and ds.ids == ["a", "b", "sub/c"]
    assert ds.labels == [(1, 2), (2,), (1, 3)]
    expected_labels = {"a": [1.0, 1.0, 0.0], "b": [0.0, 1.0, 0.0], "sub/c": [1.0, 0.0, 1.0]}
    for i in range(3):
        sample = ds[i]
        array = images[sample["id"]]
        expected = torch.tensor(array, dtype=torch.float32).permute(2, 0, 1) / 255.0
        torch.testing.assert_close(sample["image"], expected)
        assert sample["mask"].dtype == torch.long
        assert torch.equal(sample["mask"], torch.full(array.shape[:2], 255, dtype=torch.long))
        assert sample["label"].dtype == torch.float32
        assert sample["label"].tolist() == expected_labels[sample["id"]]


def test_json_labels_and_comma_separated_csv(folder, tmp_path: Path):
    root, _ = folder
    (root / "labels.json").write_text(json.dumps({"a.png": ["dog", 1], "sub/c": [3]}))
    ds = LabelledImageFolder(root / "images", root / "labels.json", classes=root / "classes.txt")
    assert ds.ids == ["a", "sub/c"] and ds.labels == [(1, 2), (3,)]
    (root / "other.csv").write_text('image,labels\nb.png,"cat,dog"\na.png,1 2\n')
    ds = LabelledImageFolder(root, root / "other.csv")
    assert ds.labels == [(1, 2), (1, 2)]


def test_classes_without_background(folder):
    root, _ = folder
    (root / "labels.csv").write_text("image,labels\na.png,0\nb.png,dog cat\n")
    ds = LabelledImageFolder(root, classes=["cat", "dog"])
    assert ds.labels == [(0,), (0, 1)]
    assert ds[0]["label"].tolist() == [1.0, 0.0] and ds[1]["label"].tolist() == [1.0, 1.0]


def test_transform_is_applied(folder):
    root, images = folder
    (root / "labels.csv").write_text("image,labels\na.png,cat\n")
    seen = []

    def crop_flip(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((tuple(image.shape), tuple(mask.shape)))
        return image[:, :, :2].flip(-1), mask[:, :2]

    sample = LabelledImageFolder(root, transform=crop_flip)[0]
    assert seen == [((3, 3, 4), (3, 4))]
    expected = torch.tensor(images["a"][:, :2][:, ::-1].copy(), dtype=torch.float32).permute(2, 0, 1) / 255
    torch.testing.assert_close(sample["image"], expected)
    assert sample["mask"].shape == (3, 2)


def test_every_bad_row_is_named(folder):
    root, _ = folder
    (root / "labels.csv").write_text(
        "image,labels\na.png,cat\nmissing.png,dog\nb.png,kitten\nsub/c.png,\na,dog\nb,background\nb,7\n"
        "d,background\n")
    _png(root / "images" / "d.png", 3)
    with pytest.raises(DataError) as info:
        LabelledImageFolder(root)
    message = str(info.value)
    assert str(root / "labels.csv") in message
    assert "7 problem(s)" in message
    assert "no image file for id 'missing' (missing.jpg, .jpeg" in message and str(root / "images") in message
    assert "row 4 (b.png): unknown class 'kitten'" in message
    assert "image 'sub/c': empty label set" in message
    assert "row 6 (a): image 'a' is already listed in row 2 (a.png)" in message
    assert "row 7 (b): image 'b' is already listed in row 4 (b.png)" in message
    assert "row 8 (b): image 'b' is already listed in row 4 (b.png)" in message
    assert "image 'd': empty label set" in message  # background only


def test_bad_labels_and_files(folder):
    root, _ = folder
    classes = ClassSet.from_file(root / "classes.txt")
    assert classes.parse_label("background") == 0 and classes.parse_label(0) == 0
    with pytest.raises(ValueError, match="index 4 is outside"):
        classes.parse_label("4")
    with pytest.raises(ValueError, match="unknown class 'cats'"):
        classes.parse_label("cats")
    assert classes.parse_label("DOG") == 2 and classes.parse_label(3) == 3
    (root / "labels.json").write_text(json.dumps({"a.png": []}))
    with pytest.raises(DataError, match=r"image 'a': empty label set"):
        LabelledImageFolder(root)
    (root / "labels.json").write_text(json.dumps(["a.png"]))
    with pytest.raises(DataError, match="JSON labels must be an object"):
        LabelledImageFolder(root)
    (root / "labels.json").unlink()
    with pytest.raises(DataError, match="no labels.csv or labels.json"):
        LabelledImageFolder(root)
    (root / "labels.csv").write_text("file,classes\na.png,cat\n")  # any header naming the image column
    assert LabelledImageFolder(root).labels == [(1,)]
    (root / "labels.csv").write_text("a.png,cat\n")  # the header is optional
    assert LabelledImageFolder(root).labels == [(1,)]
    (root / "labels.json").write_text(json.dumps({"a": [1]}))
    with pytest.raises(DataError, match="both labels.json and labels.csv exist"):
        LabelledImageFolder(root)
    (root / "labels.json").unlink()
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="class list not found"):
        LabelledImageFolder(root)


def test_unreadable_image_is_named_when_read(folder):
    root, _ = folder
    (root / "images" / "b.png").write_bytes(b"broken")
    (root / "labels.csv").write_text("image,labels\nb.png,cat\n")
    ds = LabelledImageFolder(root)
    with pytest.raises(DataError, match="b.png: cannot decode image"):
        ds[0]
