"""A fourth method registered from this file alone: its map appears in ``wsss cam --help``, it trains with
``wsss train`` and ``benchmarks/pipeline.py`` scores it, without any other file changing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import Field
from torch import Tensor

import wsss.pipeline as wsss_pipeline
from wsss.cli.main import main
from wsss.data.io import read_mask
from wsss.data.synth import make_synthetic
from wsss.localize import Localizer
from wsss.localize.cam import class_activation
from wsss.methods import REGISTRY, Method, MethodOptions, PseudoRecipe, get_method, register_method, unregister_method
from wsss.models import Capture
from wsss.train.losses import classification_loss

REPO = Path(__file__).resolve().parents[1]


class SquaredCAM(Localizer):
    """A toy formula: the rectified CAM, squared (sharper than the CAM, and easy to check by hand)."""

    def token_maps(self, images: Tensor, classes: Tensor) -> Tensor:
        out = self.model(images, capture=Capture())
        return class_activation(self.model, out, classes).relu().square().unflatten(2, out.grid)


class ToyOptions(MethodOptions):
    weight: float = Field(1.0, gt=0.0)


class ToyObjective:
    """Classification scaled by ``weight`` (enough to show the options reach the objective)."""

    def __init__(self, options: ToyOptions, **_):
        self.weight = options.weight

    def __call__(self, model, batch, step):
        loss, logs = classification_loss(model(batch["image"], capture=Capture()), batch["label"])
        return self.weight * loss, logs


TINY_RUN = """
model: {name: vit_nano_patch16, head: conv}
data: {batch_size: 8, num_workers: 0, transforms: {crop: 64, hflip: true}}
optim: {lr: 1.0e-3, warmup_steps: 0}
train: {steps: 4, log_every: 2, ckpt_every: 0}
val: {method: METHOD, scales: [1.0], flip: false}
"""


@pytest.fixture()
def toy_method(tmp_path):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "toy_tiny.yaml").write_text(TINY_RUN.replace("METHOD", "squared_cam")
                                           + "method: {name: toy, weight: 2.0}\n")
    (presets / "segment_tiny.yaml").write_text(TINY_RUN.replace("METHOD", "cam").replace("head: conv", "head: token")
                                               + "method: {name: segmentation, dim: 16}\n")
    method = register_method(Method(name="toy", summary="a toy method registered by a test",
                                    maps={"squared_cam": SquaredCAM}, own_map="squared_cam", objective=ToyObjective,
                                    options=ToyOptions, presets=presets,
                                    pseudo=PseudoRecipe(rule="threshold", params={"bg_threshold": 0.3})))
    yield method
    unregister_method("toy")


@pytest.fixture(scope="module")
def benchmarks():
    """The benchmark scripts (``benchmarks/*.py``, run by hand, not a package), imported from their folder."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import pipeline
        import recipe_ablation
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return SimpleNamespace(pipeline=pipeline, recipe_ablation=recipe_ablation)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, size=64, num_train=16, num_val=8, num_classes=3, seed=0)
    return root


def test_registered_method_is_everywhere(toy_method, capsys):
    assert get_method("toy") is toy_method
    assert REGISTRY.localizer("squared_cam") is SquaredCAM
    with pytest.raises(SystemExit):
        main(["cam", "--help"])
    assert "squared_cam" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method(name="other", summary="clashes", maps={"squared_cam": SquaredCAM}))


def test_registered_method_trains_with_wsss_train(toy_method, synthetic, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--config", "toy_tiny", f"data.root={synthetic}", f"run_dir={run}"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The objective doubles the classification loss: its options reached it.
    assert metrics[-1]["loss"] == pytest.approx(2 * metrics[-1]["cls"], rel=1e-4)
    from wsss.models.checkpoint import read_spec

    spec = read_spec(run)
    assert spec.method == "toy" and spec.config["method"] == {"name": "toy", "weight": 2.0}
    # A bad option value is refused (exit 2, a ConfigError) before training starts.
    assert main(["train", "--config", "toy_tiny", f"data.root={synthetic}", f"run_dir={tmp_path / 'bad'}",
                 "method.weight=-1"]) == 2
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_registered_method_is_scored_by_the_pipeline(benchmarks, toy_method, synthetic, tmp_path):
    pipeline = benchmarks.pipeline
    out = tmp_path / "pipeline.json"
    argv = ["--data", str(synthetic), "--train-split", "train", "--eval-split", "val", "--methods", "toy",
            "--recipe", "tiny", "--weights", "none", "--maps", "cam", "squared_cam", "--run-root",
            str(tmp_path / "runs"), "--out", str(out)]
    assert pipeline.main(argv) == 0
    result = json.loads(out.read_text())
    toy = result["methods"]["toy"]
    for key in ("seed_train", "seed_eval", "segment_eval"):
        assert 0.0 <= toy[key] <= 1.0
    assert 0.0 <= toy["pseudo_train"]["miou"] <= 1.0 and 0.0 < toy["pseudo_train"]["coverage"] <= 1.0
    assert set(result["maps"]["toy"]) == {"cam", "squared_cam"}
    assert toy["seed_eval"] == result["maps"]["toy"]["squared_cam"]
    assert set(result["priors"]) == {"centre", "mean_mask"} and 0 <= result["supervised"]["segment_eval"] <= 1
    # Every stage is kept: a resumed run recomputes nothing and gives the same numbers.
    assert pipeline.main(argv + ["--resume"]) == 0
    again = json.loads(out.read_text())
    assert again["methods"] == result["methods"] and again["maps"] == result["maps"]


def test_pipeline_tests_segmentation_the_papers_way_on_resume(benchmarks, toy_method, synthetic, tmp_path):
    """``--segment-scales/--segment-flip/--segment-crf`` add ``segment_eval_test`` to a finished run without
    training again, equal to ``wsss predict`` + ``wsss eval`` with the same views and CRF."""
    pipeline = benchmarks.pipeline
    out, runs = tmp_path / "pipeline.json", tmp_path / "runs"
    argv = ["--data", str(synthetic), "--train-split", "train", "--eval-split", "val", "--methods", "toy",
            "--recipe", "tiny", "--weights", "none", "--maps", "cam", "--run-root", str(runs), "--out", str(out)]
    assert pipeline.main(argv) == 0
    first = json.loads(out.read_text())
    model_file = runs / "toy" / "segment" / "model.safetensors"
    trained_at = model_file.stat().st_mtime_ns

    # One view and no CRF is the protocol segment_eval already used: the reloaded model scores the same.
    assert pipeline.main(argv + ["--resume", "--segment-scales", "1"]) == 0
    same = json.loads(out.read_text())
    assert same["methods"]["toy"]["segment_eval_test"] == pytest.approx(first["methods"]["toy"]["segment_eval"])
    assert same["supervised"]["segment_eval_test"] == pytest.approx(first["supervised"]["segment_eval"])

    assert pipeline.main(argv + ["--resume", "--segment-scales", "0.75", "1", "--segment-flip",
                                 "--segment-crf", "psa"]) == 0
    tested = json.loads(out.read_text())
    assert model_file.stat().st_mtime_ns == trained_at  # scored, not trained again
    assert tested["settings"]["segment_test"] == {"scales": [0.75, 1.0], "flip": True, "crf": "psa",
                                                   "fusion": "mean"}
    toy = tested["methods"]["toy"]
    assert toy["segment_eval"] == first["methods"]["toy"]["segment_eval"]
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(runs / "toy" / "segment"), "--data", str(synthetic), "--split",
                 "val", "--out", str(pred), "--scales", "0.75", "1", "--flip", "--crf-preset", "psa"]) == 0
    assert main(["eval", "--data", str(synthetic), "--split", "val", "--pred", str(pred)]) == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    assert toy["segment_eval_test"] == pytest.approx(metrics["miou"], abs=1e-9)
    table = pipeline.results_table(tested)
    assert "test protocol" in table and "scales [0.75, 1.0], flip True, fusion mean, CRF psa" in table

    # AReAM's fusion: the pixel-wise max over the scales' softmax, as `wsss predict --fusion max` gives it.
    assert pipeline.main(argv + ["--resume", "--segment-scales", "0.75", "1.25", "--segment-fusion", "max"]) == 0
    fused = json.loads(out.read_text())["methods"]["toy"]["segment_eval_test"]
    pred_max = tmp_path / "pred_max"
    assert main(["predict", "--checkpoint", str(runs / "toy" / "segment"), "--data", str(synthetic), "--split",
                 "val", "--out", str(pred_max), "--scales", "0.75", "1.25", "--fusion", "max"]) == 0
    assert main(["eval", "--data", str(synthetic), "--split", "val", "--pred", str(pred_max)]) == 0
    assert fused == pytest.approx(json.loads((pred_max / "metrics.json").read_text())["miou"], abs=1e-9)
    pipeline_max = runs / "toy" / "segment" / "pred_val_s0.75-1.25_max"
    pred_mean = tmp_path / "pred_mean"
    assert main(["predict", "--checkpoint", str(runs / "toy" / "segment"), "--data", str(synthetic), "--split",
                 "val", "--out", str(pred_mean), "--scales", "0.75", "1.25"]) == 0
    masks = {name: [read_mask(f) for f in sorted(folder.glob("*.png"))]
             for name, folder in [("pipeline", pipeline_max), ("max", pred_max), ("mean", pred_mean)]}
    assert len(masks["pipeline"]) == 8
    assert all(np.array_equal(a, b) for a, b in zip(masks["pipeline"], masks["max"]))
    assert not all(np.array_equal(a, b) for a, b in zip(masks["max"], masks["mean"]))  # the fusion mattered
    assert model_file.stat().st_mtime_ns == trained_at


def test_pipeline_tests_the_model_it_just_trained_without_reloading(benchmarks, toy_method, synthetic, tmp_path,
                                                                    monkeypatch):
    """With the test protocol from the start, each segmentation model is built once: the test stage scores the
    trainer the one-view stage trained. An unknown CRF preset is refused by the command line."""
    pipeline = benchmarks.pipeline
    built = []
    real = wsss_pipeline.segment_trainer
    monkeypatch.setattr(wsss_pipeline, "segment_trainer", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    argv = ["--data", str(synthetic), "--train-split", "train", "--eval-split", "val", "--methods", "toy",
            "--recipe", "tiny", "--weights", "none", "--maps", "cam", "--run-root", str(tmp_path / "runs"),
            "--out", str(tmp_path / "pipeline.json")]
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(argv + ["--segment-crf", "deeplab"])
    assert exit_info.value.code == 2 and not built
    assert pipeline.main(argv + ["--segment-flip"]) == 0
    result = json.loads((tmp_path / "pipeline.json").read_text())
    assert sorted(p.name for p in built) == ["segment", "supervised"]
    for row in (result["methods"]["toy"], result["supervised"]):
        assert 0 <= row["segment_eval_test"] <= 1


def test_recipe_ablation_scores_each_variant_like_the_pipeline(benchmarks, toy_method, synthetic, tmp_path):
    """``benchmarks/recipe_ablation.py``: the preset itself scores what the pipeline's ``seed_eval`` gives for the
    same run, and a changed setting is trained and scored with that setting."""
    pipeline, recipe_ablation = benchmarks.pipeline, benchmarks.recipe_ablation
    common = ["--data", str(synthetic), "--train-split", "train", "--eval-split", "val", "--weights", "none"]
    reference = tmp_path / "pipeline.json"
    assert pipeline.main(common + ["--methods", "toy", "--recipe", "tiny", "--maps", "squared_cam", "--segment",
                                   "none", "--no-supervised", "--run-root", str(tmp_path / "runs"),
                                   "--out", str(reference)]) == 0
    out = tmp_path / "ablation.json"
    assert recipe_ablation.main(common + ["--preset", "toy_tiny", "--variant", "", "--variant",
                                          "train.steps=1", "--out", str(out)]) == 0
    preset, short = json.loads(out.read_text())["variants"]
    assert preset["overrides"] == [] and preset["map"] == "squared_cam"
    assert preset["miou"] == pytest.approx(json.loads(reference.read_text())["methods"]["toy"]["seed_eval"])
    # One step instead of four: a different model, so a different score.
    assert short["overrides"] == ["train.steps=1"] and short["miou"] != pytest.approx(preset["miou"])
