"""The training engine: exact resume after a SIGKILL, divergence handling, run folder, checkpoints, schedules."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from wsss.data.io import voc_palette, write_mask
from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset
from wsss.errors import CheckpointError, ConfigError
from wsss.models import SegmentationModel, create_model
from wsss.models.checkpoint import ModelSpec, describe, load, read_spec, save
from wsss.train import Trainer, TrainingDiverged, load_config
from wsss.train import engine as engine_module
from wsss.train.checkpoint import CheckpointManager
from wsss.train.config import dump_config
from wsss.train.objectives import build_objective
from wsss.train.optim import build_optimizer, lr_factor, param_groups
from wsss.train.validate import labels_grid, map_grid, maps_sweep, sweep_result
from wsss.visualize import grid_cell, label_tile, overlay, resize_tile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth"), num_train=24, num_val=4, size=32)


def tiny_overrides(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A 4-block, 64-wide ViT on 32x32 crops: 24 images / batch 4 = 6 steps per epoch."""
    return [f"data.root={root}", f"run_dir={run_dir}", "device=cpu", "model.name=vit_nano_patch16",
            "data.batch_size=4", "data.num_workers=0",
            "data.transforms={crop: 32, scale: [0.5, 1.0], hflip: true}",
            "optim.lr=1e-3", "optim.warmup_steps=2", "train.log_every=2", "val.thresholds=[0.0, 1.0, 0.05]",
            *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- resume

STALLING_RUN = """
import sys, time, pathlib, torch
torch.set_num_threads(int(sys.argv[1]))
from wsss.train import engine
marker, stall_step = pathlib.Path(sys.argv[2]), int(sys.argv[3])
real_build = engine.build_objective

def build(cfg, **context):
    objective = real_build(cfg, **context)
    def stalling(model, batch, step):
        if step == stall_step:  # after the checkpoint before it is complete: wait to be killed
            marker.write_text(str(step))
            time.sleep(300)
        return objective(model, batch, step)
    return stalling

engine.build_objective = build
from wsss.cli.main import main
sys.exit(main(["train", "--config", sys.argv[4]]))
"""


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(synth, tmp_path):
    """Run B is SIGKILLed mid-epoch 1 (checkpoint at step 8, metrics logged to step 10, killed inside step 11),
    resumed with --resume, and ends bit-identical to the uninterrupted run A, with the same logged losses.
    Drop-path makes the global RNG matter, the random resized crop the augmentation streams, and B's data worker
    the worker seeding."""
    common = ["train.steps=12", "train.ckpt_every=4", "model.drop_path_rate=0.1", "val.every=0"]
    cfg_b = load_config(None, tiny_overrides(synth, tmp_path / "b", *common, "data.num_workers=1"))
    config_file = tmp_path / "b.yaml"
    config_file.write_text(dump_config(cfg_b))
    marker = tmp_path / "stalled"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", STALLING_RUN, str(torch.get_num_threads()), str(marker), "10",
                             str(config_file)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # The uninterrupted run, while B starts up.
        summary_a = Trainer(load_config(None, tiny_overrides(synth, tmp_path / "a", *common))).fit()
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "run B never reached step 11"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_b = tmp_path / "b"
    assert (run_b / "checkpoints" / "latest").read_text() == "step_0000008"
    assert not (run_b / "model.safetensors").exists()
    assert [m["step"] for m in metric_lines(run_b)] == [2, 4, 6, 8, 10]

    summary_b = Trainer(cfg_b).fit(resume=True)

    final_a, final_b = weights(tmp_path / "a" / "model.safetensors"), weights(run_b / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    # The resumed steps did change the weights, so equality is not that of two copies of the checkpoint.
    at_kill = weights(run_b / "checkpoints" / "step_0000008" / "model.safetensors")
    assert not torch.equal(final_b["blocks.0.attn.qkv.weight"], at_kill["blocks.0.attn.qkv.weight"])
    assert summary_a["loss"] == summary_b["loss"]
    # metrics.jsonl: B's lines up to the checkpoint are kept, those after it redone once, the losses are A's.
    lines_a, lines_b = metric_lines(tmp_path / "a"), metric_lines(run_b)
    assert [m["step"] for m in lines_b] == [2, 4, 6, 8, 10, 12] == [m["step"] for m in lines_a]
    assert [m["loss"] for m in lines_b] == [m["loss"] for m in lines_a]
    assert "resumed from" in (run_b / "train.log").read_text()


def test_run_folder_contents_and_checkpoints(synth, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth, run, "train.steps=6", "train.ckpt_every=2",
                                           "train.keep_checkpoints=2", "val.every=3", "val.images=2"))
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "train.log", "metrics.jsonl", "checkpoints",
                                               "model.safetensors", "summary.json"}
    assert load_config(run / "config.yaml") == cfg
    # Two kept checkpoints (steps 4 and 6), ``latest`` at the final one, each complete.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_0000004", "step_0000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000006"
    for name in ckpts:
        assert {p.name for p in (run / "checkpoints" / name).iterdir()} == {"model.safetensors", "state.pt"}
    # state.pt holds plain data only.
    state = torch.load(run / "checkpoints" / "step_0000006" / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 1 and len(state["rng"]) == 1
    assert state["scheduler"]["last_epoch"] == 6
    # The final model rebuilds from its metadata alone and equals the trained one.
    spec = read_spec(run / "model.safetensors")
    assert spec.arch == "vit_nano_patch16" and spec.num_classes == 4 and spec.classes[0] == "background"
    assert spec.method == "baseline" and spec.mean == (0.5, 0.5, 0.5) and spec.config == cfg
    model, _ = load(run / "model.safetensors")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # Validation ran at steps 3 and 6 on all 4 images.
    lines = metric_lines(run)
    val = [m for m in lines if "val_miou" in m]
    assert [m["step"] for m in val] == [3, 6] and all(m["val_images"] == 4 for m in val)
    assert summary["val"]["miou"] == pytest.approx(val[-1]["val_miou"])
    assert 0.0 <= summary["val"]["miou"] <= 1.0 and summary["images_per_s"] > 0
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    # A new run into the same folder is refused; nothing was touched.
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(cfg).fit()
    assert (run / "checkpoints" / "latest").read_text() == "step_0000006"


def test_validation_map_keeps_the_best_model_across_a_resume(synth, tmp_path):
    from wsss.train.engine import BEST_MODEL_FILE

    run = tmp_path / "run"
    over = ["train.ckpt_every=2", "val.every=2", "val.metric=map", "val.keep_best=true"]
    trainer = Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=4", *over)))
    summary = trainer.fit()
    vals = [line["val_map"] for line in metric_lines(run) if "val_map" in line]
    assert len(vals) == 2 and summary["val"]["best"] == pytest.approx(max(vals))
    assert 0 < summary["val"]["map"] <= 1 and (run / BEST_MODEL_FILE).is_file()
    # The best model is the one that scored best: rescoring it gives the best value.
    best, _ = load(run / BEST_MODEL_FILE)
    trainer.model.load_state_dict(best.state_dict())
    again = trainer._validate_map(trainer.val_dataset, len(trainer.val_dataset))
    assert again["map"] == pytest.approx(max(vals))
    resumed = Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=6", *over)))
    resumed.fit(resume=True)
    assert resumed.best_val >= max(vals)


def _tb_images(run: Path) -> dict[str, np.ndarray]:
    """The last picture of every image tag in the run's TensorBoard events, decoded."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: np.asarray(Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB"))
            for tag in acc.Tags()["images"]}


def test_tensorboard_gets_scalars_and_titled_grids_of_maps_and_pseudo_labels(synth, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=2", "val.every=2", "val.images=3")))
    summary = trainer.fit()
    acc = event_accumulator.EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"loss", "lr", "val_miou", "images_per_s"} <= set(acc.Tags()["scalars"])
    images = _tb_images(run)
    assert set(images) == {"val/cam"}
    # The logged grid is map_grid of the final model: input, ground truth, pseudo label, a heat map per class.
    trainer.model.eval()
    expected = map_grid(trainer.model, trainer.val_dataset, range(3), "cam", threshold=summary["val"]["threshold"],
                        device="cpu")
    np.testing.assert_array_equal(images["val/cam"], expected)
    top, left = grid_cell(0, 3)
    assert expected.shape[0] >= 3 * 192 and (expected[top:top + 192, left:left + 192] != 255).any()  # a heat map


def test_a_run_on_pseudo_labels_shows_them_in_tensorboard(synth, tmp_path):
    pseudo = tmp_path / "pseudo"
    dataset = VOCDataset(synth, "train")
    for i, image_id in enumerate(dataset.ids):  # "pseudo labels": the true masks with an unlabelled border
        mask = dataset.load_mask(i).copy()
        mask[:4] = 255
        write_mask(pseudo / f"{image_id}.png", mask)
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=1", f"data.mask_dir={pseudo}",
                                             "val.images=2"))).fit()
    images = _tb_images(run)
    np.testing.assert_array_equal(images["train/pseudo_labels"],
                                  labels_grid(dataset, {"pseudo label": pseudo}, range(2)))
    top, left = grid_cell(0, 2)  # the pseudo-label cell: the border drawn in the void colour
    assert (images["train/pseudo_labels"][top:top + 12, left:left + 192] == voc_palette()[255]).all()


def test_map_grid_cells(synth):
    """Ground truth and pseudo label in the palette (nearest neighbours), then one heat map per class."""
    dataset = VOCDataset(synth, "val")
    torch.manual_seed(0)
    model = create_model("vit_nano_patch16", num_classes=4).eval()
    grid = map_grid(model, dataset, [1], "cam", threshold=0.3)
    mask = dataset.load_mask(1)
    from wsss.localize.split import iter_split_maps
    [(_, maps, labels)] = list(iter_split_maps(model, dataset, "cam", indices=[1]))

    def cell(c: int) -> np.ndarray:
        top, left = grid_cell(0, c)
        return grid[top:top + 192, left:left + 192]

    np.testing.assert_array_equal(cell(0), resize_tile(dataset.load_image(1), 192))
    np.testing.assert_array_equal(cell(1), label_tile(mask, 192))
    # The rule by hand: the first class above 0.3 in ascending label order, else background.
    order = np.argsort(labels)
    stacked = np.concatenate([np.full((1,) + maps.shape[1:], 0.3, np.float32), maps[order]])
    pseudo = np.concatenate([[0], np.asarray(labels)[order]])[stacked.argmax(axis=0)]
    assert 0 < (pseudo > 0).mean() < 1
    np.testing.assert_array_equal(cell(2), label_tile(pseudo, 192))
    for k, m in enumerate(maps):
        np.testing.assert_array_equal(cell(3 + k), resize_tile(overlay(dataset.load_image(1), m), 192))
    assert grid.shape[1] > grid_cell(0, 3 + len(maps))[1]  # the colour bar on the right


def test_validation_shards_add_up(synth):
    dataset = VOCDataset(synth, "val")
    torch.manual_seed(1)
    model = create_model("vit_nano_patch16", num_classes=4).eval()
    whole = maps_sweep(model, dataset, "cam")
    shards = maps_sweep(model, dataset, "cam", indices=[0, 2]).merge(maps_sweep(model, dataset, "cam", indices=[1, 3]))
    np.testing.assert_array_equal(whole.matrices, shards.matrices)
    assert sweep_result(shards, dataset)["num_images"] == 4


# ---------------------------------------------------------------------------------------------- divergence

def poisoned(at_step: int, how: str):
    """An objective factory: classification, except that step ``at_step`` goes wrong."""

    def build(cfg, **context):
        objective = build_objective(cfg, **context)

        def call(model, batch, step):
            loss, logs = objective(model, batch, step)
            if step == at_step and how == "loss":
                loss = loss * float("nan")
            elif step == at_step and how == "grad":
                # Finite (zero) loss term whose gradient is 0 * inf = NaN.
                zero = (model.module if hasattr(model, "module") else model).cls_token.sum() * 0
                loss = loss + torch.sqrt(zero.abs())
            return loss, logs

        return call

    return build


@pytest.mark.parametrize("how, what", [("loss", "the loss is nan"), ("grad", "the gradient norm is nan")])
def test_nan_stops_and_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch, how, what):
    monkeypatch.setattr(engine_module, "build_objective", poisoned(3, how))
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=6", "train.ckpt_every=2")))
    with pytest.raises(TrainingDiverged, match=f"{what} at step 3") as info:
        trainer.fit()
    assert "step_0000002" in str(info.value)
    # Nothing was written after step 2: latest points at it, it loads, and its weights are the ones of step 3's
    # start (the poisoned step did not update them).
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert not (run / "model.safetensors").exists()
    saved, _ = load(run / "checkpoints" / "step_0000002")
    state = CheckpointManager(run).load_state(run / "checkpoints" / "step_0000002")
    assert state["step"] == 2
    for key, value in saved.state_dict().items():
        assert torch.isfinite(value).all()
    assert trainer.step == 3
    assert "training diverged" in (run / "train.log").read_text()


# ------------------------------------------------------------------------------------ logging, lr scale

class Recording:
    """Classification that records its losses, logs a name only from step 1 on, and halves the lr from step 2."""

    def __init__(self, cfg, **context):
        self.inner = build_objective(cfg, **context)
        self.losses: list[float] = []

    def lr_scale(self, step: int) -> float:
        return 0.5 if step >= 2 else 1.0

    def __call__(self, model, batch, step):
        loss, logs = self.inner(model, batch, step)
        self.losses.append(float(loss.detach()))
        return loss, {**logs, **({"late": float(step)} if step >= 1 else {})}


def test_logged_numbers_are_window_means_and_the_objective_scales_the_lr(synth, tmp_path, monkeypatch):
    made: list[Recording] = []
    monkeypatch.setattr(engine_module, "build_objective", lambda cfg, **c: made.append(Recording(cfg, **c)) or made[-1])
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=4", "train.log_every=4",
                                             "optim.schedule=constant", "optim.warmup_steps=0"))).fit()
    [line] = metric_lines(run)
    assert line["step"] == 4
    assert line["loss"] == pytest.approx(sum(made[0].losses) / 4, rel=1e-12)
    assert line["late"] == pytest.approx((1 + 2 + 3) / 3)  # averaged over the steps that logged it
    assert line["lr"] == pytest.approx(1e-3 * 0.5)
    assert 0.0 <= line["data_wait"] <= 1.0 and line["images_per_s"] > 0


# ---------------------------------------------------------------------------------------------- precision

def test_bf16_autocast_trains(synth, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=2", "train.amp=true",
                                                       "train.log_every=1")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    after = trainer.model.state_dict()
    assert math.isfinite(summary["loss"]) and 0.1 < summary["loss"] < 2.0
    assert all(v.dtype == torch.float32 for v in after.values())
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_of_another_architecture_is_refused(synth, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=1"))).fit()
    other = load_config(None, tiny_overrides(synth, run, "train.steps=2", "model.name=vit_pico_patch8"))
    with pytest.raises(ConfigError, match="model.name: 'vit_nano_patch16' -> 'vit_pico_patch8'"):
        Trainer(other).fit(resume=True)
    with pytest.raises(CheckpointError) as info:  # allowed changes still need weights that fit
        Trainer(other).fit(resume=True, allow_changes=True)
    message = str(info.value)
    assert "model.safetensors" in message and "missing keys" in message and "blocks.4.attn.qkv.weight" in message
    assert "shape mismatch for pos_embed" in message


def test_checkpoint_manager_survives_a_kill_during_save(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano_patch16", num_classes=2)
    spec = describe(model, "vit_nano_patch16")
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    manager.save(3, model, spec, {"step": 3})
    # A save killed half-way leaves only a hidden temporary folder behind.
    (manager.root / ".step_0000005.tmp").mkdir()
    assert manager.latest() == manager.root / "step_0000003"
    # Saving the same step again replaces it in place.
    manager.save(3, model, spec, {"step": 3, "again": True})
    assert manager.load_state(manager.latest())["again"] is True
    for step in (4, 5, 6):
        manager.save(step, model, spec, {"step": step})
    assert sorted(p.name for p in manager.root.glob("step_*")) == ["step_0000005", "step_0000006"]
    # A pointer at a folder that is gone is an error, not a silent fresh start.
    (manager.root / "latest").write_text("step_0000009")
    with pytest.raises(CheckpointError, match="step_0000009"):
        manager.latest()
    # A state file that is not a torch file is a CheckpointError naming it.
    (manager.root / "step_0000006" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="state.pt"):
        manager.load_state(manager.root / "step_0000006")


def _version_1_file(path: Path, model, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"wsss_model": json.dumps(meta)})


def test_checkpoint_formats_bare_version_1_and_segmenter(tmp_path):
    from safetensors.torch import save_file

    from wsss.models.checkpoint import upgrade

    torch.manual_seed(0)
    model = create_model("vit_nano_patch16", num_classes=3)
    x = torch.randn(1, 3, 32, 48)
    # Plain weights: not a wsss checkpoint, and the error says how to load them.
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    with pytest.raises(CheckpointError, match="create_model"):
        load(bare)
    loaded = create_model("vit_nano_patch16", weights=bare, num_classes=3)
    assert torch.equal(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"])
    # A version-1 file (no "version" in its spec) loads with the mean/std of its run's config.yaml ...
    run = tmp_path / "run"
    run.mkdir()
    old_meta = {"name": "vit_nano_patch16", "head": "token", "pool": "avg", "num_classes": 3, "img_size": [64, 64]}
    _version_1_file(run / "model.safetensors", model, old_meta)
    (run / "config.yaml").write_text("data:\n  transforms:\n    mean: [0.4, 0.5, 0.6]\n    std: [0.2, 0.3, 0.4]\n"
                                     "method:\n  name: getam\n")
    old, spec = load(run)
    assert spec.arch == "vit_nano_patch16" and spec.mean == (0.4, 0.5, 0.6) and spec.std == (0.2, 0.3, 0.4)
    assert spec.method == "getam" and spec.version == 2
    torch.testing.assert_close(old(x), model.eval()(x), rtol=0, atol=0)
    # ... and without one it is an error that says how to convert it; upgrade() rewrites it in place.
    alone = tmp_path / "alone.safetensors"
    _version_1_file(alone, model, old_meta)
    with pytest.raises(CheckpointError, match="upgrade-checkpoint"):
        load(alone)
    upgrade(alone, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    again, spec = load(alone)
    assert spec.mean == (0.1, 0.2, 0.3) and spec.version == 2
    torch.testing.assert_close(again(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="already"):
        upgrade(alone, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    # One loader for classifiers and segmentation models: the spec says which it is.
    seg_model = SegmentationModel(model, num_classes=4, dim=16).eval()
    save(tmp_path / "seg.safetensors", seg_model, describe(seg_model, "vit_nano_patch16", mean=(0.3,) * 3))
    seg, spec = load(tmp_path / "seg.safetensors")
    assert isinstance(seg, SegmentationModel) and spec.is_segmenter and spec.segmenter["dim"] == 16
    torch.testing.assert_close(seg(x), seg_model(x), rtol=0, atol=0)
    # An unknown spec entry (a newer writer) is refused, not ignored.
    meta = json.loads(spec.to_json())
    meta["future"] = 1
    _version_1_file(tmp_path / "new.safetensors", seg_model, meta)
    with pytest.raises(CheckpointError, match="future"):
        read_spec(tmp_path / "new.safetensors")


# ------------------------------------------------------------------------------------------- grad clip, resume

def _record_gradient_norms(trainer: Trainer) -> list[float]:
    """The total gradient norm each optimiser step sees (after any clipping)."""
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    trainer.optimizer.register_step_pre_hook(record)
    return norms


def test_grad_clip_bounds_the_gradient_and_the_step(synth, tmp_path):
    """Plain SGD (no momentum, no weight decay, constant lr): one step moves the weights by lr x the gradient, so
    with train.grad_clip the whole step has norm lr x clip, and without it lr x the (larger) raw norm."""
    sgd = ["optim.name=sgd", "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.lr=0.1",
           "optim.schedule=constant", "optim.warmup_steps=0", "train.steps=2", "train.ckpt_every=0"]
    moved, seen = {}, {}
    for clip in (None, 1e-3):
        extra = [] if clip is None else [f"train.grad_clip={clip}"]
        trainer = Trainer(load_config(None, tiny_overrides(synth, tmp_path / f"run_{clip}", *sgd, *extra)))
        before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
        seen[clip] = _record_gradient_norms(trainer)
        trainer.fit()
        after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        moved[clip] = float((after - before).norm())
    assert len(seen[None]) == len(seen[1e-3]) == 2
    assert min(seen[None]) > 0.01  # the raw gradients are far above the clip value ...
    assert seen[1e-3] == pytest.approx([1e-3, 1e-3], rel=1e-4)  # ... and clipped to it
    assert moved[1e-3] < 2 * 0.1 * 1e-3 * (1 + 1e-4)  # two steps of norm lr x clip
    assert moved[None] > 10 * moved[1e-3]


def test_resume_with_changed_settings_is_refused_unless_allowed_and_then_logged(synth, tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=2", "train.ckpt_every=2"))).fit()
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "train.log")}
    changed = load_config(run / "config.yaml", ["train.steps=3", "optim.lr=0.002"])
    # What the run learns changed: refused, naming the key and both values, before the run folder is touched.
    with pytest.raises(ConfigError) as info:
        Trainer(changed).fit(resume=True)
    message = str(info.value)
    assert "optim.lr: 0.001 -> 0.002" in message and "--allow-changes" in message
    assert "train.steps" not in message  # a longer run is no change of what is learnt
    assert {name: (run / name).read_bytes() for name in before} == before
    # Allowed: the changes are logged into train.log, the optimiser starts afresh with the new learning rate.
    with caplog.at_level(logging.INFO, logger="wsss"):
        trainer = Trainer(changed)
        trainer.fit(resume=True, allow_changes=True)
    log_text = (run / "train.log").read_text()
    assert "changed settings (--allow-changes): optim.lr: 0.001 -> 0.002" in log_text
    assert "changed settings: train.steps: 2 -> 3" in log_text and "optimiser state starts afresh" in log_text
    assert log_text.index("resumed from") < log_text.index("--allow-changes")
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.002 * lr_factor(3, 3, changed["optim"]))
    assert load_config(run / "config.yaml") == changed
    # Resuming with the same settings, only longer, needs no flag and says only that.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wsss"):
        Trainer(load_config(run / "config.yaml", ["train.steps=4"])).fit(resume=True)
    [note] = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert note.endswith("train.steps: 3 -> 4") and "--allow-changes" not in note


def test_resume_with_another_optimiser_is_a_named_error_or_a_fresh_state(synth, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=2", "train.ckpt_every=2"))).fit()
    sgd = load_config(run / "config.yaml", ["train.steps=3", "optim.name=sgd"])
    with pytest.raises(ConfigError, match="optim.name: 'adamw' -> 'sgd'"):
        Trainer(sgd).fit(resume=True)
    Trainer(sgd).fit(resume=True, allow_changes=True)  # no KeyError: 'momentum' at the first step
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    # A training state of another optimiser, whatever the config says, is named too.
    trainer = Trainer(load_config(run / "config.yaml", ["train.steps=4", "optim.name=adamw"]))
    with pytest.raises(CheckpointError, match="state.pt: holds the state of another optimiser .*betas"):
        trainer.resume()  # the loading itself, without the settings check of fit()
    assert trainer.resume(allow_changes=True) and trainer.step == 3
    assert "starting a fresh optimiser state" in trainer.notes[-1][1]


def test_config_and_run_files_replace_symlinks_instead_of_writing_through_them(synth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    outside = {name: tmp_path / f"outside_{name}" for name in ("config.yaml", "train.log", "summary.json")}
    for name, target in outside.items():
        target.write_text("keep me\n")
        (run / name).symlink_to(target)
    (run / "model.safetensors").symlink_to(tmp_path / "outside_model")
    cfg = load_config(None, tiny_overrides(synth, run, "train.steps=2", "train.ckpt_every=2"))
    Trainer(cfg).fit()
    for name, target in outside.items():
        assert target.read_text() == "keep me\n", name
        assert not (run / name).is_symlink() and (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg
    assert not (tmp_path / "outside_model").exists() and not (run / "model.safetensors").is_symlink()
    # metrics.jsonl, rewritten on resume, is the run's own file too.
    target = tmp_path / "outside_metrics"
    target.write_bytes((run / "metrics.jsonl").read_bytes())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(target)
    Trainer(load_config(run / "config.yaml", ["train.steps=3"])).fit(resume=True)
    assert not (run / "metrics.jsonl").is_symlink() and len(target.read_text().splitlines()) == 1
    assert [m["step"] for m in metric_lines(run)] == [2, 3]


# ------------------------------------------------------------------------------------------ optimiser, lr

def test_learning_rate_schedules():
    cosine = {"lr": 1.0, "schedule": "cosine", "warmup_steps": 2, "min_lr": 0.1}
    assert [lr_factor(s, 12, cosine) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 12, cosine) == pytest.approx(1.0)
    assert lr_factor(7, 12, cosine) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr_factor(12, 12, cosine) == pytest.approx(0.1)
    poly = {"lr": 0.01, "schedule": "poly", "poly_power": 0.9}
    assert lr_factor(5, 10, poly) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(3, 10, {"lr": 1.0, "schedule": "constant"}) == 1.0
    with pytest.raises(ConfigError, match="schedule"):
        lr_factor(0, 10, {"lr": 1.0, "schedule": "step"})


def test_timm_epoch_cosine_as_deits_loop_steps_it():
    """A transcription of timm's CosineLRScheduler._get_lr (warmup_prefix False) driven like DeiT's main loop:
    the lr set at start, then ``scheduler.step(epoch)`` after each epoch."""
    base, warm_lr, floor, epochs, warm, per_epoch = 6.25e-5, 1e-6, 1e-5, 12, 3, 5

    def get_lr(t):
        if t < warm:
            return warm_lr + t * (base - warm_lr) / warm
        return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / epochs))

    expected, current = [], get_lr(0)
    for epoch in range(epochs):
        expected += [current] * per_epoch  # the whole epoch runs at the lr set before it
        current = get_lr(epoch)  # lr_scheduler.step(epoch) after the epoch
    cfg = load_config(None, ["optim.schedule=cosine", f"optim.lr={base}", f"optim.min_lr={floor}",
                             f"optim.warmup_lr={warm_lr}", f"optim.warmup_steps={warm * per_epoch}",
                             f"optim.epoch_steps={per_epoch}"])["optim"]
    got = [base * lr_factor(step, epochs * per_epoch, cfg) for step in range(epochs * per_epoch)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[0] == pytest.approx(1e-6) and got[per_epoch] == pytest.approx(1e-6)  # DeiT's first two epochs
    with pytest.raises(ConfigError, match="whole number of epochs"):
        load_config(None, ["optim.warmup_steps=7", "optim.epoch_steps=5"])
    with pytest.raises(ConfigError, match="needs schedule: cosine"):
        load_config(None, ["optim.schedule=poly", "optim.epoch_steps=5"])


def test_param_groups_and_the_authors_sgd_quirk():
    model = create_model("vit_nano_patch16", num_classes=2)
    groups = param_groups(model, 0.05, 1e-3, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(1e-3)
    for no_decay in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert by_name[no_decay]["weight_decay"] == 0.0, no_decay
    assert by_name["head.weight"]["lr"] == pytest.approx(1e-2) and by_name["head.weight"]["weight_decay"] == 0.05
    assert len(by_name) == len(list(model.parameters()))
    # DINOv2's registers and CLIP's pre-norm are trunk (no decay), the Conformer's two classifiers are heads.
    for name, trunk_keys, head_keys in [
        ("vit_small_patch14_reg4_dinov2", ["reg_token"], []),
        ("vit_base_patch16_clip_224", ["norm_pre.weight"], []),
        ("conformer_small_patch16", ["cls_token", "conv_trans_2.trans_block.attn.qkv.weight"],
         ["conv_cls_head.weight", "trans_cls_head.weight"]),
    ]:
        extra = dict(base_channel=16, channel_ratio=1, depth=3) if name.startswith("conformer") else dict(depth=1)
        other = create_model(name, num_classes=2, head="conformer" if name.startswith("conformer") else "token",
                             embed_dim=24, num_heads=2, **extra)
        names = {id(p): n for n, p in other.named_parameters()}
        lr_of = {names[id(p)]: g["lr"] for g in param_groups(other, 0.05, 1e-3, 10.0) for p in g["params"]}
        assert all(lr_of[k] == pytest.approx(1e-3) for k in trunk_keys), name
        assert all(lr_of[k] == pytest.approx(1e-2) for k in head_keys), name
        assert sum(v == pytest.approx(1e-2) for v in lr_of.values()) == 2 * max(len(head_keys), 1), name
    cfg = load_config(None, ["optim.name=sgd", "optim.weight_decay=1e-4", "optim.lr=0.01",
                             "optim.authors_sgd_quirk=true"])["optim"]
    opt = build_optimizer(model, cfg)
    assert all(g["momentum"] == 1e-4 and g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_head_learning_rate_applies_to_heads_only_also_inside_a_segmentation_model():
    from wsss.models import SegmentationModel, create_model
    from wsss.train.optim import param_groups

    seg = SegmentationModel(create_model("vit_nano_patch16", num_classes=3), num_classes=4)
    groups = param_groups(seg, weight_decay=0.05, lr=1.0, head_lr_mult=10.0)
    fast = {id(p) for g in groups if g["lr"] == 10.0 for p in g["params"]}
    for name, p in seg.named_parameters():
        trunk = name.startswith(("encoder.blocks.", "encoder.patch_embed.", "encoder.pos_embed", "encoder.cls_token",
                                 "encoder.norm."))
        assert (id(p) in fast) != trunk, name


def test_train_says_where_it_writes_and_what_it_trains_on(synth, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="wsss"):
        Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=1", "val.every=1"))).fit()
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run folder"))
    assert first == (f"run folder {run.resolve()}: 24 training images (split 'train' of {synth}, 5 classes), steps 0 "
                     f"to 1, global batch 4; validating on 4 images of 'val' every 1 steps")
    assert first in (run / "train.log").read_text()


def test_resuming_a_finished_run_keeps_its_summary_and_files(synth, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(synth, run, "train.steps=2", "val.every=2"))
    summary = Trainer(cfg).fit()
    saved = (run / "summary.json").read_bytes()
    assert json.loads(saved)["step"] == 2 and "miou" in json.loads(saved)["val"]
    stamps = {p: p.stat().st_mtime_ns for p in [run / "model.safetensors", *run.glob("checkpoints/*/*")]}
    with caplog.at_level(logging.INFO, logger="wsss"):
        again = Trainer(cfg).fit(resume=True)
    assert (run / "summary.json").read_bytes() == saved  # not replaced by an empty summary
    assert again == json.loads(saved) and again["val"]["miou"] == pytest.approx(summary["val"]["miou"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    assert "finished at step 2 already; nothing to do" in caplog.text
    # More steps on the same run do train, and write their own summary.
    more = Trainer(load_config(None, tiny_overrides(synth, run, "train.steps=3", "val.every=2"))).fit(resume=True)
    assert more["step"] == 3 and json.loads((run / "summary.json").read_text())["step"] == 3


def test_a_key_added_since_a_checkpoint_is_no_change_at_its_default(synth, tmp_path):
    from wsss.settings import changed_settings
    from wsss.train.engine import _with_current_defaults

    cfg = load_config(None, tiny_overrides(synth, tmp_path / "run"))
    older = copy.deepcopy(cfg)
    del older["optim"]["warmup_lr"]  # as written by a wsss without that option
    assert changed_settings(older, cfg) == {"optim.warmup_lr": (None, cfg["optim"]["warmup_lr"])}
    assert changed_settings(_with_current_defaults(older), cfg) == {}
    removed = copy.deepcopy(cfg)
    removed["optim"]["gone"] = 1  # a key since removed no longer validates: still reported
    assert "optim.gone" in changed_settings(_with_current_defaults(removed), cfg)
