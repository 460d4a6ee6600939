"""End to end through the CLI: train -> cam -> eval agrees with in-memory validation; the demo writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsss.cli.main import main
from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset
from wsss.evaluate import evaluate_split
from wsss.train.checkpoint import load_model
from wsss.train.validate import maps_miou


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = make_synthetic(root / "data", num_train=24, num_val=6, size=32, num_classes=3, seed=1)
    run = root / "run"
    assert main(["train", "--config", "demo", f"data.root={data}", f"run_dir={run}", "train.steps=6",
                 "data.batch_size=4", "data.num_workers=0", "data.transforms.crop=32", "model.name=vit_nano_patch16",
                 "train.ckpt_every=3", "train.log_every=2"]) == 0
    return data, run


def test_cam_then_eval_equals_in_memory_validation(trained, tmp_path):
    data, run = trained
    out = tmp_path / "maps"
    assert main(["cam", "--checkpoint", str(run), "--data", str(data), "--split", "val", "--method", "getam",
                 "--out", str(out), "--threshold", "0.3"]) == 0
    ids = VOCDataset(data, "val").ids
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(ids)
    from_files = evaluate_split(data, "val", out / "labels", progress=False)
    in_memory = maps_miou(load_model(run).eval(), VOCDataset(data, "val"), "getam", thresholds=(0.3, 0.305, 0.01))
    assert from_files["miou"] == pytest.approx(in_memory["miou"], abs=1e-6)
    swept = evaluate_split(data, "val", out, sweep=True, progress=False)
    assert swept["miou"] >= from_files["miou"] - 1e-9  # the sweep includes 0.30

    # A second run finds every image done and rewrites nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert main(["cam", "--checkpoint", str(run), "--data", str(data), "--split", "val", "--method", "getam",
                 "--out", str(out), "--threshold", "0.3"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == before


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


def test_demo_writes_report_and_results(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--num-train", "40", "--num-val", "4"]) == 0
    results = json.loads((out / "results.json").read_text())["methods"]
    assert set(results) == {"cam", "gradcam", "rollout", "getam", "acr", "aream"}
    for r in results.values():
        assert 0.0 <= r["miou"] <= 1.0
    report = (out / "report.md").read_text()
    assert all(f"overlay_{m}.png" in report for m in results)
    assert all((out / f"overlay_{m}.png").is_file() for m in results)
    # The table reports what an independent evaluation of the same model gives.
    model = load_model(out / "train" / "model.safetensors").eval()
    again = maps_miou(model, VOCDataset(out / "data", "val"), "rollout", scales=[2.0], flip=True)
    assert results["rollout"]["miou"] == pytest.approx(again["miou"], abs=1e-9)
    assert np.isfinite([r["seconds_per_image"] for r in results.values()]).all()
