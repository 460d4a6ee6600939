"""The segmentation stage: losses against slow references, the decoder, training, checkpoints and ``wsss predict``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.cli.main import main
from wsss.data.io import read_mask, write_mask
from wsss.data.synth import make_synthetic
from wsss.data.transforms import RandomCrop, RandomHorizontalFlip, Compose, RandomScale
from wsss.data.voc import VOCDataset, collate
from wsss.errors import CheckpointError, ConfigError
from wsss.models import Capture, SegmentationModel, create_model
from wsss.models.checkpoint import load
from wsss.models.segmenter import default_levels
from wsss.segment import (SegmentationObjective, cross_entropy, predict_probs, saliency_bce, saliency_target,
                          split_cross_entropy, split_cross_entropy_terms)
from wsss.train import Trainer, load_config
from wsss.train.objectives import build_objective


# ----------------------------------------------------------------------------------------------- losses


def _slow_split_ce(logits: torch.Tensor, target: torch.Tensor, background: int | None) -> tuple[float, float]:
    """Per-pixel loop: -log softmax at the label, averaged separately over background and foreground pixels."""
    bg, fg = [], []
    b, c, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = int(target[i, y, x])
                if label == 255:
                    continue
                scores = [float(logits[i, k, y, x]) for k in range(c)]
                top = max(scores)
                log_z = top + math.log(sum(math.exp(s - top) for s in scores))
                (bg if label == background else fg).append(log_z - scores[label])
    return (sum(bg) / len(bg) if bg else 0.0), (sum(fg) / len(fg) if fg else 0.0)


def _random_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 5, 6, generator=g) * 3
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[torch.rand(2, 5, 6, generator=g) < 0.25] = 255
    target[0, :3] = 0  # many more background pixels than foreground ones: the split then matters
    return logits, target


def test_split_cross_entropy_matches_a_pixel_loop():
    logits, target = _random_case()
    ref_bg, ref_fg = _slow_split_ce(logits, target, background=0)
    bg, fg = split_cross_entropy_terms(logits, target, background_label=0)
    assert float(bg) == pytest.approx(ref_bg, rel=1e-5)
    assert float(fg) == pytest.approx(ref_fg, rel=1e-5)
    assert float(split_cross_entropy(logits, target)) == pytest.approx(ref_bg + ref_fg, rel=1e-5)
    # It is not the plain mean, which weighs the terms by their pixel counts.
    assert float(split_cross_entropy(logits, target)) != pytest.approx(float(cross_entropy(logits, target)), rel=1e-2)


def test_split_cross_entropy_without_background_is_the_plain_mean():
    logits, target = _random_case(1)
    _, ref = _slow_split_ce(logits, target, background=None)
    bg, fg = split_cross_entropy_terms(logits, target, background_label=None)
    assert float(bg) == 0.0 and float(fg) == pytest.approx(ref, rel=1e-5)
    assert float(cross_entropy(logits, target)) == pytest.approx(ref, rel=1e-5)
    assert float(cross_entropy(logits, target)) == pytest.approx(
        float(F.cross_entropy(logits, target, ignore_index=255)), rel=1e-6)


def test_logits_are_upsampled_to_the_labels():
    logits, target = _random_case(2)
    small = logits[:, :, ::2, ::2].contiguous()  # 3 x 3
    up = F.interpolate(small, size=(5, 6), mode="bilinear", align_corners=False)
    ref_bg, ref_fg = _slow_split_ce(up, target, background=0)
    assert float(split_cross_entropy(small, target)) == pytest.approx(ref_bg + ref_fg, rel=1e-5)


def test_all_ignore_crop_gives_zero_loss_and_zero_gradient_not_nan():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=255))  # what a plain mean does
    for loss in (cross_entropy(logits, target), split_cross_entropy(logits, target),
                 split_cross_entropy(logits, target, background_label=None)):
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_only_background_pixels_leave_the_foreground_term_zero():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 0], [255, 0]]])
    bg, fg = split_cross_entropy_terms(logits, target)
    ref_bg, _ = _slow_split_ce(logits, target, background=0)
    assert float(fg) == 0.0 and float(bg) == pytest.approx(ref_bg, rel=1e-5)


def test_saliency_targets_and_bce_by_hand():
    saliency = torch.tensor([[[0, 1], [1, 0]]])
    edited = torch.tensor([[[0, 1], [255, 255]]], dtype=torch.uint8)  # two label-completed pixels
    assert saliency_target(saliency, edited, "intended").tolist() == [[[1.0, 0.0], [0.0, 1.0]]]
    assert saliency_target(saliency, edited, "authors").tolist() == [[[1.0, 1.0], [0.0, 0.0]]]
    with pytest.raises(ConfigError):
        saliency_target(saliency, edited, "other")
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): p_bg = sigmoid(2), sigmoid(-1)
    target = torch.tensor([[[1.0, 0.0]]])
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    expected = -(math.log(p[0]) + math.log(1 - p[1])) / 2
    assert float(saliency_bce(logits, target)) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------- model


def test_default_levels_scale_to_the_depth():
    assert default_levels(12) == (3, 5, 8, 11)
    assert default_levels(4) == (0, 1, 2, 3)
    assert default_levels(6) == (1, 2, 3, 5)
    assert default_levels(24) == (7, 11, 17, 23)


def _nano(num_classes: int = 3) -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel(create_model("vit_nano_patch16", num_classes=2), num_classes, dim=16)


def test_decoder_output_size_and_every_level_matters():
    model = _nano().eval()
    x = torch.randn(2, 3, 48, 80)
    out = model(x, capture=Capture())
    assert out.logits.shape == (2, 3, 48, 80) and out.vit.logits.shape == (2, 2)
    # Each level's projection changes the logits; all parameters receive a gradient (needed by DDP).
    for proj in model.proj:
        with torch.no_grad():
            saved = proj.weight.clone()
            proj.weight.zero_()
            changed = model(x)
            proj.weight.copy_(saved)
        assert not torch.allclose(changed, out.logits)
    model.train()
    (model(x).sum() + model(x, capture=Capture()).vit.logits.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def _reference_probs(model, images, scales, flip):
    """Each view (every scale, each with its mirror image) through the model one by one; its logits upsampled to
    the image size (bilinear), the mirrored ones flipped back, averaged, softmax over the classes."""
    height, width = images.shape[-2:]
    views = []
    for s in scales:
        size = (int(height * s), int(width * s))
        assert size[0] == height * s and size[1] == width * s and size[0] % 16 == 0 and size[1] % 16 == 0
        scaled = images if s == 1.0 else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            views.append(F.interpolate(model(scaled), size=(height, width), mode="bilinear", align_corners=False))
            if flip:
                mirrored = model(scaled.flip(-1))
                views.append(F.interpolate(mirrored, size=(height, width), mode="bilinear",
                                           align_corners=False).flip(-1))
    return (sum(views) / len(views)).softmax(dim=1)


def test_predict_probs_against_a_view_by_view_reference():
    model = _nano(num_classes=4).eval()
    with torch.no_grad():  # a decoder far from its initialisation: clearly different views
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    images = torch.randn(2, 3, 64, 128)  # non-square; 0.75 gives a 48 x 96 view (3 x 6 patches)
    probs = predict_probs(model, images, scales=(1.0, 0.75), flip=True)
    ref = _reference_probs(model, images, (1.0, 0.75), True)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 64, 128))
    # Each ingredient matters on this model: the second scale, the flip.
    assert (probs - _reference_probs(model, images, (1.0,), True)).abs().max() > 1e-3
    assert (probs - _reference_probs(model, images, (1.0, 0.75), False)).abs().max() > 1e-3
    torch.testing.assert_close(predict_probs(model, images), _reference_probs(model, images, (1.0,), False),
                               atol=1e-6, rtol=1e-5)


def test_training_on_a_tiny_set_lowers_the_loss():
    torch.manual_seed(0)
    model = _nano(num_classes=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g) * 0.3
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    for k, (top, left) in enumerate(((16, 16), (0, 32), (32, 0), (16, 32))):  # on the 16-pixel patch grid
        masks[k, top : top + 32, left : left + 16] = 1
    images[:, 0] += 1.5 * masks  # the object is redder than the background
    masks[:, :2] = 255
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = split_cross_entropy(model(images), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


# ----------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("seg") / "d", num_train=8, num_val=3, size=64, seed=2)


def test_mask_dir_and_saliency_follow_the_same_geometry(synth, tmp_path):
    pseudo = tmp_path / "pseudo"
    saliency = tmp_path / "saliency"
    base = VOCDataset(synth, "train")
    for i, image_id in enumerate(base.ids):
        mask = base.load_mask(i)
        write_mask(pseudo / f"{image_id}.png", np.where(mask > 0, 1, 0).astype(np.uint8))
        write_mask(saliency / f"{image_id}.png", np.where(mask > 0, 200, 0).astype(np.uint8))
    transform = Compose([RandomScale((0.7, 1.3)), RandomHorizontalFlip(), RandomCrop(72)])
    ds = VOCDataset(synth, "train", transform=transform, seed=4, mask_dir=pseudo, saliency_dir=saliency)
    plain = VOCDataset(synth, "train", transform=transform, seed=4)
    for i in range(len(ds)):
        item, ref = ds[i], plain[i]
        assert torch.equal(item["image"], ref["image"])
        # The pseudo mask is the binarised true mask, so it must match the true mask's geometry exactly.
        padded = ref["mask"] == 255
        assert torch.equal(item["mask"], torch.where(padded, 255, (ref["mask"] > 0).long()))
        assert torch.equal(item["saliency"], ((ref["mask"] > 0) & ~padded).long())
    batch = collate([ds[0], ds[1]])
    assert batch["saliency"].shape == batch["mask"].shape


# ----------------------------------------------------------------------------------------------- engine + predict


def _train(synth: Path, run: Path, *extra: str) -> Path:
    cfg = load_config("segment_camvid", [f"data.root={synth}", f"run_dir={run}", "model.name=vit_nano_patch16",
                                          "model.weights=null", "data.transforms.crop=64", "data.batch_size=4",
                                          "data.num_workers=0", "train.steps=4", "train.ckpt_every=2",
                                          "train.log_every=1", "method.dim=16", "device=cpu", *extra])
    Trainer(cfg).fit()
    return run


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory) -> Path:
    return _train(synth, tmp_path_factory.mktemp("run") / "seg", "method.loss=split_ce")


def test_segmentation_run_saves_a_loadable_model(trained, synth):
    model, spec = load(trained)
    assert isinstance(model, SegmentationModel)
    assert spec.segmenter["num_classes"] == 5 and spec.num_classes == 0 and spec.method == "segmentation"
    assert spec.mean == (0.5, 0.5, 0.5) and spec.classes[0] == "background"
    again, _ = load(trained / "checkpoints" / "step_0000004" / "model.safetensors")
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(model.eval()(x), again.eval()(x), rtol=0, atol=0)
    lines = [json.loads(s) for s in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and {"seg_bg", "seg_fg"} <= set(lines[0])
    with pytest.raises(CheckpointError):
        load(trained / "missing.safetensors")


def test_segmentation_run_resumes(synth, tmp_path):
    run = _train(synth, tmp_path / "run", "train.steps=2")
    cfg = load_config(run / "config.yaml", ["train.steps=3"])
    Trainer(cfg).fit(resume=True)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert (run / "checkpoints" / "step_0000003" / "model.safetensors").is_file()


def _predict(*argv: str) -> int:
    return main(["predict", *argv])


def test_predict_cli_writes_labels_and_resumes(trained, synth, tmp_path):
    out = tmp_path / "pred"
    common = ["--checkpoint", str(trained), "--data", str(synth), "--split", "val", "--out", str(out)]
    assert _predict(*common, "--scales", "1.0", "0.75", "--flip", "--device", "cpu") == 0
    ds = VOCDataset(synth, "val")
    model, _ = load(trained)
    for i, image_id in enumerate(ds.ids):
        image = torch.from_numpy(ds.load_image(i)).permute(2, 0, 1).float() / 255
        probs = predict_probs(model, ((image - 0.5) / 0.5)[None], scales=(1.0, 0.75), flip=True)[0]
        np.testing.assert_array_equal(read_mask(out / f"{image_id}.png"), probs.argmax(0).numpy())
    # Resume with the same settings: a PNG the manifest lists is kept as it is, a missing one is written again, and
    # one replaced behind the manifest's back (the sentinel) is not trusted: it is recomputed.
    expected = {image_id: (out / f"{image_id}.png").read_bytes() for image_id in ds.ids}
    kept = (out / f"{ds.ids[2]}.png").stat().st_mtime_ns
    sentinel = np.full((64, 64), 4, np.uint8)
    write_mask(out / f"{ds.ids[0]}.png", sentinel)
    (out / f"{ds.ids[1]}.png").unlink()
    assert _predict(*common, "--scales", "1.0", "0.75", "--flip", "--device", "cpu") == 0
    assert {image_id: (out / f"{image_id}.png").read_bytes() for image_id in ds.ids} == expected
    assert (out / f"{ds.ids[2]}.png").stat().st_mtime_ns == kept
    # Other settings into the same folder are an error naming them, until --overwrite.
    assert _predict(*common, "--device", "cpu") == 2
    assert _predict(*common, "--device", "cpu", "--overwrite") == 0
    assert json.loads((out / "wsss-manifest.json").read_text())["settings"]["scales"] == [1.0]


def test_predict_with_crf(trained, synth, tmp_path, capsys):
    pytest.importorskip("pydensecrf.densecrf")
    out = tmp_path / "crf"
    common = ["--checkpoint", str(trained), "--split", "val", "--device", "cpu"]
    assert _predict(*common, "--data", str(synth), "--out", str(out), "--crf-preset", "getam") == 0
    labels = [read_mask(p) for p in sorted(out.glob("*.png"))]
    assert len(labels) == 3 and all(lab.max() < 5 for lab in labels)
    assert json.loads((out / "wsss-manifest.json").read_text())["settings"]["crf"] == "getam"
    # The old spelling still works, with a warning, and is the same setting: the folder resumes.
    capsys.readouterr()
    with pytest.warns(FutureWarning, match="--crf is deprecated and will be removed; use --crf-preset"):
        assert _predict(*common, "--data", str(synth), "--out", str(out), "--crf", "getam") == 0
    assert "wrote 0 label PNGs to" in capsys.readouterr().out  # all 3 kept: the same settings


@pytest.mark.parametrize("flags, preset", [([], None), (["--refine", "none"], None), (["--refine", "crf"], "psa"),
                                           (["--crf-preset", "getam"], "getam"),
                                           (["--refine", "crf", "--crf-preset", "aream"], "aream")])
def test_predict_chooses_the_crf_as_pseudo_does(flags, preset, tmp_path):
    from wsss.cli import predict as predict_cli
    from wsss.cli.main import build_parser

    args = build_parser(["predict"]).parse_args(["predict", "--checkpoint", "c", "--data", "d", "--out", "o", *flags])
    assert predict_cli.crf_preset(args) == preset


def test_predict_refuses_a_crf_preset_with_no_crf(trained, synth, tmp_path, capsys):
    assert _predict("--checkpoint", str(trained), "--data", str(synth), "--split", "val", "--out",
                    str(tmp_path / "o"), "--refine", "none", "--crf-preset", "psa") == 2
    assert "--crf-preset psa sets the dense CRF, but --refine is none" in capsys.readouterr().err


def test_predict_show_writes_a_titled_picture_per_image(trained, synth, tmp_path):
    from wsss.cli.predict import SHOW_TILE
    from wsss.visualize import class_legend, grid_cell, label_tile

    out = tmp_path / "pred"
    assert _predict("--checkpoint", str(trained), "--data", str(synth), "--split", "val", "--out", str(out),
                    "--device", "cpu", "--show") == 0
    ds = VOCDataset(synth, "val")
    assert sorted(p.stem for p in (out / "show").glob("*.png")) == sorted(ds.ids)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ds.ids)  # the label PNGs are where they were
    for i, image_id in enumerate(ds.ids):
        picture = np.asarray(Image.open(out / "show" / f"{image_id}.png").convert("RGB"))
        cells = []
        for column in range(3):  # image | ground truth | prediction
            top, left = grid_cell(0, column, SHOW_TILE)
            cells.append(picture[top:top + SHOW_TILE, left:left + SHOW_TILE])
        np.testing.assert_array_equal(cells[1], label_tile(ds.load_mask(i), SHOW_TILE))
        prediction = read_mask(out / f"{image_id}.png")
        np.testing.assert_array_equal(cells[2], label_tile(prediction, SHOW_TILE))
        # The legend below shows every class drawn, in the colours drawn.
        legend_area = picture[grid_cell(1, 0, SHOW_TILE)[0] - 30:]
        names = ds.classes.names
        for _, colour in class_legend(names, ignore=False, only=np.unique(np.concatenate(
                [prediction.ravel(), ds.load_mask(i).ravel()]))):
            assert (legend_area == colour).all(axis=-1).sum() >= 100, colour


def test_predict_refuses_a_dataset_with_other_classes(trained, synth, tmp_path, capsys):
    """No CRF needed: the check runs before any image is read."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("JPEGImages", "ImageSets"):
        (other / name).symlink_to(synth / name)
    (other / "classes.txt").write_text("background\na\nb\n")
    out = tmp_path / "x"
    code = _predict("--checkpoint", str(trained), "--split", "val", "--device", "cpu", "--data", str(other),
                    "--out", str(out))
    assert code == 2
    err = capsys.readouterr().err
    assert "classes" in err and "'a'" in err and "background" in err
    assert not out.exists() or not list(out.glob("*.png"))


def test_objective_options_are_checked():
    from wsss.data.classes import ClassSet

    classes = ClassSet(("background", "a"))
    with pytest.raises(ConfigError, match="loss"):
        build_objective({"name": "segmentation", "loss": "dice"}, classes=classes)
    with pytest.raises(ConfigError, match="lvls"):
        build_objective({"name": "segmentation", "lvls": [1]}, classes=classes)
    assert isinstance(build_objective({"name": "segmentation", "loss": "split_ce"}, classes=classes),
                      SegmentationObjective)
