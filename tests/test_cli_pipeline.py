"""End to end through the CLI: train -> cam -> eval agrees with in-memory validation; the normalisation and classes
come from the checkpoint; the demo writes its report."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from wsss.cli.main import main
from wsss.data.io import load_maps
from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset
from wsss.evaluate import evaluate_split
from wsss.methods import REGISTRY
from wsss.models import checkpoint
from wsss.train.validate import maps_miou

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = make_synthetic(root / "data", num_train=24, num_val=6, size=32, num_classes=3, seed=1)
    run = root / "run"
    assert main(["train", "--config", "baseline_demo", f"data.root={data}", f"run_dir={run}", "train.steps=6",
                 "data.batch_size=4", "data.num_workers=0", "data.transforms.crop=32", "model.name=vit_nano_patch16",
                 "train.ckpt_every=3", "train.log_every=2"]) == 0
    return data, run


@pytest.fixture(scope="module")
def trained_imagenet(trained, tmp_path_factory):
    """The same tiny run, trained with ImageNet statistics."""
    data, _ = trained
    run = tmp_path_factory.mktemp("imagenet") / "run"
    assert main(["train", "--config", "baseline_demo", f"data.root={data}", f"run_dir={run}", "train.steps=2",
                 "data.batch_size=4", "data.num_workers=0", "data.transforms.crop=32", "model.name=vit_nano_patch16",
                 f"data.transforms.mean={IMAGENET_MEAN}", f"data.transforms.std={IMAGENET_STD}"]) == 0
    return data, run


def _maps(folder) -> dict:
    return {p.stem: load_maps(p)[0] for p in sorted(folder.glob("*.npz"))}


def test_cam_then_eval_equals_in_memory_validation(trained, tmp_path):
    data, run = trained
    out = tmp_path / "maps"
    assert main(["cam", "--checkpoint", str(run), "--data", str(data), "--split", "val", "--method", "getam",
                 "--out", str(out), "--threshold", "0.3"]) == 0
    ids = VOCDataset(data, "val").ids
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(ids)
    from_files = evaluate_split(data, "val", out / "labels", progress=False)
    model, _ = checkpoint.load(run)
    in_memory = maps_miou(model, VOCDataset(data, "val"), "getam", thresholds=(0.3, 0.305, 0.01))
    assert from_files["miou"] == pytest.approx(in_memory["miou"], abs=1e-6)
    swept = evaluate_split(data, "val", out, sweep=True, progress=False)
    # The sweep includes 0.30; it reads the float16 maps of the .npz files, the labels came from the float32 maps,
    # so a pixel within float16 rounding of the threshold may flip.
    assert swept["miou"] >= from_files["miou"] - 1e-3

    # A second run finds every image done and rewrites nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert main(["cam", "--checkpoint", str(run), "--data", str(data), "--split", "val", "--method", "getam",
                 "--out", str(out), "--threshold", "0.3"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == before


def test_cam_takes_the_normalisation_from_the_checkpoint(trained_imagenet, tmp_path, caplog):
    data, run = trained_imagenet
    spec = checkpoint.read_spec(run)
    assert list(spec.mean) == pytest.approx(IMAGENET_MEAN) and list(spec.std) == pytest.approx(IMAGENET_STD)
    common = ["cam", "--checkpoint", str(run), "--data", str(data), "--split", "val", "--method", "cam",
              "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "spec")]) == 0
    explicit = ["--mean", *map(str, IMAGENET_MEAN), "--std", *map(str, IMAGENET_STD)]
    with caplog.at_level(logging.WARNING):
        assert main([*common, "--out", str(tmp_path / "flags"), *explicit]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    from_spec, from_flags = _maps(tmp_path / "spec"), _maps(tmp_path / "flags")
    assert from_spec.keys() == from_flags.keys() and len(from_spec) == 6
    assert all(np.array_equal(from_spec[k], from_flags[k]) for k in from_spec)

    # A contradicting flag is used, with a warning that names both values.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*common, "--out", str(tmp_path / "half"), "--mean", "0.5", "0.5", "0.5", "--limit", "2"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "--mean 0.5 0.5 0.5 contradicts the checkpoint's mean 0.485 0.456 0.406" in warnings[0]
    assert "using the flag" in warnings[0]
    half = _maps(tmp_path / "half")
    assert len(half) == 2  # --limit: the first two images of the split
    assert any(not np.array_equal(half[k], from_spec[k]) for k in half)


def test_cam_localises_the_encoder_of_a_segmentation_checkpoint(trained, tmp_path, capsys):
    data, _ = trained
    tiny = [f"data.root={data}", "train.steps=2", "data.batch_size=2", "data.num_workers=0", "data.transforms.crop=32",
            "model.name=vit_nano_patch16", "data.transforms.random_scale=null", "method.dim=16"]
    getam_run = tmp_path / "getam"  # GETAM trains the classifier together with a decoder
    assert main(["train", "--config", "getam_camvid", f"run_dir={getam_run}", *tiny, "method.cls_steps=1",
                 "method.start_layer=2"]) == 0
    out = tmp_path / "maps"
    assert main(["cam", "--checkpoint", str(getam_run), "--data", str(data), "--split", "val", "--method", "getam",
                 "--out", str(out), "--limit", "2", "--device", "cpu", "--map-resolution", "full"]) == 0
    model, spec = checkpoint.load(getam_run)
    assert spec.is_segmenter
    val = VOCDataset(data, "val")
    from wsss.localize.split import iter_split_maps

    expected = dict((i, m) for i, m, _ in iter_split_maps(model.encoder, val, "getam", indices=[0, 1]))
    got = _maps(out)
    assert got.keys() == expected.keys()
    assert all(np.allclose(got[k], expected[k], atol=1e-3) for k in got)  # stored as float16

    seg_run = tmp_path / "seg"  # the segmentation stage trains no classifier: nothing to localise
    assert main(["train", "--config", "segment_camvid", f"run_dir={seg_run}", *tiny]) == 0
    assert main(["cam", "--checkpoint", str(seg_run), "--data", str(data), "--split", "val", "--out",
                 str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert "no classifier" in capsys.readouterr().err


def test_cam_start_layer_out_of_range_is_a_config_error(trained, tmp_path, capsys):
    data, run = trained
    common = ["cam", "--checkpoint", str(run), "--data", str(data), "--split", "val", "--out", str(tmp_path / "o")]
    assert main([*common, "--method", "getam", "--start-layer", "99"]) == 2
    assert "--start-layer" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main([*common, "--method", "cam", "--start-layer", "1"]) == 2
    assert "acr, getam" in capsys.readouterr().err


def test_eval_names_a_missing_prediction(trained, tmp_path, capsys):
    data, _ = trained
    (tmp_path / "pred").mkdir()
    assert main(["eval", "--data", str(data), "--split", "val", "--pred", str(tmp_path / "pred")]) == 2
    assert "val_00000" in capsys.readouterr().err


def test_cam_rejects_a_checkpoint_of_another_dataset(trained, tmp_path, capsys):
    _, run = trained
    other = make_synthetic(tmp_path / "other", num_train=2, num_val=2, size=32, num_classes=5, seed=2)
    code = main(["cam", "--checkpoint", str(run), "--data", str(other), "--split", "val", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "classes" in capsys.readouterr().err


def test_demo_runs_the_pipeline_and_writes_report_and_results(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--num-train", "40", "--num-val", "4"]) == 0
    payload = json.loads((out / "results.json").read_text())
    results = payload["methods"]
    # The demo's token-head model has no per-class tokens, so the mctformer map is the one left out.
    assert set(results) == set(REGISTRY.maps()) - {"mctformer"} >= {"cam", "gradcam", "rollout", "getam", "acr", "aream"}
    for r in results.values():
        assert 0.0 <= r["miou"] <= 1.0
    pipeline = payload["pipeline"]
    assert set(pipeline["methods"]) == {"baseline", "acr", "aream", "getam"}
    for row in pipeline["methods"].values():
        assert 0.0 <= row["seed_train"] <= 1.0 and 0.0 <= row["seed_eval"] <= 1.0
        assert 0.0 <= row["pseudo_train"]["miou"] <= 1.0 and 0.0 < row["pseudo_train"]["coverage"] <= 1.0
    best = pipeline["settings"]["segmented"]
    assert 0.0 <= pipeline["methods"][best]["segment_eval"] <= 1.0
    # The paper methods continued from the baseline's classifier: same architecture, different weights.
    base, _ = checkpoint.load(out / "runs" / "baseline" / "train")
    acr, _ = checkpoint.load(out / "runs" / "acr" / "train")
    assert not torch.equal(base.blocks[0].attn.qkv.weight, acr.blocks[0].attn.qkv.weight)
    # The table reports what an independent evaluation of the same model gives.
    again = maps_miou(base, VOCDataset(out / "data", "val"), "rollout", scales=[2.0], flip=False)
    assert results["rollout"]["miou"] == pytest.approx(again["miou"], abs=1e-9)
    assert results["cam"]["miou"] == pipeline["maps"]["baseline"]["cam"] == pipeline["methods"]["baseline"]["seed_eval"]
    report = (out / "report.md").read_text()
    for picture in ["maps_baseline.png", "maps_acr.png", "maps_aream.png", "maps_getam.png", "pseudo_labels.png",
                    "segmentation.png"]:
        assert f"]({picture})" in report and (out / picture).is_file()
    assert "## Next" in report and "wsss pseudo --method" in report
    # Every tile is at least 192 px: the picture of 3 rows is taller than 3 tiles.
    from PIL import Image

    assert Image.open(out / "maps_baseline.png").size[1] > 3 * 192
    from wsss.visualize import grid_cell, label_tile

    # The pseudo-label picture: the ground truth of the first train image, in the palette, nearest neighbours.
    labels_picture = np.asarray(Image.open(out / "pseudo_labels.png").convert("RGB"))
    top, left = grid_cell(0, 1)
    np.testing.assert_array_equal(labels_picture[top:top + 192, left:left + 192],
                                  label_tile(VOCDataset(out / "data", "train").load_mask(0), 192))
    # A rerun resumes (nothing to do); other settings in the same folder are refused.
    assert main(["demo", "--out", str(out), "--steps", "3", "--num-train", "40", "--num-val", "4"]) == 0
    assert main(["demo", "--out", str(out), "--steps", "5", "--num-train", "40", "--num-val", "4"]) == 2
