"""GETAM's end-to-end objective: phases, pseudo labels against the library's building blocks, loss, saliency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.data.classes import ClassSet
from wsss.data.transforms import denormalize
from wsss.errors import ConfigError
from wsss.localize import localize
from wsss.models import create_model
from wsss.pseudo import label_completion, label_completion_with_saliency
from wsss.refine import pamr
from wsss.localize.base import present_classes
from wsss.methods.getam.objective import GETAMObjective
from wsss.train.objectives import build_objective

VOC_LIKE = ClassSet(("background", "cat", "dog", "car"))
NO_BACKGROUND = ClassSet(("sky", "road", "car"))


def _batch(num_fg: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four 64x64 images with coloured squares; image-level labels say which of the classes are present."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 64, 64, generator=g) * 0.2
    labels = torch.zeros(4, num_fg)
    boxes = {0: [(0, 8, 8)], 1: [(1, 24, 30)], 2: [(0, 4, 36), (2, 34, 6)], 3: [(0, 20, 20), (1, 40, 40), (2, 2, 2)]}
    for b, objects in boxes.items():
        for k, top, left in objects:
            images[b, k % 3, top : top + 20, left : left + 20] += 1.2
            labels[b, k % num_fg] = 1.0
    return {"image": images, "label": labels}


def _objective(classes: ClassSet = VOC_LIKE, **options) -> GETAMObjective:
    return build_objective({"name": "getam", "dim": 16, **options}, classes=classes)


def _model(objective: GETAMObjective, classes: ClassSet = VOC_LIKE, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return objective.build_model(create_model("vit_nano_patch16", num_classes=classes.num_fg, head="gap"))


def test_present_classes_by_hand():
    labels = torch.tensor([[0.0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    assert present_classes(labels).tolist() == [[1, 3, -1], [-1, -1, -1], [0, 1, 2]]


def test_phase_switch_at_cls_steps():
    objective = _objective(cls_steps=2, phase2_lr_scale=0.1)
    model = _model(objective)
    batch = _batch()
    decoder = model.classifier.weight
    for step, phase2 in ((0, False), (1, False), (2, True), (5, True)):
        model.zero_grad()
        loss, logs = objective(model, batch, step)
        loss.backward()
        assert objective.lr_scale(step) == (0.1 if phase2 else 1.0)
        if phase2:
            assert {"cls", "seg_bg", "seg_fg"} <= set(logs)
            assert float(decoder.grad.abs().sum()) > 0
        else:
            assert set(logs) == {"cls"}
            assert float(loss.detach()) == pytest.approx(logs["cls"], rel=1e-6)
            assert float(decoder.grad.abs().sum()) == 0.0  # present in the graph (DDP), but not trained


def _direct_pseudo_labels(objective: GETAMObjective, model, batch, classes: ClassSet) -> list[torch.Tensor]:
    """Image by image with the public building blocks: localize -> PAMR -> / (max + 1e-5) -> label completion."""
    out = []
    background = 0 if classes.has_background else 255
    for b in range(batch["image"].shape[0]):
        image = batch["image"][b : b + 1]
        outputs = [int(k) for k in torch.nonzero(batch["label"][b]).flatten()]
        if not outputs:
            out.append(torch.full(image.shape[-2:], background, dtype=torch.long))
            continue
        raw = localize(model.backbone, image, [outputs], method="getam", normalize=False, start_layer=None)
        refined = pamr(denormalize(image, (0.5,) * 3, (0.5,) * 3) * 255, raw, iterations=10)
        refined = refined / (refined.amax(dim=(2, 3), keepdim=True) + 1e-5)
        dataset_labels = [classes.output_to_label(k) for k in outputs]
        out.append(label_completion(refined[0], dataset_labels, None, background_label=background))
    return out


@pytest.mark.parametrize("classes", [VOC_LIKE, NO_BACKGROUND], ids=["background", "no_background"])
def test_pseudo_labels_equal_the_building_blocks_image_by_image(classes):
    objective = _objective(classes)
    model = _model(objective, classes)
    batch = _batch(classes.num_fg)
    batch["label"][1] = 0  # an image with no class at all
    pseudo, _ = objective.pseudo_labels(model, batch["image"], batch["label"])
    reference = _direct_pseudo_labels(objective, model, batch, classes)
    for b in range(4):
        # The batched and the single-image passes round differently; a pixel at a percentile threshold may flip.
        agree = float((pseudo[b] == reference[b]).float().mean())
        assert agree > 0.999, (b, agree)
    assert torch.equal(pseudo[1], torch.full_like(pseudo[1], 0 if classes.has_background else 255))
    present = set(np.unique(pseudo.numpy()).tolist())
    assert present - {255} and present <= {0, 1, 2, 3, 255}


@pytest.mark.slow
def test_loss_is_finite_and_falls_on_a_tiny_model():
    objective = _objective(cls_steps=0, dropout=0.0)
    model = _model(objective)
    batch = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses, cls = [], []
    for step in range(20):
        loss, logs = objective(model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        cls.append(logs["cls"])
        assert all(math.isfinite(v) for v in logs.values())
    assert all(math.isfinite(v) for v in losses)
    # The pseudo labels change with the model, so the total is noisy early on; it still falls clearly.
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    assert cls[-1] < 0.5 * cls[0], cls


def test_saliency_loss_targets():
    batch = _batch()
    saliency = torch.zeros(4, 64, 64, dtype=torch.long)
    saliency[:, 16:48, 16:48] = 1
    batch["saliency"] = saliency
    results = {}
    for target in ("intended", "authors"):
        objective = _objective(cls_steps=0, saliency_loss=True, saliency_target=target)
        model = _model(objective)
        loss, logs = objective(model, batch, 0)
        assert math.isfinite(float(loss.detach()))
        results[target] = logs["saliency"]
        # The edited saliency the authors' target reads is the one label completion returns.
        pseudo, edited = objective.pseudo_labels(model, batch["image"], batch["label"], saliency)
        classes = present_classes(batch["label"])[0]
        maps = objective.refined_maps(model.backbone, batch["image"][:1], classes[None])[0]
        labels_ref, edited_ref = label_completion_with_saliency(
            maps[classes >= 0], [c + 1 for c in classes[classes >= 0].tolist()], saliency[0])
        assert torch.equal(edited[0], edited_ref) and torch.equal(pseudo[0], labels_ref)
    assert results["intended"] != pytest.approx(results["authors"])


def test_saliency_options_are_checked():
    with pytest.raises(ConfigError):
        _objective(saliency_target="other")
    with pytest.raises(ConfigError):
        _objective(NO_BACKGROUND, saliency_loss=True)
    with pytest.raises(ConfigError):
        _objective(unknown_option=1)
    objective = _objective(cls_steps=0, saliency_loss=True)
    with pytest.raises(ConfigError):
        objective(_model(objective), _batch(), 0)  # no saliency maps in the batch


def test_start_layer_out_of_range_is_refused_when_the_model_is_built():
    objective = _objective(start_layer=4)  # vit_nano_patch16 has 4 blocks: 0..3 (or -4..-1)
    with pytest.raises(ConfigError, match=r"start_layer 4 is out of range for a 4-block model"):
        _model(objective)
    _model(_objective(start_layer=-4))


def test_dense_crf_term_is_the_regulariser_on_the_raw_crop_inside_its_roi():
    from wsss.train.dense_crf_loss import DenseCRFLoss

    objective = _objective(cls_steps=0, dropout=0.0, dcrf_weight=1e-3)
    assert objective.needs_roi and not _objective().needs_roi
    model = _model(objective).eval()
    batch = _batch()
    batch["roi"] = torch.ones(4, 64, 64, dtype=torch.uint8)
    batch["roi"][:, :, 48:] = 0  # the padded right strip of the crops
    torch.manual_seed(0)
    loss, logs = objective(model, batch, step=0)
    torch.manual_seed(0)
    without, _ = _objective(cls_steps=0, dropout=0.0)(model, batch, step=0)
    # The term is exactly the regulariser of the model's softmax on the denormalised crop, gated by the labels.
    pseudo, _ = objective.pseudo_labels(model, batch["image"], batch["label"])
    logits = torch.nn.functional.interpolate(model(batch["image"]), size=(64, 64), mode="bilinear",
                                             align_corners=False)
    with torch.no_grad():
        expected = DenseCRFLoss(1e-3)(denormalize(batch["image"]) * 255, logits.softmax(dim=1), batch["roi"].float(),
                                      pseudo)
    assert logs["dcrf"] == pytest.approx(float(expected), rel=1e-4) and logs["dcrf"] < 0
    assert float(loss.detach()) == pytest.approx(float(without.detach()) + logs["dcrf"], rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="roi"):
        objective(model, _batch(), step=0)


def test_the_dataset_carries_the_crop_roi_when_asked(tmp_path):
    from wsss.data.synth import make_synthetic
    from wsss.data.transforms import build_transforms
    from wsss.data.voc import VOCDataset, collate

    root = make_synthetic(tmp_path / "d", num_train=2, num_val=1, size=32)
    dataset = VOCDataset(root, "train", transform=build_transforms({"crop": 48, "hflip": False}), seed=0)
    plain = dataset[0]
    dataset.with_roi = True
    item = dataset[0]
    assert "roi" not in plain and item["roi"].shape == (48, 48)
    assert torch.equal(item["mask"], plain["mask"])  # the labels decode as they were
    inside = item["roi"].bool()
    assert inside.sum() == 32 * 32 and torch.all(item["mask"][~inside] == 255)  # the padding is outside
    batch = collate([item, dataset[1]])
    assert batch["roi"].shape == (2, 48, 48) and batch["roi"].dtype == torch.uint8


def test_the_authors_and_the_intended_voc_presets(tmp_path):
    from wsss.data.synth import make_synthetic
    from wsss.settings import flatten
    from wsss.train import Trainer, load_config

    authors, intended = (flatten(load_config(p, ["data.root=/x"])) for p in ("getam_voc", "getam_voc_intended"))
    differ = {k for k in authors if authors[k] != intended[k]}
    assert differ == {"run_dir", "optim.authors_sgd_quirk", "method.saliency_target"}
    assert authors["model.name"] == "vit_base_r50_s16_384" and authors["model.head"] == "getam"
    assert authors["optim.authors_sgd_quirk"] and authors["method.saliency_target"] == "authors"
    assert authors["method.saliency_loss"] and authors["method.dcrf_weight"] == 1e-7
    # The saliency loss without saliency maps fails when the run starts, not in phase 2.
    root = make_synthetic(tmp_path / "d", num_train=4, num_val=1, size=32)
    cfg = load_config("getam_demo", [f"data.root={root}", f"run_dir={tmp_path / 'run'}", "method.saliency_loss=true",
                                     "data.batch_size=2",
                                     "device=cpu"])
    with pytest.raises(ConfigError, match="saliency_dir"):
        Trainer(cfg)
