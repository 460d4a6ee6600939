"""Pictures people read: the dataset's own palette, legends in the colours drawn, the heat maps' colour bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from wsss.data.io import voc_palette
from wsss.data.voc import VOCDataset
from wsss.visualize import (class_legend, colorize, colour_bar, grid_cell, label_tile,
                            labels_present, titled_grid)

# The first colours of CamVid's label PNGs (Sky, Building, Pole, Road): Sky is grey there, black in VOC's palette.
CAMVID = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128)]


def _camvid_like(root: Path) -> Path:
    """A two-image VOC-layout dataset without background whose masks carry CamVid's palette."""
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    (root / "classes.txt").write_text("Sky\nBuilding\nPole\nRoad\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    for image_id in ("a", "b"):
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        mask = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4, mode="P")
        mask.putpalette([v for colour in CAMVID for v in colour])
        mask.save(root / "SegmentationClass" / f"{image_id}.png")
    return root


def test_colorize_uses_the_datasets_own_palette(tmp_path):
    dataset = VOCDataset(_camvid_like(tmp_path / "camvid"), "val")
    palette = dataset.palette()
    labels = np.array([[0, 1], [3, 255]], np.uint8)
    drawn = colorize(labels, palette)
    assert drawn[0, 0].tolist() == [128, 128, 128]  # Sky, not VOC's black
    assert drawn[0, 1].tolist() == [128, 0, 0] and drawn[1, 0].tolist() == [128, 64, 128]
    assert drawn[1, 1].tolist() == voc_palette()[255].tolist()  # ignore: the palette leaves 255 to VOC's void
    assert colorize(labels)[0, 0].tolist() == [0, 0, 0]  # without a palette: VOC's
    # The legend's colours are the colours drawn, class by class.
    legend = class_legend(dataset.classes.names, palette=palette)
    assert [name for name, _ in legend] == ["Sky", "Building", "Pole", "Road", "no label / ignore"]
    for k, (_, colour) in enumerate(legend[:-1]):
        assert colour == tuple(colorize(np.array([[k]]), palette)[0, 0].tolist())
    assert legend[-1][1] == tuple(drawn[1, 1].tolist())
    assert [name for name, _ in class_legend(dataset.classes.names, False, palette, only=[3, 0])] == ["Sky", "Road"]


def test_the_shared_camvid_palette_draws_sky_grey(shared_data):
    dataset = VOCDataset(shared_data / "camvid", "val")
    assert dataset.classes.names[0] == "Sky"
    assert colorize(np.zeros((1, 1), np.uint8), dataset.palette())[0, 0].tolist() == [128, 128, 128]


def test_a_dataset_without_a_palette_keeps_vocs(tmp_path):
    root = _camvid_like(tmp_path / "grey")
    for image_id in ("a", "b"):
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(root / "SegmentationClass" / f"{image_id}.png")
    assert VOCDataset(root, "val").palette() is None


def test_label_tiles_hold_only_palette_colours_and_the_legend_shows_them(tmp_path):
    palette = VOCDataset(_camvid_like(tmp_path / "camvid"), "val").palette()
    labels = np.array([[0, 1, 1], [3, 3, 255]], np.uint8)
    tile = label_tile(labels, 60, palette)
    assert tile.shape == (60, 60, 3)
    assert {tuple(c) for c in tile.reshape(-1, 3).tolist()} == {CAMVID[0], CAMVID[1], CAMVID[3],
                                                                  tuple(voc_palette()[255].tolist())}
    assert labels_present(labels, np.array([[2]])) == [0, 1, 2, 3]
    legend = class_legend(["Sky", "Building", "Pole", "Road"], palette=palette, only=labels_present(labels))
    grid = titled_grid([[("labels", tile)]], tile=60, legend=legend)
    top, left = grid_cell(0, 0, 60)
    np.testing.assert_array_equal(grid[top:top + 60, left:left + 60], tile)
    below = grid[top + 60:]
    for name, colour in legend:  # every swatch is drawn in its colour, below the cells
        assert (below == colour).all(axis=-1).sum() >= 14 * 14, name


def test_colour_bar_runs_from_one_at_the_top_to_zero_at_the_bottom():
    bar = colour_bar(200, "map value")
    assert bar.shape[0] == 200 and bar.dtype == np.uint8
    strip = bar[:, 8]  # a column inside the colour strip
    spread = strip.max(axis=-1).astype(int) - strip.min(axis=-1)
    coloured = np.flatnonzero(spread > 60)  # jet's colours; the label's anti-aliased text is grey
    top, bottom = strip[coloured[0]], strip[coloured[-1]]
    jet = lambda v: (np.asarray(colormaps["jet"](v)[:3]) * 255).round().astype(np.uint8)  # noqa: E731
    np.testing.assert_array_equal(top, jet(1.0))
    np.testing.assert_array_equal(bottom, jet(0.0))
    assert coloured[-1] - coloured[0] > 150  # most of the height
    right = bar[:, 16 + 8:]
    assert (right < 128).any()  # the tick labels are written beside the strip
    with pytest.raises(ValueError, match="needs more than"):
        colour_bar(20)


def test_a_grid_with_a_colour_bar_puts_it_beside_the_rows():
    cell = np.zeros((50, 50, 3), np.uint8)
    plain = titled_grid([[("a", cell)]], tile=50)
    barred = titled_grid([[("a", cell)]], tile=50, colour_bar_label="map value")
    assert barred.shape[0] == plain.shape[0] and barred.shape[1] > plain.shape[1]
    np.testing.assert_array_equal(barred[:, :plain.shape[1]], plain)  # the cells stay where they were
    right = barred[:, plain.shape[1]:]
    red = (np.asarray(colormaps["jet"](1.0)[:3]) * 255).round().astype(np.uint8)
    assert (right == red).all(axis=-1).any()


def test_label_pngs_of_pseudo_and_predict_carry_the_datasets_palette(tmp_path):
    """A pseudo-label or prediction PNG opened in an image viewer shows the dataset's colours, not VOC's."""
    import torch

    from wsss.cli.main import main
    from wsss.data.io import read_mask, save_maps, write_mask
    from wsss.models import create_model
    from wsss.models.checkpoint import describe, save
    from wsss.models.segmenter import SegmentationModel

    root = _camvid_like(tmp_path / "camvid")
    for image_id in ("a", "b"):
        save_maps(tmp_path / "maps" / f"{image_id}.npz", np.random.default_rng(0).random((2, 8, 8)), [0, 3])
    assert main(["pseudo", "--maps", str(tmp_path / "maps"), "--data", str(root), "--split", "val", "--threshold",
                 "0.5", "--out", str(tmp_path / "pseudo")]) == 0
    torch.manual_seed(0)
    model = SegmentationModel(create_model("vit_nano_patch16", num_classes=0, img_size=(16, 16)), 4, dim=8)
    names = ["Sky", "Building", "Pole", "Road"]
    save(tmp_path / "seg.safetensors", model, describe(model, "vit_nano_patch16", names))
    assert main(["predict", "--checkpoint", str(tmp_path / "seg.safetensors"), "--data", str(root), "--split", "val",
                 "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    for folder in ("pseudo", "pred"):
        with Image.open(tmp_path / folder / "a.png") as im:
            assert im.mode == "P" and im.getpalette()[:12] == [v for colour in CAMVID for v in colour]
        assert read_mask(tmp_path / folder / "a.png").shape == (8, 8)
    write_mask(tmp_path / "voc.png", np.zeros((2, 2), np.uint8))  # no palette given: VOC's
    with Image.open(tmp_path / "voc.png") as im:
        assert im.getpalette()[:6] == voc_palette()[:2].reshape(-1).tolist()
    with pytest.raises(ValueError, match="256 RGB colours"):
        write_mask(tmp_path / "bad.png", np.zeros((2, 2), np.uint8), np.zeros((4, 3), np.uint8))
