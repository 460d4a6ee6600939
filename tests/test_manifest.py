"""Output folders know what made them: ``wsss cam``/``pseudo``/``predict`` resume only over files their manifest
lists, refuse other settings without ``--overwrite``, never write into the dataset, and ``wsss eval`` refuses ground
truth. Through the command line (in-process, and once as a subprocess) on tiny datasets."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cli import pseudo as pseudo_cli
from wsss.cli.main import main
from wsss.data.io import load_maps, read_mask, save_maps, write_mask
from wsss.data.manifest import MANIFEST_NAME, mark_ground_truth, read_manifest
from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset
from wsss.models import SegmentationModel, checkpoint, create_model

H, W = 16, 24
IDS = ("a", "b", "c", "d")


def _truth(image_id: str) -> np.ndarray:
    """Ground truth over background/cat/dog: a different layout per image."""
    mask = np.zeros((H, W), np.uint8)
    k = IDS.index(image_id)
    mask[2:12, 2 + 4 * k: 10 + 4 * k] = 1 + k % 2
    if k == 1:
        mask[10:, 18:] = 1
    return mask


def _maps(image_id: str) -> tuple[np.ndarray, list[int]]:
    """Maps that a threshold of 0.5 turns into the truth and 0.8 into all background, with a ramp so other
    thresholds and rules give other labels."""
    truth = _truth(image_id)
    classes = sorted(int(c) for c in np.unique(truth) if c != 0)
    ramp = np.linspace(0.55, 0.75, W, dtype=np.float32)[None, :]
    return np.stack([np.where(truth == c, ramp, 0.1) for c in classes]).astype(np.float32), classes


@pytest.fixture
def voc(tmp_path: Path) -> dict[str, Path]:
    """A four-image VOC-layout dataset with exact masks and a folder of maps for it."""
    root, maps = tmp_path / "voc", tmp_path / "maps"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(IDS) + "\n")
    rng = np.random.default_rng(3)
    for image_id in IDS:
        truth = _truth(image_id)
        image = (30 + 90 * truth[..., None] + rng.integers(0, 25, (H, W, 3))).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
        write_mask(root / "SegmentationClass" / f"{image_id}.png", truth)
        save_maps(maps / f"{image_id}.npz", *_maps(image_id))
    return {"root": root, "maps": maps, "tmp": tmp_path}


def _pseudo(voc: dict[str, Path], out: Path, *rule: str) -> int:
    return main(["pseudo", "--maps", str(voc["maps"]), "--data", str(voc["root"]), "--split", "train",
                 "--out", str(out), *rule])


def _eval(voc: dict[str, Path], pred: Path, metrics: Path | None = None) -> int:
    extra = [] if metrics is None else ["--out", str(metrics)]
    return main(["eval", "--data", str(voc["root"]), "--split", "train", "--pred", str(pred), *extra])


def _miou(folder: Path) -> float:
    return json.loads((folder / "metrics.json").read_text())["miou"]


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# ------------------------------------------------------------------------------------ (a) untrusted files


def test_ground_truth_left_in_out_is_replaced_and_never_scored(voc, caplog):
    rule = ("--threshold", "0.8")  # every pixel background: far from the truth
    clean, dirty = voc["tmp"] / "clean", voc["tmp"] / "dirty"
    assert _pseudo(voc, clean, *rule) == 0
    assert _eval(voc, clean) == 0
    assert _miou(clean) < 0.5

    dirty.mkdir()
    for image_id in ("a", "b", "c"):  # the tester's scenario: true masks left in --out, no manifest
        shutil.copy(voc["root"] / "SegmentationClass" / f"{image_id}.png", dirty)
    with caplog.at_level(logging.WARNING):
        assert _pseudo(voc, dirty, *rule) == 0
    assert any("3 files in" in r.getMessage() and "recomputed" in r.getMessage() for r in caplog.records)
    assert _pngs(dirty) == _pngs(clean)
    assert _eval(voc, dirty) == 0
    assert _miou(dirty) == _miou(clean)

    # True masks copied over finished outputs are not what the run wrote: eval refuses them, a rerun replaces them.
    shutil.copy(voc["root"] / "SegmentationClass" / "d.png", dirty / "d.png")
    assert _eval(voc, dirty) == 2
    assert _pseudo(voc, dirty, *rule) == 0
    assert _pngs(dirty) == _pngs(clean)
    assert _eval(voc, dirty) == 0 and _miou(dirty) == _miou(clean)


# ------------------------------------------------------------------------------------ (b) other settings


def test_other_settings_are_an_error_naming_the_key_until_overwrite(voc, capsys):
    out = voc["tmp"] / "out"
    assert _pseudo(voc, out, "--threshold", "0.5") == 0
    first = _pngs(out)
    assert all(np.array_equal(read_mask(out / f"{i}.png"), _truth(i)) for i in IDS)
    (out / "notes.txt").write_text("mine")  # not an output: --overwrite leaves it alone
    capsys.readouterr()

    assert _pseudo(voc, out, "--threshold", "0.7") == 2
    err = capsys.readouterr().err
    assert "bg_threshold: 0.5 -> 0.7" in err and "--overwrite" in err and err.count("\n") == 1
    assert _pseudo(voc, out, "--psa-alpha", "4") == 2
    assert 'rule: "threshold" -> "psa"' in capsys.readouterr().err
    assert _pseudo(voc, out, "--method", "baseline") == 2
    err = capsys.readouterr().err
    assert 'refine: "none" -> "par"' in err and "bg_threshold: 0.5 -> 0.4" in err  # baseline's recipe
    assert _pngs(out) == first

    assert _pseudo(voc, out, "--threshold", "0.7", "--overwrite") == 0
    changed = _pngs(out)
    assert changed.keys() == first.keys() and changed != first
    assert (out / "notes.txt").read_text() == "mine"
    record = read_manifest(out)
    assert record["kind"] == "pseudo" and record["settings"]["bg_threshold"] == 0.7
    assert sorted(record["files"]) == [f"{i}.png" for i in IDS]
    # The same settings again: a resume that writes nothing.
    capsys.readouterr()
    assert _pseudo(voc, out, "--threshold", "0.7") == 0
    assert "wrote 0 pseudo labels" in capsys.readouterr().out and _pngs(out) == changed


# ------------------------------------------------------------------------------------ (c), (d) dataset folders


def test_out_in_the_dataset_folders_is_refused(voc, capsys):
    root = voc["root"]
    truth = _pngs(root / "SegmentationClass")
    for out in (root / "SegmentationClass", root / "SegmentationClass" / "sub", root / "JPEGImages"):
        assert _pseudo(voc, out, "--threshold", "0.8") == 2
        err = capsys.readouterr().err
        assert str(out.parent if out.name == "sub" else out) in err and "dataset folder" in err
    link = voc["tmp"] / "link"
    link.symlink_to(root / "SegmentationClass")
    assert _pseudo(voc, link, "--threshold", "0.8") == 2
    assert str(root / "SegmentationClass") in capsys.readouterr().err
    assert _pseudo(voc, voc["maps"], "--threshold", "0.8") == 2
    assert "--maps folder" in capsys.readouterr().err
    assert _pngs(root / "SegmentationClass") == truth
    assert not (root / "SegmentationClass" / MANIFEST_NAME).exists()


def test_eval_refuses_ground_truth(voc, capsys):
    root = voc["root"]
    assert _eval(voc, root / "SegmentationClass", metrics=voc["tmp"] / "m") == 2
    assert f"{root / 'SegmentationClass'}" in capsys.readouterr().err
    link = voc["tmp"] / "gt_link"
    link.symlink_to(root / "SegmentationClass")
    assert _eval(voc, link, metrics=voc["tmp"] / "m") == 2
    assert "true masks" in capsys.readouterr().err
    marked = voc["tmp"] / "gt_copy"  # a copy of the masks, marked as ground truth
    shutil.copytree(root / "SegmentationClass", marked)
    mark_ground_truth(marked, root, "train", command="test")
    assert _eval(voc, marked) == 2
    assert "ground truth" in capsys.readouterr().err and not (marked / "metrics.json").exists()
    # ...and no output command writes into it.
    assert _pseudo(voc, marked, "--threshold", "0.8", "--overwrite") == 2
    assert "ground truth" in capsys.readouterr().err
    assert _pngs(marked) == _pngs(root / "SegmentationClass")


# ------------------------------------------------------------------------------------ (e) resume


def test_an_interrupted_pseudo_run_resumes_to_the_clean_result(voc, monkeypatch):
    rule = ("--two-thresholds", "0.7", "0.6", "--refine", "par", "--iterations", "2")
    clean, out = voc["tmp"] / "clean", voc["tmp"] / "out"
    assert _pseudo(voc, clean, *rule) == 0

    real, calls = pseudo_cli.write_pseudo_label, []

    def interrupted(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third image
        calls.append(args[1])
        real(*args)

    monkeypatch.setattr(pseudo_cli, "write_pseudo_label", interrupted)
    assert _pseudo(voc, out, *rule) == 130
    monkeypatch.undo()
    assert sorted(read_manifest(out)["files"]) == ["a.png", "b.png"]  # flushed on the way out
    write_mask(out / "c.png", _truth("c"))  # as if killed after writing c but before recording it
    before = (out / "a.png").stat().st_mtime_ns
    assert _pseudo(voc, out, *rule) == 0
    assert _pngs(out) == _pngs(clean)
    assert (out / "a.png").stat().st_mtime_ns == before  # resumed: a was not recomputed
    assert sorted(read_manifest(out)["files"]) == [f"{i}.png" for i in IDS]


# ------------------------------------------------------------------------------------ cam and predict


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic dataset with a random classifier and a random segmentation model saved for it."""
    tmp = tmp_path_factory.mktemp("manifest")
    data = make_synthetic(tmp / "data", num_train=2, num_val=3, size=32, num_classes=2, seed=4)
    classes = VOCDataset(data, "val").classes
    torch.manual_seed(0)
    vit = create_model("vit_nano_patch16", num_classes=classes.num_fg, img_size=(32, 32))
    checkpoint.save(tmp / "cls.safetensors", vit, checkpoint.describe(vit, "vit_nano_patch16", classes=classes.names))
    seg = SegmentationModel(create_model("vit_nano_patch16", num_classes=0, img_size=(32, 32)), classes.num_classes,
                            dim=8)
    checkpoint.save(tmp / "seg.safetensors", seg, checkpoint.describe(seg, "vit_nano_patch16", classes=classes.names))
    return {"data": data, "cls": tmp / "cls.safetensors", "seg": tmp / "seg.safetensors"}


def _cam_argv(synth, out: Path, *extra: str, ckpt: Path | None = None) -> list[str]:
    return ["cam", "--checkpoint", str(ckpt or synth["cls"]), "--data", str(synth["data"]), "--split", "val",
            "--out", str(out), "--device", "cpu", "--threshold", "0.4", *extra]


def _cam_files(out: Path) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    return {p.stem: load_maps(p)[0] for p in sorted(out.glob("*.npz"))}, _pngs(out / "labels")


def test_cam_resumes_in_a_subprocess_and_records_the_checkpoint(synth, tmp_path, capsys):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert main(_cam_argv(synth, clean, "--method", "cam")) == 0
    record = read_manifest(clean)
    assert record["kind"] == "cam" and record["data"] == {"root": str(synth["data"].resolve()), "split": "val"}
    digest = hashlib.sha256(synth["cls"].read_bytes()).hexdigest()
    assert record["settings"]["checkpoint_sha256"] == f"sha256:{digest}"
    assert (record["settings"]["method"], record["settings"]["threshold"]) == ("cam", 0.4)
    assert len(record["files"]) == 6  # three maps and three label PNGs

    # The first image in a separate process (the installed entry point), the rest here.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same sums in the same order
    done = subprocess.run([sys.executable, "-m", "wsss.cli.main", *_cam_argv(synth, out, "--method", "cam",
                                                                            "--limit", "1")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(read_manifest(out)["files"]) == ["labels/val_00000.png", "val_00000.npz"]
    capsys.readouterr()
    assert main(_cam_argv(synth, out, "--method", "cam")) == 0
    assert "resuming: 1 of 3 images already done" in capsys.readouterr().out
    got, want = _cam_files(out), _cam_files(clean)
    assert got[1] == want[1]  # label PNGs byte for byte (an .npz holds zip timestamps: compared by value)
    assert got[0].keys() == want[0].keys() and all(np.array_equal(got[0][k], want[0][k]) for k in want[0])

    # The label PNGs are scored under the cam manifest one folder up; one replaced afterwards is refused.
    evaluate = ["eval", "--data", str(synth["data"]), "--split", "val", "--pred", str(out / "labels")]
    assert main(evaluate) == 0
    shutil.copy(synth["data"] / "SegmentationClass" / "val_00001.png", out / "labels" / "val_00001.png")
    assert main(evaluate) == 2
    assert "1 of the 3 predictions" in capsys.readouterr().err

    # Another map, or other weights under the same file name: an error naming what changed.
    assert main(_cam_argv(synth, out, "--method", "gradcam")) == 2
    assert 'method: "cam" -> "gradcam"' in capsys.readouterr().err
    ckpt, other_out = tmp_path / "model.safetensors", tmp_path / "other"
    shutil.copy(synth["cls"], ckpt)
    assert main(_cam_argv(synth, other_out, "--method", "cam", "--limit", "1", ckpt=ckpt)) == 0
    other = create_model("vit_nano_patch16", num_classes=VOCDataset(synth["data"], "val").classes.num_fg,
                         img_size=(32, 32))
    checkpoint.save(ckpt, other, checkpoint.read_spec(synth["cls"]))  # retrained, same file name
    capsys.readouterr()
    assert main(_cam_argv(synth, other_out, "--method", "cam", ckpt=ckpt)) == 2
    assert "checkpoint_sha256" in capsys.readouterr().err

    assert main(_cam_argv(synth, synth["data"] / "SegmentationClass", "--method", "cam")) == 2
    assert "SegmentationClass" in capsys.readouterr().err


def test_pseudo_notices_new_maps_under_the_same_folder(synth, tmp_path, capsys):
    maps, labels = tmp_path / "maps", tmp_path / "labels"
    assert main(_cam_argv(synth, maps, "--method", "cam")) == 0
    pseudo = ["pseudo", "--maps", str(maps), "--data", str(synth["data"]), "--split", "val", "--out", str(labels),
              "--threshold", "0.4"]
    assert main(pseudo) == 0
    assert main(_cam_argv(synth, maps, "--method", "gradcam", "--overwrite")) == 0
    capsys.readouterr()
    assert main(pseudo) == 2
    assert 'maps_made_by.method: "cam" -> "gradcam"' in capsys.readouterr().err
    assert main([*pseudo, "--overwrite"]) == 0


def test_predict_refuses_other_settings_and_the_mask_folder(synth, tmp_path, capsys):
    out = tmp_path / "pred"
    common = ["predict", "--checkpoint", str(synth["seg"]), "--data", str(synth["data"]), "--split", "val",
              "--device", "cpu"]
    assert main([*common, "--out", str(out)]) == 0
    assert read_manifest(out)["kind"] == "predict"
    assert main([*common, "--out", str(out), "--flip"]) == 2
    assert "flip: false -> true" in capsys.readouterr().err
    assert main([*common, "--out", str(synth["data"] / "SegmentationClass")]) == 2
    assert "SegmentationClass" in capsys.readouterr().err
    assert main(["eval", "--data", str(synth["data"]), "--split", "val", "--pred", str(out)]) == 0
