"""Command-line paths that had no test: ``wsss cam --start-layer`` and ``wsss pseudo --completion --saliency``,
run in-process through ``wsss.cli.main.main`` and checked against values computed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from random_classifier import save_random_classifier
from reference_maps import reference_maps
from wsss.cli.main import main
from wsss.data.io import load_maps, read_mask, save_maps, write_mask
from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)  # not the defaults: they must come from the checkpoint


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("cov") / "d", num_train=2, num_val=3, size=64, seed=5)


@pytest.fixture(scope="module")
def classifier(synth, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random nano ViT (weights pushed away from their initialisation) saved as a checkpoint of the dataset."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    model = save_random_classifier(path, VOCDataset(synth, "val"), 11, MEAN, STD)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cam_start_layer_maps_equal_the_reference(synth, classifier, tmp_path):
    path, state = classifier
    dataset = VOCDataset(synth, "val")
    runs = {}
    for start in (1, None):
        out = tmp_path / f"start_{start}"
        extra = [] if start is None else ["--start-layer", str(start)]
        assert main(["cam", "--checkpoint", str(path), "--data", str(synth), "--split", "val", "--method", "getam",
                     "--out", str(out), "--device", "cpu", "--map-resolution", "full", *extra]) == 0
        runs[start] = out
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    differs = 0.0
    for i, image_id in enumerate(dataset.ids):
        maps, labels = load_maps(runs[1] / f"{image_id}.npz")
        present = np.flatnonzero(dataset.labels(i) > 0)
        assert labels.tolist() == [dataset.classes.output_to_label(o) for o in present]
        image = (torch.from_numpy(dataset.load_image(i)).permute(2, 0, 1).float() / 255 - mean) / std
        ref = reference_maps(state, image[None], present.tolist(), "getam", num_heads=2, start_layer=1, patch=16)
        torch.testing.assert_close(torch.from_numpy(maps), ref, atol=2e-4, rtol=1e-3)
        default, _ = load_maps(runs[None] / f"{image_id}.npz")
        differs = max(differs, float(np.abs(default - maps).max()))
    assert differs > 0.05  # the flag reached the localiser: the default start layer (depth // 2 = 2) differs


def test_cam_start_layer_is_checked(synth, classifier, tmp_path, capsys):
    path, _ = classifier
    common = ["cam", "--checkpoint", str(path), "--data", str(synth), "--split", "val", "--device", "cpu"]
    assert main([*common, "--method", "getam", "--start-layer", "4", "--out", str(tmp_path / "a")]) == 2
    assert "--start-layer" in capsys.readouterr().err  # a 4-block model has blocks 0..3
    assert main([*common, "--method", "cam", "--start-layer", "1", "--out", str(tmp_path / "b")]) == 2
    assert "--start-layer" in capsys.readouterr().err  # CAM reads no blocks
    assert not list((tmp_path / "a").glob("*.npz")) and not list((tmp_path / "b").glob("*.npz"))


def test_pseudo_completion_with_saliency_by_hand(synth, tmp_path):
    """One class map: 1 on a square, 0 elsewhere (so the 90th percentile claims nothing); the saliency is a
    rectangle overlapping the square's right part. Label completion with the saliency: class on square and
    saliency, background on the square outside the saliency, ignore (255) on the saliency outside the square;
    without it: the square is the class and everything else background."""
    dataset = VOCDataset(synth, "val")
    maps_dir, saliency_dir = tmp_path / "maps", tmp_path / "saliency"
    for i, image_id in enumerate(dataset.ids):
        h, w = dataset.load_image(i).shape[:2]
        maps = np.zeros((1, h, w), np.float32)
        maps[0, 8:32, 8:32] = 1.0
        save_maps(maps_dir / f"{image_id}.npz", maps, [2 + i % 2])
        saliency = np.zeros((h, w), np.uint8)
        saliency[8:32, 20:56] = 1
        write_mask(saliency_dir / f"{image_id}.png", saliency)
    common = ["pseudo", "--maps", str(maps_dir), "--data", str(synth), "--split", "val", "--completion"]
    assert main([*common, "--saliency", str(saliency_dir), "--out", str(tmp_path / "with")]) == 0
    assert main([*common, "--out", str(tmp_path / "without")]) == 0
    for i, image_id in enumerate(dataset.ids):
        label = 2 + i % 2
        with_s = read_mask(tmp_path / "with" / f"{image_id}.png")
        without = read_mask(tmp_path / "without" / f"{image_id}.png")
        # Interior points of each region (the opening may move edges by a pixel).
        assert with_s[20, 26] == label and without[20, 26] == label  # square and salient
        assert with_s[20, 12] == 0 and without[20, 12] == label  # square, not salient: background
        assert with_s[20, 45] == 255 and without[20, 45] == 0  # salient, no class: ignored
        assert with_s[50, 50] == 0 and without[50, 50] == 0  # neither
        assert set(np.unique(with_s).tolist()) == {0, label, 255}
    # --saliency belongs to the completion rule.
    assert main(["pseudo", "--maps", str(maps_dir), "--data", str(synth), "--split", "val", "--threshold", "0.5",
                 "--saliency", str(saliency_dir), "--out", str(tmp_path / "bad")]) == 2
