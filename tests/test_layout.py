"""The one reader per file kind (wsss.data.layout) and the callers that must agree on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli.main import main
from wsss.data import layout
from wsss.data.check import check_dataset
from wsss.data.classes import ClassSet
from wsss.data.io import write_mask
from wsss.data.layout import ImageFolder, find_image, find_labels_file, read_labels_file, read_split
from wsss.data.voc import VOCDataset
from wsss.errors import DataError

CLASSES = ClassSet(("background", "cat", "dog", "traffic light"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- split lists


def test_read_split_ids_comments_blank_lines_and_paths(tmp_path: Path):
    path = _write(tmp_path / "train.txt", "# made by hand\n2007_000032\n\n   \n  b  \nc.JPG\n"
                                          "/JPEGImages/d.jpg /SegmentationClassAug/d.png\n/JPEGImages/e.jpg\n")
    assert read_split(path) == ["2007_000032", "b", "c", "d", "e"]


def test_read_split_whitespace_inside_a_line_is_an_error(tmp_path: Path):
    path = _write(tmp_path / "train.txt", "a\nb\nmy image 1\n")
    with pytest.raises(DataError) as info:
        read_split(path)
    assert str(info.value) == f"{path}: line 3: 'my image 1' is not one image id (ids hold no whitespace)"
    # An image/mask pair naming two different ids is no pair.
    _write(path, "/JPEGImages/a.jpg /SegmentationClassAug/b.png\n")
    with pytest.raises(DataError, match=r"train\.txt: line 1: '/JPEGImages/a\.jpg /Segm"):
        read_split(path)


def test_read_split_duplicates_empty_and_missing(tmp_path: Path):
    path = _write(tmp_path / "val.txt", "a\nb\na\nc\na\n")
    with pytest.raises(DataError) as info:
        read_split(path)
    assert str(info.value) == f"{path}: id 'a' listed 3 times (lines 1, 3, 5)"
    _write(path, "# nothing yet\n\n")
    with pytest.raises(DataError, match=r"val\.txt: split 'val' is empty"):
        read_split(path)
    with pytest.raises(DataError, match=r"nope\.txt: split list not found"):
        read_split(tmp_path / "nope.txt")


def test_read_split_lists_every_problem_or_collects_them(tmp_path: Path):
    path = _write(tmp_path / "train.txt", "a\nx y\na\nb\n")
    with pytest.raises(DataError) as info:
        read_split(path)
    assert str(info.value) == (f"{path}: 2 problem(s):\n  line 2: 'x y' is not one image id (ids hold no "
                               "whitespace)\n  id 'a' listed 2 times (lines 1, 3)")
    problems: list[str] = []
    assert read_split(path, problems) == ["a", "b"]
    assert problems == ["line 2: 'x y' is not one image id (ids hold no whitespace)",
                        "id 'a' listed 2 times (lines 1, 3)"]


def test_dataset_rejects_a_split_line_with_spaces(tmp_path: Path):
    root = _voc_root(tmp_path, {"a": ".jpg"})
    _write(root / "ImageSets" / "Segmentation" / "train.txt", "a\nmy image 1\n")
    with pytest.raises(DataError, match=r"train\.txt: line 2: 'my image 1'"):
        VOCDataset(root, "train")


# ------------------------------------------------------------------------------------------------ images


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_find_image_every_extension_any_case(tmp_path: Path):
    names = ["a.jpg", "b.jpeg", "c.png", "d.bmp", "e.tif", "f.tiff", "g.webp", "h.JPG", "i.PnG", "j.TIFF"]
    _touch_images(tmp_path / "img", names + ["k.txt", "l.jpg.bak"])
    (tmp_path / "img" / "m.png").mkdir()  # a folder is no image
    images = ImageFolder(tmp_path / "img")
    for name in names:
        assert images.find(name.split(".")[0]) == tmp_path / "img" / name
    assert find_image(tmp_path / "img", "h") == tmp_path / "img" / "h.JPG"
    for missing in ("k", "l", "m", "a.jpg"):
        with pytest.raises(DataError, match=rf"no image file for id '{missing}'"):
            images.find(missing)


def test_find_image_missing_names_the_id_and_folder(tmp_path: Path):
    _touch_images(tmp_path / "img", ["a.jpg"])
    with pytest.raises(DataError) as info:
        find_image(tmp_path / "img", "zebra")
    assert str(info.value) == (f"{tmp_path / 'img'}: no image file for id 'zebra' "
                               "(zebra.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp, any letter case)")
    with pytest.raises(DataError, match=r"nowhere: image folder not found \(looking for image 'a'\)"):
        find_image(tmp_path / "nowhere", "a")


def test_find_image_two_files_for_one_id_is_ambiguous(tmp_path: Path):
    _touch_images(tmp_path / "img", ["a.jpg", "a.PNG", "b.jpg"])
    images = ImageFolder(tmp_path / "img")
    with pytest.raises(DataError) as info:
        images.find("a")
    assert str(info.value) == f"{tmp_path / 'img'}: image 'a' is ambiguous: a.PNG and a.jpg exist; remove all but one"
    (tmp_path / "img" / "a.webp").write_bytes(b"")
    with pytest.raises(DataError, match=r"image 'a' is ambiguous: a\.PNG, a\.jpg and a\.webp exist"):
        ImageFolder(tmp_path / "img").find("a")
    assert images.find("b").name == "b.jpg"


def test_image_folder_lists_each_folder_once(tmp_path: Path, monkeypatch):
    _touch_images(tmp_path / "img", [f"{i:04d}.jpg" for i in range(300)])
    _touch_images(tmp_path / "img" / "sub", ["x.png"])
    listed = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(layout.os, "scandir", counting_scandir)
    images = ImageFolder(tmp_path / "img")
    assert [images.find(f"{i:04d}").name for i in range(300)] == [f"{i:04d}.jpg" for i in range(300)]
    assert images.find("sub/x") == tmp_path / "img" / "sub" / "x.png"
    assert images.find("sub/x") == tmp_path / "img" / "sub" / "x.png"
    assert listed == [tmp_path / "img", tmp_path / "img" / "sub"]
    ImageFolder(tmp_path / "img").find("0000")  # the cache lives in the object, not the module
    assert len(listed) == 3


# ------------------------------------------------------------------------------------------ labels files


def test_read_labels_csv(tmp_path: Path):
    path = _write(tmp_path / "labels.csv",
                  "image,labels\n"
                  "2007_000032.jpg,cat;dog\n"
                  "# a comment row\n"
                  "2007_000033,2 0\n"  # indices; background is allowed and dropped
                  'b.PNG,"traffic light,Cat"\n'
                  "c,traffic light\n"  # a class name with a space, unquoted
                  "d,cat dog\n"
                  "e,1,3\n"  # one label per cell
                  "f,background\n"
                  "sub/g.jpg,dog|cat\n")
    assert read_labels_file(path, CLASSES) == {
        "2007_000032": (1, 2), "2007_000033": (2,), "b": (1, 3), "c": (3,), "d": (1, 2), "e": (1, 3), "f": (),
        "sub/g": (1, 2)}
    _write(path, "a.jpg,cat\n")  # no header
    assert read_labels_file(path, CLASSES) == {"a": (1,)}


def test_read_labels_json(tmp_path: Path):
    path = _write(tmp_path / "labels.json", json.dumps(
        {"2007_000032.jpg": ["cat", 2], "2007_000033": [0, "Traffic Light"], "c": "dog", "d": 1, "e": []}))
    assert read_labels_file(path, CLASSES) == {"2007_000032": (1, 2), "2007_000033": (3,), "c": (2,), "d": (1,),
                                               "e": ()}


def test_read_labels_file_with_and_without_extensions_agree(tmp_path: Path):
    with_ext = _write(tmp_path / "a" / "labels.csv", "image,labels\nx.jpg,cat\ny.jpeg,dog cat\n")
    without = _write(tmp_path / "b" / "labels.csv", "image,labels\nx,cat\ny,dog cat\n")
    as_json = _write(tmp_path / "c" / "labels.json", json.dumps({"x.png": ["cat"], "y": ["dog", "cat"]}))
    expected = {"x": (1,), "y": (1, 2)}
    assert read_labels_file(with_ext, CLASSES) == read_labels_file(without, CLASSES) == expected
    assert read_labels_file(as_json, CLASSES) == expected


@pytest.mark.parametrize("text, problem", [
    ("image,labels\na,cat\nb,kitten\n", "row 3 (b): unknown class 'kitten'; classes are"),
    ("image,labels\na,cat\nb,9\n", "row 3 (b): label index 9 is outside the classes 0..3"),
    ("image,labels\na,cat\na.jpg,dog\n", "row 3 (a.jpg): image 'a' is already listed in row 2 (a)"),
    ("image,labels\na,cat\na,dog\n", "row 3 (a): image 'a' is already listed in row 2 (a)"),
    ("image,labels\n,cat\n", "row 2 (): no image name"),
    ('image,labels\na,"cat\n', "cannot read labels file (line 2: unexpected end of data)"),
    ('image,labels\na,"cat"x\n', "cannot read labels file (line 2: ',' expected after '\"')"),
])
def test_read_labels_csv_problems_name_the_file_and_row(tmp_path: Path, text: str, problem: str):
    path = _write(tmp_path / "labels.csv", text)
    with pytest.raises(DataError) as info:
        read_labels_file(path, CLASSES)
    assert str(info.value).startswith(f"{path}: {problem}")


@pytest.mark.parametrize("text, problem", [
    (json.dumps({"a": ["cat"], "b": ["horse"]}), "key 'b': unknown class 'horse'"),
    (json.dumps({"a": ["cat"], "a.jpg": [1]}), "key 'a.jpg': image 'a' is already listed in key 'a'"),
    ('{"a": [1], "a": [2]}', "key 'a': image 'a' is already listed in key 'a'"),  # json.loads keeps the last
    (json.dumps({"a": {"cat": 1}}), "key 'a': labels must be a list of class names or indices, got {'cat': 1}"),
    (json.dumps({"a": [True]}), "key 'a': label True is neither a class name nor an index"),
    (json.dumps({"a": [1.5]}), "key 'a': label 1.5 is neither a class name nor an index"),
    (json.dumps([["a", 1]]), 'JSON labels must be an object {"<image>": [labels, ...]}'),
    ("{not json", "cannot read labels file (Expecting property name"),
])
def test_read_labels_json_problems_name_the_file_and_key(tmp_path: Path, text: str, problem: str):
    path = _write(tmp_path / "labels.json", text)
    with pytest.raises(DataError) as info:
        read_labels_file(path, CLASSES)
    assert str(info.value).startswith(f"{path}: {problem}")


def test_read_labels_file_lists_every_problem_or_collects_them(tmp_path: Path):
    path = _write(tmp_path / "labels.csv", "a,cat\nb,cow\nc,dog\nc.jpg,cat\nd,7 dog\n")
    with pytest.raises(DataError) as info:
        read_labels_file(path, CLASSES)
    assert str(info.value).startswith(f"{path}: 3 problem(s):\n  row 2 (b): unknown class 'cow'")
    problems: list[tuple[str | None, str]] = []
    assert read_labels_file(path, CLASSES, problems) == {"a": (1,), "c": (2,)}
    assert [(image_id, message.split(";")[0]) for image_id, message in problems] == [
        ("b", "row 2 (b): unknown class 'cow'"),
        ("c", "row 4 (c.jpg): image 'c' is already listed in row 3 (c)"),
        ("d", "row 5 (d): label index 7 is outside the classes 0..3"),
    ]


def test_read_labels_file_missing_or_unsupported(tmp_path: Path):
    with pytest.raises(DataError, match=r"labels\.csv: labels file not found"):
        read_labels_file(tmp_path / "labels.csv", CLASSES)
    with pytest.raises(DataError, match=r"labels\.txt: labels file must be \.csv or \.json"):
        read_labels_file(_write(tmp_path / "labels.txt", "a,cat\n"), CLASSES)
    problems: list[tuple[str | None, str]] = []
    assert read_labels_file(tmp_path / "labels.json", CLASSES, problems) == {}
    assert problems == [(None, "labels file not found")]


def test_find_labels_file(tmp_path: Path):
    assert find_labels_file(tmp_path) is None
    _write(tmp_path / "labels.csv", "a,cat\n")
    assert find_labels_file(tmp_path) == tmp_path / "labels.csv"
    _write(tmp_path / "labels.json", "{}")
    with pytest.raises(DataError, match="both labels.json and labels.csv exist"):
        find_labels_file(tmp_path)


# ------------------------------------------------------------------------------------- dataset, check-data


def _voc_root(tmp_path: Path, images: dict[str, str], masks: bool = True) -> Path:
    """A VOC-layout root with classes bg/cat/dog; image ``id`` saved with extension ``images[id]``."""
    root = tmp_path / "ds"
    _write(root / "classes.txt", "background\ncat\ndog\n")
    (root / "JPEGImages").mkdir(parents=True)
    for k, (image_id, ext) in enumerate(images.items()):
        array = np.full((6, 8, 3), 40 * k, dtype=np.uint8)
        fmt = {".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(ext.lower(), ext[1:].upper())
        Image.fromarray(array).save(root / "JPEGImages" / f"{image_id}{ext}", format=fmt)
        if masks:
            mask = np.zeros((6, 8), dtype=np.uint8)
            mask[2:4, 2:6] = 1 + k % 2
            write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
    _write(root / "ImageSets" / "Segmentation" / "train.txt", "".join(f"{i}\n" for i in images))
    return root


def test_dataset_and_check_data_find_the_same_images(tmp_path: Path):
    root = _voc_root(tmp_path, {"a": ".JPG", "b": ".png", "c": ".webp", "d": ".tif", "e": ".bmp"})
    ds = VOCDataset(root, "train")
    assert [ds.image_path(i).name for i in ds.ids] == ["a.JPG", "b.png", "c.webp", "d.tif", "e.bmp"]
    assert ds[2]["image"].shape == (3, 6, 8)
    report = check_dataset(root, "train")
    assert report.problems == [] and report.num_images == 5
    (root / "JPEGImages" / "b.jpg").write_bytes((root / "JPEGImages" / "b.png").read_bytes())
    with pytest.raises(DataError, match="image 'b' is ambiguous: b.jpg and b.png"):
        VOCDataset(root, "train")
    assert [msg for _, msg in check_dataset(root, "train").problems] == [
        "image 'b' is ambiguous: b.jpg and b.png exist; remove all but one"]


def test_synth_png_then_check_data_is_clean(tmp_path: Path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--num-train", "3", "--num-val", "2", "--size", "32",
                 "--classes", "2", "--png"]) == 0
    assert sorted(p.suffix for p in (out / "JPEGImages").iterdir()) == [".png"] * 5
    capsys.readouterr()
    for split, count in (("train", 3), ("val", 2)):
        assert main(["check-data", "--data", str(out), "--split", split]) == 0
        assert f"{count} images, 3 classes, masks, 0 problem(s)" in capsys.readouterr().out


def test_labels_csv_keys_with_and_without_extension_give_the_same_dataset_labels(tmp_path: Path):
    root = _voc_root(tmp_path, {"a": ".jpg", "b": ".png", "c": ".jpg"}, masks=False)
    labels = root / "labels.csv"
    _write(labels, "image,labels\na.jpg,cat\nb.png,dog;cat\nc.jpg,dog\n")
    with_ext = VOCDataset(root, "train")
    _write(labels, "image,labels\na,cat\nb,dog;cat\nc,dog\n")
    without = VOCDataset(root, "train")
    _write(labels, "image,labels\na.jpg,cat\nb,dog;cat\nc.JPG,dog\n")
    mixed = VOCDataset(root, "train")
    expected = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    for ds in (with_ext, without, mixed):
        assert not ds.has_masks
        assert [ds.labels(i).tolist() for i in range(3)] == expected
        assert [ds[i]["label"].tolist() for i in range(3)] == expected
    assert check_dataset(root, "train").problems == []


def test_check_data_reports_a_bad_labels_csv_row(tmp_path: Path, capsys):
    root = _voc_root(tmp_path, {"a": ".jpg", "b": ".png"})
    labels = _write(root / "labels.csv", "image,labels\na.jpg,cat\nb,kitten\nghost.jpg,dog\n")
    assert main(["check-data", "--data", str(root), "--split", "train"]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out
    assert f"{labels}: row 3 (b): unknown class 'kitten'" in out
    assert f"{labels}: no image file for id 'ghost' (ghost.jpg" in out
    report = check_dataset(root, "train")
    assert {path for path, _ in report.problems} == {str(labels)}
    # Masks hold the labels here, so the statistics still come from them.
    np.testing.assert_array_equal(report.images_per_class, [2, 1, 1])


def test_check_data_labels_only_split_uses_the_labels_file(tmp_path: Path):
    root = _voc_root(tmp_path, {"a": ".jpg", "b": ".png", "c": ".jpg"}, masks=False)
    labels = _write(root / "labels.csv", "a,cat\nb,background\nc,dog;1\n")
    report = check_dataset(root, "train")
    assert not report.has_masks
    assert report.problems == [(str(labels), "image 'b': empty label set")]
    np.testing.assert_array_equal(report.images_per_class, [0, 2, 1])
    assert report.label_set_sizes == {0: 1, 1: 1, 2: 1}
    # A named labels file is the one checked against the split; the root one is then only checked as a file.
    other = _write(tmp_path / "mine.json", json.dumps({"a": ["cat"], "b": ["dog"]}))
    report = check_dataset(root, "train", labels_file=other)
    assert report.problems == [(str(other), "no entry for image 'c' of split 'train'")]
    _write(root / "labels.json", "{}")
    assert check_dataset(root, "train").problems == [
        (str(root), "both labels.json and labels.csv exist; remove one or name the labels file to use")]
