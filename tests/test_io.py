"""On-disk formats: saved maps round-trip, and every bad maps file is a DataError naming it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from wsss.data.io import (current_umask, load_maps, read_mask, read_npz, read_palette, save_maps, voc_palette,
                          write_bytes_atomic, write_mask)
from wsss.errors import DataError


def test_maps_round_trip_through_float16(tmp_path):
    maps = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    save_maps(tmp_path / "a.npz", maps, [3, 1])
    loaded, classes = load_maps(tmp_path / "a.npz", num_classes=4)
    assert loaded.dtype == np.float32 and classes.tolist() == [3, 1]
    np.testing.assert_allclose(loaded, maps.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("problem", ["missing", "corrupt", "keys", "disagree", "classes"])
def test_bad_maps_files_name_the_file(tmp_path, problem):
    path = tmp_path / "bad.npz"
    if problem == "corrupt":
        path.write_bytes(b"not a zip file")
    elif problem == "keys":
        np.savez(path, cam=np.zeros((1, 2, 2)))
    elif problem == "disagree":
        np.savez(path, maps=np.zeros((2, 2, 2)), classes=np.array([1]))
    elif problem == "classes":
        save_maps(path, np.zeros((1, 2, 2)), [7])
    expected = {"missing": "not found", "corrupt": "cannot read", "keys": "must hold",
                "disagree": "disagree", "classes": "outside the dataset's 5"}[problem]
    with pytest.raises(DataError, match=expected) as info:
        load_maps(path, num_classes=5)
    assert info.value.path == path


def test_read_npz_never_unpickles(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, affinity=np.array([{"a": 1}], dtype=object), grid=np.array([1, 1]))
    with pytest.raises(DataError, match="cannot read affinity file"):
        read_npz(path, ("affinity", "grid"), "affinity")


def test_mask_round_trip_and_unknown_labels(tmp_path):
    mask = np.array([[0, 1, 255], [2, 2, 0]], dtype=np.uint8)
    write_mask(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", num_classes=3), mask)
    with pytest.raises(DataError, match=r"labels \[2\] outside the 2 classes") as info:
        read_mask(tmp_path / "m.png", num_classes=2)
    assert info.value.path == tmp_path / "m.png"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_outputs_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_bytes_atomic(tmp_path / "a.json", b"{}")
        write_mask(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() gives: the reference
    finally:
        os.umask(old)
    for name in ("a.json", "m.png", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m.png", "plain"]  # no temporary left


def test_read_palette_of_a_palette_png_and_none_without(tmp_path):
    short = Image.fromarray(np.zeros((2, 2), np.uint8), mode="P")
    short.putpalette([128, 128, 128, 128, 0, 0])  # two colours, as some tools save them
    short.save(tmp_path / "p.png")
    palette = read_palette(tmp_path / "p.png")
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [128, 128, 128] and palette[1].tolist() == [128, 0, 0]
    np.testing.assert_array_equal(palette[2:], voc_palette()[2:])  # the rest: VOC's
    Image.fromarray(np.zeros((2, 2), np.uint8), mode="L").save(tmp_path / "grey.png")
    assert read_palette(tmp_path / "grey.png") is None
    assert read_palette(tmp_path / "missing.png") is None
