"""``wsss affinity train|walk`` end to end on a tiny synthetic dataset: the engine trains the affinity objective, the
walk writes what the library computes, resumes from its manifest, and the other commands refuse the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.cli.main import main
from wsss.data.io import load_maps, read_mask, save_maps
from wsss.data.synth import make_synthetic
from wsss.data.transforms import eval_transforms
from wsss.data.voc import VOCDataset
from wsss.models import checkpoint
from wsss.pseudo.random_walk import WalkSettings, walk_label, walk_settings_of

TINY = ["model.name=vit_nano_patch16", "model.weights=null", "train.steps=6", "train.ckpt_every=3",
        "data.batch_size=2", "data.num_workers=0", "data.transforms.crop=96", "data.transforms.random_scale=null",
        "method.radius=3", "train.log_every=1", "device=cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("affinity")
    data = make_synthetic(tmp / "data", num_train=4, num_val=2, size=96, num_classes=2, seed=3)
    run = tmp / "run"
    # The true masks stand in for confident labels (data.mask_dir unset: SegmentationClass).
    assert main(["affinity", "train", "--config", "affinity_msrc", f"data.root={data}", f"run_dir={run}",
                 *TINY, "method.walk_beta=32"]) == 0
    maps_dir = tmp / "maps"
    dataset = VOCDataset(data, "train")
    rng = np.random.default_rng(0)
    for i, image_id in enumerate(dataset.ids):
        mask = dataset.load_mask(i)
        classes = sorted(int(c) for c in np.unique(mask) if c not in (0, 255))
        maps = np.stack([(mask == c) * 0.6 + rng.random(mask.shape) * 0.3 for c in classes]).astype(np.float32)
        save_maps(maps_dir / f"{image_id}.npz", maps, classes)
    return {"data": data, "run": run, "maps": maps_dir, "tmp": tmp}


def library_walk(trained: dict[str, Path], settings: WalkSettings, limit: int | None = None) -> dict[str, np.ndarray]:
    """What the library's walk_label gives for the first ``limit`` train images of the fixture, by image id."""
    model, spec = checkpoint.load(trained["run"])
    dataset = VOCDataset(trained["data"], "train")
    transform = eval_transforms(None, spec.mean, spec.std)
    out = {}
    for i, image_id in enumerate(dataset.ids[:limit]):
        image, _ = transform(dataset.load_image(i))
        maps, classes = load_maps(trained["maps"] / f"{image_id}.npz")
        out[image_id] = walk_label(model, image, torch.from_numpy(maps), classes, settings).numpy()
    return out


def test_train_writes_an_affinity_checkpoint_and_logs_psas_terms(trained):
    model, spec = checkpoint.load(trained["run"])
    assert spec.task == "affinity" and not spec.is_segmenter and spec.method == "affinity"
    assert spec.segmenter == {"decoder": "affinity", "radius": 3, "levels": [1, 2, 3]}
    rows = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 7))
    for row in rows:  # PSA's weighting of its three terms
        assert row["loss"] == pytest.approx(row["aff_bg"] / 4 + row["aff_fg"] / 4 + row["aff_neg"] / 2, rel=1e-5)


def test_walk_writes_the_library_labels_and_resumes(trained, capsys):
    out = trained["tmp"] / "walked"
    argv = ["affinity", "walk", "--checkpoint", str(trained["run"]), "--maps", str(trained["maps"]), "--data",
            str(trained["data"]), "--split", "train", "--out", str(out), "--beta", "4", "--logt", "3", "--device",
            "cpu"]
    assert main(argv) == 0
    assert "wrote 4 random-walk labels" in capsys.readouterr().out
    expected = library_walk(trained, WalkSettings(0.39, 4.0, 3))
    for image_id, labels in expected.items():
        assert np.array_equal(read_mask(out / f"{image_id}.png"), labels)
    settings = json.loads((out / "wsss-manifest.json").read_text())["settings"]
    assert (settings["beta"], settings["log_steps"], settings["background"]) == (4.0, 3, 0.39)
    assert main(argv) == 0
    assert "wrote 0 random-walk labels" in capsys.readouterr().out
    assert main(argv[:-6] + ["--beta", "8", "--device", "cpu"]) == 2  # other settings: refused without --overwrite


def test_walk_defaults_to_the_walk_the_run_records(trained, capsys):
    """The run records walk_beta 32 (and affinity_msrc's walk_log_steps 6): without --beta/--logt the walk uses
    them, not PSA's beta 8."""
    out = trained["tmp"] / "walked_default"
    assert main(["affinity", "walk", "--checkpoint", str(trained["run"]), "--maps", str(trained["maps"]), "--data",
                 str(trained["data"]), "--split", "train", "--out", str(out), "--limit", "1", "--device", "cpu"]) == 0
    settings = json.loads((out / "wsss-manifest.json").read_text())["settings"]
    assert (settings["beta"], settings["log_steps"]) == (32.0, 6)
    image_id, labels = next(iter(library_walk(trained, WalkSettings(0.39, 32.0, 6), limit=1).items()))
    assert np.array_equal(read_mask(out / f"{image_id}.png"), labels)


def test_walk_settings_of_a_run_fall_back_to_psa_and_yield_to_explicit_values():
    assert walk_settings_of({"method": {"name": "affinity"}}, 0.3) == WalkSettings(0.3, 8.0, 6)  # an older run
    assert walk_settings_of(None) == WalkSettings()
    recorded = {"method": {"walk_beta": 32, "walk_log_steps": 4}}
    assert walk_settings_of(recorded, 0.2) == WalkSettings(0.2, 32.0, 4)
    assert walk_settings_of(recorded, 0.2, beta=2.0, log_steps=1) == WalkSettings(0.2, 2.0, 1)


def test_other_commands_refuse_an_affinitynet(trained, capsys):
    common = ["--data", str(trained["data"]), "--split", "val", "--device", "cpu"]
    assert main(["predict", "--checkpoint", str(trained["run"]), "--out", str(trained["tmp"] / "p"), *common]) == 2
    assert "affinity model" in capsys.readouterr().err
    assert main(["cam", "--checkpoint", str(trained["run"]), "--out", str(trained["tmp"] / "c"), *common]) == 2
    assert "no classifier to localise" in capsys.readouterr().err


def test_train_refuses_another_objective_and_walk_a_classifier(trained, tmp_path, capsys):
    assert main(["affinity", "train", "--config", "baseline_msrc", f"data.root={trained['data']}"]) == 2
    assert "trains the affinity objective" in capsys.readouterr().err
    from wsss.models import create_model
    from wsss.models.checkpoint import describe, save

    vit = create_model("vit_nano_patch16", num_classes=2)
    save(tmp_path / "cls.safetensors", vit, describe(vit, "vit_nano_patch16", ["background", "a", "b"]))
    assert main(["affinity", "walk", "--checkpoint", str(tmp_path / "cls.safetensors"), "--maps", str(trained["maps"]),
                 "--data", str(trained["data"]), "--split", "train", "--out", str(tmp_path / "w")]) == 2
    assert "not an AffinityNet" in capsys.readouterr().err


def test_a_crop_too_small_for_the_radius_is_a_config_error(trained, tmp_path, capsys):
    argv = ["affinity", "train", "--config", "affinity_msrc", f"data.root={trained['data']}",
            f"run_dir={tmp_path / 'small'}", *TINY, "data.transforms.crop=64"]
    assert main(argv) == 2
    assert "too small for pairs within method.radius=3" in capsys.readouterr().err


def test_an_image_too_small_for_the_radius_is_a_data_error_naming_it(tmp_path):
    from wsss.errors import DataError
    from wsss.models import create_model
    from wsss.models.affinitynet import ViTAffinityNet
    from wsss.pseudo.random_walk import walk_split

    data = make_synthetic(tmp_path / "data", num_train=1, num_val=1, size=32, num_classes=2, seed=0)
    dataset = VOCDataset(data, "train")
    save_maps(tmp_path / "maps" / f"{dataset.ids[0]}.npz", np.zeros((0, 32, 32), np.float32), [])
    net = ViTAffinityNet(create_model("vit_nano_patch16", num_classes=1), radius=5)
    with pytest.raises(DataError, match=r"train_00000\.jpg: a 2x2 feature map is too small"):
        walk_split(net, dataset, tmp_path / "maps", tmp_path / "out", progress=False)
