"""VOCDataset on the shared real data and on small hand-made datasets with broken inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data.classes import ClassSet
from wsss.data.io import write_mask
from wsss.data.transforms import CenterCrop, RandomCrop, build_transforms
from wsss.data.voc import VOCDataset, collate, labels_from_mask
from wsss.errors import DataError


def _pil_labels(mask_path: Path) -> set[int]:
    """Label indices present in a mask, read independently of the library."""
    values = np.unique(np.asarray(Image.open(mask_path)))
    return {int(v) for v in values if v != 255}


def _make_dataset(
    root: Path,
    sizes: dict[str, tuple[int, int]],
    classes=("background", "cat", "dog"),
    masks: bool = True,
    split: str = "train",
) -> Path:
    """A tiny VOC-layout dataset: image ``id`` of ``(h, w)`` whose mask marks class (index % K) in the middle."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    for k, (image_id, (h, w)) in enumerate(sizes.items()):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        if masks:
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1 + k % (len(classes) - 1)
            mask[0, 0] = 255
            write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in sizes))
    return root


# ------------------------------------------------------------------------------------------- shared data


def test_camvid_labels_no_background(shared_data):
    ds = VOCDataset(shared_data / "camvid", "train")
    assert len(ds) == 367 and ds.classes.num_fg == 11 and not ds.classes.has_background
    assert ds.has_masks
    # Inspected by hand: frame 0001TP_006690 holds every class but Fence (7) and Bicyclist (10).
    assert ds.ids[0] == "0001TP_006690"
    assert np.nonzero(ds.labels(0))[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    for i in range(0, 367, 73):
        expected = _pil_labels(ds.mask_path(ds.ids[i]))  # no background: label k is output k
        assert set(np.nonzero(ds.labels(i))[0].tolist()) == expected
    item = ds[0]
    assert item["id"] == "0001TP_006690"
    assert item["image"].shape == (3, 360, 480) and item["image"].dtype == torch.float32
    assert item["label"].tolist() == ds.labels(0).tolist()
    assert torch.equal(item["mask"], torch.from_numpy(np.array(Image.open(ds.mask_path(ds.ids[0])))).long())
    assert len(VOCDataset(shared_data / "camvid", "val")) == 101


def test_camvid_min_label_fraction(shared_data):
    ds = VOCDataset(shared_data / "camvid", "val", min_label_fraction=0.02)
    for i in (0, 50, 100):
        mask = np.asarray(Image.open(ds.mask_path(ds.ids[i])))
        labelled = mask[mask != 255]
        expected = {k for k in range(11) if (labelled == k).sum() >= 0.02 * labelled.size and (labelled == k).any()}
        assert set(np.nonzero(ds.labels(i))[0].tolist()) == expected


def test_horses(shared_data):
    ds = VOCDataset(shared_data / "horses", "all")
    assert len(ds) == 328 and ds.classes.names == ("background", "horse") and ds.classes.num_fg == 1
    for i in (0, 100, 327):
        assert ds.labels(i).tolist() == [1.0]
        item = ds[i]
        assert set(item["mask"].unique().tolist()) <= {0, 1, 255}
        assert item["mask"].shape == item["image"].shape[1:]


def test_voc_mini_labels_and_fraction(shared_data):
    ds = VOCDataset(shared_data / "voc_mini", "train")
    assert ds.classes.num_classes == 21 and ds.classes.num_fg == 20
    names = {ds.ids[i]: [ds.classes.fg_names[k] for k in np.nonzero(ds.labels(i))[0]] for i in range(3)}
    assert names == {
        "2011_000003": ["bottle", "person"],
        "2011_000006": ["chair", "person", "sofa"],
        "2011_000025": ["bus", "car"],
    }
    # Bottle covers 873 of 159,540 labelled pixels (0.55%) in 2011_000003: dropped at a 1% threshold.
    strict = VOCDataset(shared_data / "voc_mini", "train", min_label_fraction=0.01)
    assert [strict.classes.fg_names[k] for k in np.nonzero(strict.labels(0))[0]] == ["person"]
    assert strict[0]["label"].tolist() == strict.labels(0).tolist()
    loose = VOCDataset(shared_data / "voc_mini", "train", min_label_fraction=0.005)
    assert [loose.classes.fg_names[k] for k in np.nonzero(loose.labels(0))[0]] == ["bottle", "person"]


def test_labels_follow_the_crop(shared_data):
    ds = VOCDataset(shared_data / "voc_mini", "train", transform=RandomCrop(96), seed=3)
    seen = set()
    for i in range(3):
        for epoch in range(4):
            ds.set_epoch(epoch)
            item = ds[i]
            crop_mask = item["mask"].numpy()
            expected = np.zeros(20, np.float32)
            for v in np.unique(crop_mask):
                if 0 < v < 255:
                    expected[v - 1] = 1.0
            assert item["label"].numpy().tolist() == expected.tolist()
            seen.add(tuple(expected))
    assert len(seen) > 3  # crops do get labels different from the full images


# --------------------------------------------------------------------------------------- seeds and batches


def test_seeded_augmentation_is_reproducible_and_order_free(tmp_path):
    root = _make_dataset(tmp_path / "d", {f"im{i}": (30, 40) for i in range(4)})
    transform = build_transforms({"resize_long": [30, 50], "hflip": True, "crop": 24})
    a = VOCDataset(root, "train", transform=transform, seed=11)
    b = VOCDataset(root, "train", transform=transform, seed=11)
    forward = [a[i]["image"] for i in range(4)]
    backward = [b[i]["image"] for i in reversed(range(4))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    a.set_epoch(1)
    assert not all(torch.equal(a[i]["image"], forward[i]) for i in range(4))
    a.set_epoch(0)
    assert torch.equal(a[2]["image"], forward[2])


def test_collate_pads_unequal_sizes(tmp_path):
    root = _make_dataset(tmp_path / "d", {"small": (8, 10), "big": (12, 9)})
    ds = VOCDataset(root, "train")
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 12, 10) and batch["mask"].shape == (2, 12, 10)
    assert batch["size"].tolist() == [[8, 10], [12, 9]]
    assert bool((batch["mask"][0, 8:] == 255).all()) and bool((batch["mask"][1, :, 9:] == 255).all())
    assert torch.equal(batch["mask"][0, :8, :10], ds[0]["mask"])
    assert batch["id"] == ["small", "big"]
    assert batch["label"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_default_dataloader_with_equal_sizes(tmp_path):
    root = _make_dataset(tmp_path / "d", {f"im{i}": (30, 40) for i in range(4)})
    ds = VOCDataset(root, "train", transform=CenterCrop(16))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]


def test_labels_from_mask_threshold():
    classes = ClassSet(("background", "a", "b", "c"))
    mask = np.array([[0, 1, 1, 2], [255, 255, 0, 0]], dtype=np.uint8)
    assert labels_from_mask(mask, classes).tolist() == [1.0, 1.0, 0.0]
    # 6 labelled pixels: class 1 has 2/6, class 2 has 1/6
    assert labels_from_mask(mask, classes, min_fraction=0.2).tolist() == [1.0, 0.0, 0.0]
    assert labels_from_mask(np.full((2, 2), 255, np.uint8), classes).tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------ labels files


def test_labels_json_without_masks(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (10, 12), "b": (10, 12)}, masks=False)
    (root / "labels.json").write_text(json.dumps({"a": [2], "b": [0, 1, 2]}))
    ds = VOCDataset(root, "train", transform=RandomCrop(6), seed=0)
    assert not ds.has_masks
    item = ds[0]
    assert item["label"].tolist() == [0.0, 1.0]  # background index 0 is dropped
    assert ds[1]["label"].tolist() == [1.0, 1.0]
    assert bool((item["mask"] == 255).all()) and item["mask"].shape == (6, 6)


def test_labels_csv_with_names_and_header(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (10, 12), "b": (10, 12)}, masks=False)
    (root / "labels.csv").write_text("id,labels\na,dog cat\nb,Cat\n")
    ds = VOCDataset(root, "train")
    assert ds.labels(0).tolist() == [1.0, 1.0] and ds.labels(1).tolist() == [1.0, 0.0]
    explicit = tmp_path / "mine.csv"
    explicit.write_text("a,1\nb,2\n")
    ds = VOCDataset(root, "train", labels_file=explicit)
    assert ds.labels(0).tolist() == [1.0, 0.0] and ds.labels(1).tolist() == [0.0, 1.0]


def test_explicit_labels_file_overrides_masks(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (10, 12)})
    labels = tmp_path / "l.json"
    labels.write_text(json.dumps({"a": ["dog"]}))
    ds = VOCDataset(root, "train", labels_file=labels)
    assert ds.has_masks and ds[0]["label"].tolist() == [0.0, 1.0]  # the mask says cat


# ------------------------------------------------------------------------------------------- bad inputs


def test_corrupt_image_names_the_file(tmp_path):
    root = _make_dataset(tmp_path / "d", {"good": (8, 8), "broken": (8, 8)})
    (root / "JPEGImages" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    ds = VOCDataset(root, "train")
    ds[0]
    with pytest.raises(DataError, match="broken.jpg"):
        ds[1]


def test_mask_label_outside_class_list(tmp_path):
    root = _make_dataset(tmp_path / "d", {"x": (8, 8)})
    mask = np.zeros((8, 8), np.uint8)
    mask[2, 2] = 7
    write_mask(root / "SegmentationClass" / "x.png", mask)
    with pytest.raises(DataError, match=r"x\.png.*\[7\]"):
        VOCDataset(root, "train")[0]


def test_image_mask_size_mismatch(tmp_path):
    root = _make_dataset(tmp_path / "d", {"x": (8, 10)})
    write_mask(root / "SegmentationClass" / "x.png", np.zeros((9, 10), np.uint8))
    ds = VOCDataset(root, "train")
    with pytest.raises(DataError, match=r"x\.png.*9x10.*8x10"):
        ds[0]
    with pytest.raises(DataError, match=r"x\.png"):
        ds.labels(0)


def test_missing_and_empty_split(tmp_path):
    root = _make_dataset(tmp_path / "d", {"x": (8, 8)})
    with pytest.raises(DataError, match=r"val\.txt.*not found"):
        VOCDataset(root, "val")
    (root / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt.*split 'empty' is empty"):
        VOCDataset(root, "empty")


def test_missing_classes_file_and_image(tmp_path):
    root = _make_dataset(tmp_path / "d", {"x": (8, 8), "y": (8, 8)})
    (root / "JPEGImages" / "y.jpg").unlink()
    with pytest.raises(DataError, match=r"y\.jpg"):
        VOCDataset(root, "train")
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes\.txt"):
        VOCDataset(root, "train")


def test_empty_label_set_in_labels_file(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (8, 8), "b": (8, 8)}, masks=False)
    (root / "labels.json").write_text(json.dumps({"a": [1], "b": []}))
    with pytest.raises(DataError, match=r"labels\.json.*'b'.*empty label set"):
        VOCDataset(root, "train")
    (root / "labels.json").unlink()
    (root / "labels.csv").write_text("a,cat\nb,background\n")
    with pytest.raises(DataError, match=r"labels\.csv.*'b'.*empty label set"):
        VOCDataset(root, "train")


def test_labels_file_problems(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (8, 8), "b": (8, 8)}, masks=False)
    with pytest.raises(DataError, match=r"labels\.json.*no masks"):
        VOCDataset(root, "train")
    assert not VOCDataset(root, "train", require_labels=False).has_labels
    (root / "labels.json").write_text(json.dumps({"a": [1]}))
    with pytest.raises(DataError, match=r"labels\.json.*'b'"):
        VOCDataset(root, "train")
    (root / "labels.json").write_text(json.dumps({"a": [1], "b": ["horse"]}))
    with pytest.raises(DataError, match=r"labels\.json.*unknown class 'horse'"):
        VOCDataset(root, "train")
    (root / "labels.json").write_text(json.dumps({"a": [1], "b": [3]}))
    with pytest.raises(DataError, match=r"labels\.json.*label index 3 is outside"):
        VOCDataset(root, "train")
    (root / "labels.json").write_text("{not json")
    with pytest.raises(DataError, match=r"labels\.json.*cannot read"):
        VOCDataset(root, "train")


def test_masks_required_or_partial(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (8, 8), "b": (8, 8)}, masks=False)
    (root / "labels.json").write_text(json.dumps({"a": [1], "b": [2]}))
    with pytest.raises(DataError, match=r"a\.png.*mask not found"):
        VOCDataset(root, "train", require_masks=True)
    write_mask(root / "SegmentationClass" / "b.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"a\.png.*1 of 2 missing"):
        VOCDataset(root, "train")


def test_split_lines_with_paths_and_png_images(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (8, 8)})
    Image.open(root / "JPEGImages" / "a.jpg").save(root / "JPEGImages" / "p.png")
    write_mask(root / "SegmentationClass" / "p.png", np.ones((8, 8), np.uint8))
    (root / "ImageSets" / "Segmentation" / "mixed.txt").write_text(
        "/JPEGImages/a.jpg /SegmentationClassAug/a.png\np\n"
    )
    ds = VOCDataset(root, "mixed")
    assert ds.ids == ["a", "p"]
    assert ds.image_path("p").name == "p.png" and ds.image_path("a").name == "a.jpg"
    assert ds.labels(1).tolist() == [1.0, 0.0]


def test_labels_file_rows_outside_the_split_are_not_checked(tmp_path):
    root = _make_dataset(tmp_path / "d", {"a": (8, 8)}, masks=False)
    (root / "labels.json").write_text(json.dumps({"a": ["cat"], "other": []}))
    assert VOCDataset(root, "train").labels(0).tolist() == [1.0, 0.0]
