"""The synthetic dataset: determinism, exact masks, context bias, and reading it back."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli import synth as synth_cli
from wsss.data.synth import (
    BACKGROUNDS,
    SHAPES,
    class_names,
    make_synthetic,
    preferred_background,
    render_scene,
    shape_mask,
)
from wsss.data.voc import VOCDataset
from wsss.errors import ConfigError


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth") / "d", num_train=30, num_val=6, size=64, seed=5)


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------- independent scalar geometry reference


def _in_polygon(x: float, y: float, vertices: list[tuple[float, float]]) -> bool:
    """Point in a convex counter-clockwise polygon, by the sign of edge cross products."""
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) < 0:
            return False
    return True


def _regular(n: int, radius: float, start: float) -> list[tuple[float, float]]:
    angles = [start + 2 * math.pi * k / n for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _inside(shape: str, u: float, v: float) -> bool:
    """Whether the point (u, v), in the object's frame and radius units, lies in the shape."""
    rho = math.hypot(u, v)
    if shape == "disc":
        return rho <= 1.0
    if shape == "square":
        return _in_polygon(u, v, [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    if shape == "triangle":  # inradius 0.6 -> circumradius 1.2, a vertex pointing to -v
        return _in_polygon(u, v, _regular(3, 1.2, -math.pi / 2))
    if shape == "cross":
        return (abs(u) <= 0.33 and abs(v) <= 1.0) or (abs(v) <= 0.33 and abs(u) <= 1.0)
    if shape == "ring":
        return 0.55 <= rho <= 1.0
    if shape == "diamond":
        return _in_polygon(u, v, [(1.1, 0.0), (0.0, 1.1), (-1.1, 0.0), (0.0, -1.1)])
    if shape == "star":
        return rho <= 0.65 + 0.35 * math.cos(5 * math.atan2(v, u))
    if shape == "hexagon":  # apothem 0.87 -> circumradius 0.87 / cos(30 deg), vertices at 30 + 60k deg
        return _in_polygon(u, v, _regular(6, 0.87 / math.cos(math.pi / 6), math.pi / 6))
    raise AssertionError(shape)


def _reference_mask(size: int, objects: list[dict]) -> np.ndarray:
    """Paint the objects in order, pixel by pixel."""
    mask = np.zeros((size, size), np.uint8)
    for obj in objects:
        c, s = math.cos(obj["angle"]), math.sin(obj["angle"])
        for row in range(size):
            for col in range(size):
                x, y = col + 0.5 - obj["cx"], row + 0.5 - obj["cy"]
                u, v = (c * x + s * y) / obj["radius"], (-s * x + c * y) / obj["radius"]
                if _inside(obj["shape"], u, v):
                    mask[row, col] = obj["label"]
    return mask


# --------------------------------------------------------------------------------------------------- tests


def test_layout_and_class_list(small_synth):
    assert (small_synth / "classes.txt").read_text().split() == ["background"] + class_names(4)[1:]
    assert class_names(4)[0] == "background" and len(set(class_names(24))) == 25
    train = (small_synth / "ImageSets/Segmentation/train.txt").read_text().split()
    assert train == [f"train_{i:05d}" for i in range(30)]
    assert len((small_synth / "ImageSets/Segmentation/val.txt").read_text().split()) == 6
    with Image.open(small_synth / "JPEGImages/train_00000.jpg") as im:
        assert im.format == "JPEG" and im.size == (64, 64)
    with Image.open(small_synth / "SegmentationClass/train_00000.png") as im:
        assert im.mode == "P"


def test_same_seed_same_bytes_and_image_independent_of_counts(tmp_path, small_synth):
    again = make_synthetic(tmp_path / "again", num_train=30, num_val=6, size=64, seed=5)
    assert _all_files(again) == _all_files(small_synth)
    other = make_synthetic(tmp_path / "other", num_train=4, num_val=0, size=64, seed=6)
    assert (other / "JPEGImages/train_00000.jpg").read_bytes() != (again / "JPEGImages/train_00000.jpg").read_bytes()
    assert not (other / "ImageSets/Segmentation/val.txt").exists()
    fewer = make_synthetic(tmp_path / "fewer", num_train=4, num_val=0, size=64, seed=5)
    for name in ("JPEGImages/train_00003.jpg", "SegmentationClass/train_00003.png"):
        assert (fewer / name).read_bytes() == (again / name).read_bytes()


def test_masks_match_recorded_geometry_pixel_by_pixel(small_synth):
    meta = json.loads((small_synth / "synth.json").read_text())
    shapes_seen = set()
    for image_id in ["train_00000", "train_00007", "train_00012", "train_00021", "val_00003"]:
        objects = meta["images"][image_id]["objects"]
        shapes_seen.update(o["shape"] for o in objects)
        mask = np.asarray(Image.open(small_synth / "SegmentationClass" / f"{image_id}.png"))
        expected = _reference_mask(64, objects)
        assert int((mask != expected).sum()) == 0, image_id
        assert {o["label"] for o in objects} >= set(np.unique(mask)) - {0}
    assert len(shapes_seen) >= 3


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_area_matches_formula(shape):
    r = 100.0
    areas = {  # in units of r^2
        "disc": math.pi,
        "square": 1.6**2,
        "triangle": 3 * math.sqrt(3) * 0.6**2,
        "cross": 2 * (2.0 * 0.66) - 0.66**2,
        "ring": math.pi * (1 - 0.55**2),
        "diamond": 2 * 1.1**2,
        "star": math.pi * (0.65**2 + 0.35**2 / 2),
        "hexagon": 2 * math.sqrt(3) * 0.87**2,
    }
    area = shape_mask(shape, 300, 300, 150.0, 150.0, r, 0.3).sum()
    assert area == pytest.approx(areas[shape] * r * r, rel=0.01)
    # Spot check against the scalar reference on a coarse grid.
    small = shape_mask(shape, 24, 24, 12.3, 11.7, 9.0, 1.1)
    ref = _reference_mask(24, [{"label": 1, "shape": shape, "cy": 12.3, "cx": 11.7, "radius": 9.0, "angle": 1.1}])
    assert np.array_equal(small.astype(np.uint8), ref)


def test_objects_look_different_from_their_background(small_synth):
    distances = []
    for i in range(0, 30, 3):
        image = np.asarray(Image.open(small_synth / f"JPEGImages/train_{i:05d}.jpg")).astype(np.float64) / 255
        mask = np.asarray(Image.open(small_synth / f"SegmentationClass/train_{i:05d}.png"))
        background = image[mask == 0]
        for label in set(np.unique(mask)) - {0}:
            inside = image[mask == label]
            # Objects mix two colours; compare the mean colour and the brighter-channel spread.
            distances.append(np.abs(inside.mean(0) - background.mean(0)).max())
    assert min(distances) > 0.08 and np.median(distances) > 0.2


def test_context_bias_is_present():
    firsts, present = [], {k: [] for k in range(1, 5)}
    for i in range(300):
        _, mask, info = render_scene(np.random.default_rng([9, i]), 32, 4, bias=0.8)
        labels = [o["label"] for o in info["objects"]]
        firsts.append(info["background"] == preferred_background(labels[0]))
        for label in set(labels):
            present[label].append(info["background"] == preferred_background(label))
    assert 0.72 <= np.mean(firsts) <= 0.88
    for label, hits in present.items():
        # Chance level is 1/4; a second object of another class cannot share the scene, so it stays below 0.8.
        assert 0.4 < np.mean(hits) < 0.8, label
    assert {preferred_background(k) for k in range(1, 5)} == set(BACKGROUNDS)
    unbiased = [render_scene(np.random.default_rng([9, i]), 32, 4, bias=0.0)[2] for i in range(40)]
    assert not any(u["background"] == preferred_background(u["objects"][0]["label"]) for u in unbiased)


def test_read_back_with_voc_dataset(small_synth):
    ds = VOCDataset(small_synth, "train")
    meta = json.loads((small_synth / "synth.json").read_text())
    assert ds.classes.num_fg == 4 and ds.classes.has_background and ds.has_masks
    multi = 0
    for i in range(len(ds)):
        mask = np.asarray(Image.open(ds.mask_path(ds.ids[i])))
        visible = sorted(set(np.unique(mask).tolist()) - {0})
        assert np.nonzero(ds.labels(i))[0].tolist() == [k - 1 for k in visible]
        assert set(visible) <= {o["label"] for o in meta["images"][ds.ids[i]]["objects"]}
        multi += len(visible) > 1
    assert multi >= 5  # several images hold more than one class
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["label"].tolist() == ds.labels(0).tolist()
    fractions = [float((np.asarray(Image.open(ds.mask_path(i))) > 0).mean()) for i in ds.ids]
    assert 0.05 < np.mean(fractions) < 0.5  # objects are reasonably large, not the whole image


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["synth", "--out", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--size", "32",
         "--classes", "6", "--seed", "1", "--png"]
    )
    assert args.func(args) == 0
    assert "3 train and 2 val" in capsys.readouterr().out
    assert (tmp_path / "cli/JPEGImages/val_00001.png").is_file()
    assert len((tmp_path / "cli/classes.txt").read_text().split()) == 7
    bad = parser.parse_args(["synth", "--out", str(tmp_path / "bad"), "--classes", "0"])
    with pytest.raises(ConfigError, match="num_classes"):
        bad.func(bad)


def test_parts_and_plain_are_off_by_default_and_draw_nothing_extra():
    """At 0 the new options consume no random numbers: the images are those of the generator without them."""
    for i in range(5):
        a = render_scene(np.random.default_rng([4, i]), 48, 4)
        b = render_scene(np.random.default_rng([4, i]), 48, 4, parts=0.0, plain=0.0)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_shared_part_is_labelled_as_the_object_and_painted_the_same_for_every_class():
    from wsss.data.synth import SHARED_PART, _object_frame

    seen = set()
    for i in range(30):
        image, mask, info = render_scene(np.random.default_rng([7, i]), 96, 4, max_objects=1, parts=0.4)
        obj = info["objects"][0]
        inside = shape_mask(obj["shape"], 96, 96, obj["cy"], obj["cx"], obj["radius"], obj["angle"])
        u, _ = _object_frame(96, 96, obj["cy"], obj["cx"], obj["radius"], obj["angle"])
        shared = inside & (u > 1.0 - 2 * 0.4)
        assert np.all(mask[inside] == obj["label"])  # the mask covers both parts
        if shared.sum() < 20:
            continue
        # The shared part is drawn in the two shared colours (up to the image noise), whatever the class.
        pixels = image[shared].astype(float)
        dist = np.minimum(*(np.abs(pixels - np.array(c)).max(axis=1) for c in SHARED_PART))
        assert np.mean(dist < 25) > 0.9
        seen.add(obj["label"])
    assert len(seen) >= 3


def test_plain_backgrounds():
    scenes = [render_scene(np.random.default_rng([8, i]), 48, 4, plain=1.0) for i in range(6)]
    for image, mask, info in scenes:
        assert info["background"] == "plain"
        background = image[mask == 0].astype(float)
        assert background.std(axis=0).max() < 8  # nearly uniform (noise only)
    with pytest.raises(ConfigError, match="parts"):
        make_synthetic("/nonexistent", num_train=1, num_val=0, parts=1.0)
