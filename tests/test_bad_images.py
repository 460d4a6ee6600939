"""Bad inputs are named errors, and check-data lists them: decompression bombs, split lines that are not one id."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.check import check_dataset
from wsss.data.io import open_image, read_image, read_mask, write_mask
from wsss.data.layout import read_split
from wsss.data.voc import VOCDataset
from wsss.errors import DataError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of ``width x height`` zeros: a few KB on disk, gigabytes once decoded to RGB."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    block = row * 1000
    body = b"".join(z.compress(block) for _ in range(height // 1000)) + z.compress(row * (height % 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale, not interlaced
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """Two real bombs for PIL's default limit (89,478,485 pixels): over twice it (PIL raises) and between once
    and twice it (PIL only warns and would decode 300 MB)."""
    root = tmp_path_factory.mktemp("bombs")
    return {"error": _bomb_png(root / "error.png", 20000, 20000),  # 400,000,000 pixels
            "warning": _bomb_png(root / "warning.png", 10000, 10000)}  # 100,000,000 pixels


def test_bomb_pngs_are_small_on_disk(bombs):
    assert all(p.stat().st_size < 200_000 for p in bombs.values())
    assert Image.MAX_IMAGE_PIXELS == 89478485  # the limits the fixture is sized for


def test_bomb_over_twice_the_limit_is_a_data_error_with_the_pixel_count(bombs):
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        read_image(bombs["error"])
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing decoded
    err = info.value
    assert err.path == bombs["error"]
    assert err.problem == ("image is 400000000 pixels, over the limit of 89478485 pixels (a possible decompression "
                           "bomb; raise PIL.Image.MAX_IMAGE_PIXELS to read larger images)")
    assert str(err).startswith(f"{bombs['error']}: image is 400000000 pixels")


@pytest.mark.filterwarnings("error")  # PIL's own DecompressionBombWarning must not escape either
def test_bomb_at_the_warning_level_is_an_error_too(bombs):
    with pytest.raises(DataError) as info:
        read_image(bombs["warning"])
    assert info.value.problem.startswith("image is 10000x10000 = 100000000 pixels, over the limit of 89478485 pixels")
    with pytest.raises(DataError, match="100000000 pixels"):
        read_mask(bombs["warning"])  # masks too: it is a valid greyscale PNG


def test_limit_follows_pil_and_max_pixels(tmp_path: Path, monkeypatch):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(small)  # 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"image is 40x30 = 1200 pixels, over the limit of 1000 pixels"):
        read_image(small)  # PIL alone would only warn (1200 < 2 x 1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(DataError, match=r"image is 1200 pixels, over the limit of 500 pixels"):
        read_image(small)  # PIL raises its own error (1200 > 2 x 500): still named, with the count
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's limit off: max_pixels alone
    with pytest.raises(DataError, match="over the limit of 1199 pixels"):
        read_image(small, max_pixels=1199)
    image = read_image(small, max_pixels=1200)
    assert image.shape == (30, 40, 3) and image[0, 0].tolist() == [10, 200, 30]
    with open_image(small) as im:  # no limit at all
        assert im.size == (40, 30)


def test_mask_errors_are_not_wrapped_twice(tmp_path: Path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(DataError) as info:
        read_mask(path)
    assert info.value.problem == "mask must be a palette or greyscale PNG, got mode RGB"


def _dataset(root: Path, split_text: str, ids=("a", "b")) -> Path:
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(split_text)
    for i in ids:
        (root / "JPEGImages").mkdir(exist_ok=True)
        Image.new("RGB", (6, 4), (90, 30, 10)).save(root / "JPEGImages" / f"{i}.png")
        write_mask(root / "SegmentationClass" / f"{i}.png", np.array([[0] * 6, [1] * 6, [1] * 6, [0] * 6], np.uint8))
    return root


def test_check_data_lists_a_bomb_with_the_other_problems(tmp_path: Path, bombs):
    root = _dataset(tmp_path / "ds", "a\nb\nbomb\nbroken\n")
    (root / "JPEGImages" / "bomb.png").write_bytes(bombs["error"].read_bytes())
    write_mask(root / "SegmentationClass" / "bomb.png", np.ones((4, 6), np.uint8))
    (root / "JPEGImages" / "broken.png").write_bytes(b"not a png")
    write_mask(root / "SegmentationClass" / "broken.png", np.ones((4, 6), np.uint8))
    report = check_dataset(root, "train")
    assert report.problems == [
        (str(root / "JPEGImages" / "bomb.png"), "image is 400000000 pixels, over the limit of 89478485 pixels (a "
         "possible decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS to read larger images)"),
        (str(root / "JPEGImages" / "broken.png"), report.problems[1][1]),
    ]
    assert report.problems[1][1].startswith("cannot decode image")
    # The good images and every mask were still read: 2 + 2 cat rows of 6 pixels, the bomb's and broken's masks.
    assert report.pixels_per_class.tolist() == [2 * 12, 2 * 12 + 2 * 24]
    # A lower configured limit flags the ordinary 6x4 images as well.
    low = check_dataset(root, "train", max_pixels=23)
    assert sum("6x4 = 24 pixels, over the limit of 23" in p for _, p in low.problems) == 2 + 4  # 2 images, 4 masks


def test_dataset_image_size_refuses_a_bomb(tmp_path: Path, bombs):
    root = _dataset(tmp_path / "ds", "a\nbomb\n", ids=("a",))
    (root / "JPEGImages" / "bomb.png").write_bytes(bombs["warning"].read_bytes())
    write_mask(root / "SegmentationClass" / "bomb.png", np.ones((4, 6), np.uint8))
    ds = VOCDataset(root, "train")  # opening the dataset reads no image
    with pytest.raises(DataError, match="bomb.png: image is 10000x10000 = 100000000 pixels"):
        ds.image_size(1)
    with pytest.raises(DataError, match="100000000 pixels"):
        ds.load_image(1)


@pytest.mark.parametrize("line, hint", [
    ("my image 1", ""),
    ("b  1", " - an ImageSets/Main class list? segmentation splits list one bare id per line"),
    ("b -1", " - an ImageSets/Main class list? segmentation splits list one bare id per line"),
])
def test_split_line_with_spaces_is_refused_everywhere(tmp_path: Path, line: str, hint: str):
    root = _dataset(tmp_path / "ds", f"a\n\n{line}\n")
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    problem = f"line 3: {line!r} is not one image id (ids hold no whitespace){hint}"
    with pytest.raises(DataError) as info:
        read_split(split)
    assert str(info.value) == f"{split}: {problem}"
    with pytest.raises(DataError) as info:  # what `wsss cam` and training read
        VOCDataset(root, "train")
    assert str(info.value) == f"{split}: {problem}"
    report = check_dataset(root, "train")
    assert report.problems == [(str(split), problem)]
    assert report.num_images == 1  # "a" is still checked
