"""``wsss maps`` on images outside any dataset: zero-shot ImageNet localisation of the shared horses, a trained run
with class names, nested folders, and the errors a user meets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from wsss.cli.main import main
from wsss.cli.maps import TILE
from wsss.data.io import load_maps, read_image
from wsss.data.transforms import eval_transforms
from wsss.localize import localize
from wsss.models import create_model
from wsss.models.checkpoint import describe, save
from wsss.visualize import grid_cell, label_tile

HORSES = ["horse001", "horse002", "horse003", "horse004"]


def _horse_args(shared_data, vit_tiny_weights, out, *extra):
    images = [str(shared_data / "horses" / "JPEGImages" / f"{h}.jpg") for h in HORSES]
    return ["maps", *images, "--model", "vit_tiny_patch16_224", "--weights", str(vit_tiny_weights), "--out",
            str(out), "--device", "cpu", *extra]


def test_an_imagenet_classifier_localises_the_horse_zero_shot(shared_data, vit_tiny_weights, tmp_path):
    names = shared_data / "weights" / "imagenet_classes.txt"
    out = tmp_path / "out"
    assert main(_horse_args(shared_data, vit_tiny_weights, out, "--class-names", str(names), "--classes", "sorrel",
                            "--threshold", "0.3")) == 0
    inside, outside = [], []
    for horse in HORSES:
        maps, classes = load_maps(out / f"{horse}.npz")
        assert classes.tolist() == [339] and maps.shape[0] == 1
        mask = np.asarray(Image.open(shared_data / "horses" / "SegmentationClass" / f"{horse}.png"))
        assert maps.shape[1:] == mask.shape
        inside.append(maps[0][mask == 1].mean())
        outside.append(maps[0][mask == 0].mean())
        labels = np.asarray(Image.open(out / "labels" / f"{horse}.png"))
        assert set(np.unique(labels).tolist()) <= {0, 1} and labels.shape == mask.shape
        picture = np.asarray(Image.open(out / f"{horse}.png").convert("RGB"))
        assert picture.shape[0] >= 256 and picture.shape[1] >= 2 * 256  # the image and one heat map
        top, left = grid_cell(0, 2, TILE)  # then the label map, nearest neighbours in the legend's colours
        np.testing.assert_array_equal(picture[top:top + TILE, left:left + TILE], label_tile(labels, TILE))
        bar = picture[top:top + TILE, grid_cell(0, 3, TILE)[1]:]  # the colour bar on the right: jet's red at 1
        assert (bar == (np.asarray(colormaps["jet"](1.0)[:3]) * 255).round().astype(np.uint8)).all(-1).any()
    assert np.mean(inside) > 2 * np.mean(outside)  # the map is on the horse


def test_top_k_classes_and_class_indices(shared_data, vit_tiny_weights, tmp_path):
    assert main(_horse_args(shared_data, vit_tiny_weights, tmp_path / "top", "--top-k", "3")) == 0
    assert main(_horse_args(shared_data, vit_tiny_weights, tmp_path / "idx", "--classes", "339")) == 0
    model = create_model("vit_tiny_patch16_224", weights=vit_tiny_weights).eval()
    image = read_image(shared_data / "horses" / "JPEGImages" / "horse001.jpg")
    tensor, _ = eval_transforms(None, (0.5,) * 3, (0.5,) * 3)(image)
    expected = localize(model, tensor[None], [[339]], method="getam")[0].numpy()
    maps, classes = load_maps(tmp_path / "idx" / "horse001.npz")
    assert classes.tolist() == [339] and np.abs(maps - expected).max() < 2e-3  # float16 storage
    top, top_classes = load_maps(tmp_path / "top" / "horse001.npz")
    assert len(top_classes) == 3 and len(set(top_classes.tolist())) == 3 and top.shape[0] == 3
    with torch.no_grad():
        logits = model(torch.nn.functional.interpolate(tensor[None], size=(round(tensor.shape[1] / 16) * 16,
                                                                           round(tensor.shape[2] / 16) * 16),
                                                       mode="bilinear", align_corners=False))[0]
    assert top_classes.tolist() == logits.topk(3).indices.tolist()


def test_a_trained_run_with_class_names_on_nested_folders(shared_data, tmp_path):
    classes = (shared_data / "msrc" / "classes.txt").read_text().split()
    torch.manual_seed(0)
    model = create_model("vit_nano_patch16", num_classes=len(classes) - 1).eval()
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    save(path, model, describe(model, "vit_nano_patch16", classes, (0.5,) * 3, (0.5,) * 3, method="baseline"))
    photos = tmp_path / "photos"
    for sub, image_id in (("a", "10_10_s"), ("b/c", "12_34_s")):
        (photos / sub).mkdir(parents=True)
        (photos / sub / f"{image_id}.JPG").write_bytes((shared_data / "msrc" / "JPEGImages" /
                                                        f"{image_id}.jpg").read_bytes())
    out = tmp_path / "out"
    assert main(["maps", str(photos), "--checkpoint", str(path), "--classes", classes[1], classes[3], "--out",
                 str(out), "--method", "cam", "--device", "cpu"]) == 0
    for name in ("a/10_10_s", "b/c/12_34_s"):
        maps, got = load_maps(out / f"{name}.npz")
        assert got.tolist() == [0, 2] and maps.shape[0] == 2
        assert (out / f"{name}.png").is_file()


def test_bad_inputs_are_named(shared_data, vit_tiny_weights, tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(list(args)) == 2
        return capsys.readouterr().err

    model = ["--model", "vit_tiny_patch16_224", "--weights", str(vit_tiny_weights), "--out", str(tmp_path / "o")]
    horse = str(shared_data / "horses" / "JPEGImages" / "horse001.jpg")
    assert "no such image" in error("maps", str(tmp_path / "missing.jpg"), *model)
    (tmp_path / "empty").mkdir()
    assert "no images" in error("maps", str(tmp_path / "empty"), *model)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert "bad.jpg" in error("maps", str(bad), *model)
    assert "unknown class 'unicorn'" in error("maps", horse, *model, "--classes", "unicorn")
    assert "1000 outputs" in error("maps", horse, *model, "--class-names", str(shared_data / "msrc" / "classes.txt"))
    assert "--weights" in error("maps", horse, "--model", "vit_tiny_patch16_224", "--out", str(tmp_path / "o"))
