"""AReAM's objective: affinity labels, the balanced loss, the re-activated CAM, pseudo labels, entropies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference_maps import reference_localize
from wsss.data.classes import ClassSet
from wsss.data.transforms import build_transforms, eval_transforms
from wsss.data.voc import VOCDataset
from wsss.errors import ConfigError
from wsss.localize import normalize_maps
from wsss.methods.aream.objective import (
    AReAMObjective,
    affinity_labels,
    balanced_affinity_loss,
    entropy_weights,
    layer_entropies,
    pseudo_segmentation,
    reactivation_cams,
)
from wsss.methods.aream.localizer import AReAM
from wsss.models import Capture, create_model
from wsss.models.checkpoint import describe, load, save
from wsss.refine import par
from wsss.train import load_config
from wsss.train.objectives import build_objective

VOC_LIKE = ClassSet(("background", "a", "b", "c", "d"))
NO_BACKGROUND = ClassSet(("a", "b", "c", "d"))


def loop_affinity_labels(seg: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Token label = the top-left pixel of its cell (PyTorch 'nearest'); pairs compared one by one."""
    b, height, width = seg.shape
    h, w = grid
    sy, sx = height // h, width // w
    out = torch.zeros(b, h * w, h * w, dtype=torch.long)
    for k in range(b):
        tokens = [int(seg[k, r * sy, q * sx]) for r in range(h) for q in range(w)]
        for i, li in enumerate(tokens):
            for j, lj in enumerate(tokens):
                out[k, i, j] = 255 if 255 in (li, lj) else int(li == lj)
    return out


def loop_balanced_loss(s: torch.Tensor, y: torch.Tensor) -> float:
    pos = neg = n_pos = n_neg = 0.0
    for value, label in zip(s.flatten().tolist(), y.flatten().tolist()):
        if label == 1:
            pos += 1 - value
            n_pos += 1
        elif label == 0:
            neg += value
            n_neg += 1
    return 0.5 * pos / (n_pos + 1) + 0.5 * neg / (n_neg + 1)


def test_affinity_labels_hand_made_and_against_loops():
    seg = torch.tensor([[[1, 1, 2, 2, 255, 255],
                         [1, 1, 2, 2, 255, 255],
                         [0, 0, 2, 9, 1, 1],
                         [0, 0, 2, 2, 1, 1]]])
    y = affinity_labels(seg, (2, 3))  # tokens: 1, 2, 255 / 0, 2, 1
    expected = torch.tensor([[1, 0, 255, 0, 0, 1],
                             [0, 1, 255, 0, 1, 0],
                             [255, 255, 255, 255, 255, 255],
                             [0, 0, 255, 1, 0, 0],
                             [0, 1, 255, 0, 1, 0],
                             [1, 0, 255, 0, 0, 1]])
    assert torch.equal(y[0], expected)
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 4, (3, 12, 20), generator=g)
    seg[torch.rand(seg.shape, generator=g) < 0.2] = 255
    assert torch.equal(affinity_labels(seg, (3, 5)), loop_affinity_labels(seg, (3, 5)))


def test_balanced_loss_hand_number_and_against_loops():
    s = torch.tensor([[[0.2, 0.8], [0.5, 0.9]]])
    y = torch.tensor([[[1, 0], [255, 255]]])
    # pos: (1 - 0.2) / (1 + 1) = 0.4; neg: 0.8 / (1 + 1) = 0.4; total 0.5 * 0.4 + 0.5 * 0.4
    assert float(balanced_affinity_loss(s, y)) == pytest.approx(0.4)
    g = torch.Generator().manual_seed(1)
    s = torch.rand(2, 15, 15, generator=g)
    y = torch.randint(0, 3, (2, 15, 15), generator=g)
    y[y == 2] = 255
    assert float(balanced_affinity_loss(s, y)) == pytest.approx(loop_balanced_loss(s, y), rel=1e-6)


def test_entropy_weights_min_max_and_file(tmp_path):
    assert torch.allclose(entropy_weights([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.5]))
    assert entropy_weights(None) is None and entropy_weights("uniform") is None
    assert entropy_weights([2.0, 2.0]) is None
    path = tmp_path / "ent.json"
    path.write_text(json.dumps({"entropy": [7.0, 5.0, 6.0, 5.5]}))
    assert torch.allclose(entropy_weights(str(path)), torch.tensor([1.0, 0.0, 0.5, 0.25]))
    path.write_text("{\"entropy\": \"x\"}")
    with pytest.raises(ConfigError):
        entropy_weights(str(path))


def _noisy(model):
    """Larger-than-init weights, so that attention and CAMs are far from flat."""
    torch.manual_seed(30)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("head", ["token", "mct"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reactivation_against_a_loop_reference(head, weighted):
    """Step 1 against reference_maps.py's functional ViT: per image, per class, per view (the image and its
    mirror image), the CAM (MCT: times the class attention of every block) refined by the (weighted) mean of the
    head-mean patch attention of the blocks below layer_index, each written as explicit loops; upsampled,
    un-flipped, summed, ReLU, min-max."""
    torch.manual_seed(3)
    model = _noisy(create_model("vit_nano_patch16", num_classes=4, head=head)).eval()
    state = {k: v.detach().double() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 48, 80)  # a 3x5 grid: the position embeddings are interpolated
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    e = entropy_weights([0.3, 0.9, 0.1, 0.5]) if weighted else None
    shallow = None if e is None else 1 - e[:2]
    cams, classes = reactivation_cams(model, images, labels, layer_index=2, shallow_weights=shallow)
    assert classes.tolist() == [[0, 2], [1, -1]]
    ref = reference_localize(state, images.double(), classes.tolist(), "aream", num_heads=2, patch=16, flip=True,
                             head=head, layers=2, layer_weights=None if shallow is None else shallow.tolist())
    torch.testing.assert_close(cams, ref.float(), atol=1e-5, rtol=1e-4)
    assert cams[1, 1].abs().max() == 0
    assert (cams[0, 0] - cams[0, 1]).abs().max() > 0.05  # class maps differ: the comparison is not of flat maps
    if weighted:  # the weights matter: uniform weights give other maps
        uniform, _ = reactivation_cams(model, images, labels, layer_index=2)
        assert not torch.allclose(cams, uniform, atol=1e-4)


def test_reactivation_at_several_scales_sums_the_views():
    """The Conformer recipe's cam_scales: the multi-scale CAM is the min-max of the sum of each scale's raw views."""
    torch.manual_seed(4)
    model = _noisy(create_model("vit_nano_patch16", num_classes=4, head="token")).eval()
    images = torch.randn(1, 3, 64, 96)
    labels = torch.tensor([[1.0, 0, 1, 0]])
    multi, classes = reactivation_cams(model, images, labels, layer_index=2, scales=(0.5, 1.0))
    with AReAM(model, layers=2) as loc:
        raw = sum(loc(images, classes, scales=(s,), flip=True, normalize=False) for s in (0.5, 1.0))
    lo, hi = raw.flatten(2).amin(2)[..., None, None], raw.flatten(2).amax(2)[..., None, None]
    torch.testing.assert_close(multi, (raw - lo) / (hi - lo + 1e-6), atol=1e-5, rtol=1e-5)
    single, _ = reactivation_cams(model, images, labels, layer_index=2)
    assert (multi - single).abs().max() > 0.01


def stripes_image_and_maps():
    """Three vertical stripes of distinct colours with class-0 scores 0.9 (sure), 0.45 (band) and 0.1."""
    image = torch.zeros(1, 3, 64, 96)
    image[0, 0, :, :32] = 1.0
    image[0, 1, :, 32:64] = 1.0
    image[0, 2, :, 64:] = 1.0
    maps = torch.zeros(1, 2, 64, 96)
    maps[0, 0, :, :32], maps[0, 0, :, 32:64], maps[0, 0, :, 64:] = 0.9, 0.45, 0.1
    return image, maps, torch.tensor([[1.0, 0.0]])


def test_pseudo_segmentation_background_and_ignore():
    image, maps, _ = stripes_image_and_maps()
    cams, classes = maps[:, :1], torch.tensor([[0]])  # the map of classifier output 0
    centres = (16, 48, 80)
    voc = pseudo_segmentation(cams, classes, image, ClassSet(("background", "a", "b")))
    assert [int(voc[0, 32, x]) for x in centres] == [1, 255, 0]  # label 1 = first fg class
    camvid = pseudo_segmentation(cams, classes, image, ClassSet(("a", "b")))
    assert [int(camvid[0, 32, x]) for x in centres] == [0, 255, 255]  # no background: ignored instead
    # An image without labels (only an unused slot) is all background (VOC) or all ignored (no background class).
    unused = torch.tensor([[-1]])
    empty = pseudo_segmentation(cams, unused, image, ClassSet(("background", "a", "b")))
    assert int(empty.min()) == int(empty.max()) == 0
    empty = pseudo_segmentation(cams, unused, image, ClassSet(("a", "b")))
    assert int(empty.min()) == int(empty.max()) == 255


def loop_two_thresholds(cams, labels, images, class_set, high=0.55, low=0.35, scale=0.5):
    """The two-threshold rule image by image and pixel by pixel: for each threshold, the stack [t, maps of the
    image's classes in ascending label order], resized to scale x the size, softmax over the channels, PAR (the
    refine.par function on the image resized alike), resized back; then each pixel's first maximum, and the rule:
    the high run's label where it finds a class, 255 where only the low run does, else the background."""
    b, _, height, width = cams.shape
    half = (int(height * scale), int(width * scale))
    background = 0 if class_set.has_background else 255
    out = torch.zeros(b, height, width, dtype=torch.long)
    for i in range(b):
        present = [int(k) for k in labels[i].nonzero()[:, 0]]
        dataset_labels = [int(class_set.fg_labels[k]) for k in present]
        order = sorted(range(len(present)), key=lambda j: dataset_labels[j])
        channel_labels = [background] + [dataset_labels[j] for j in order]
        image = F.interpolate(images[i : i + 1], size=half, mode="bilinear", align_corners=False)
        winners = []
        for t in (high, low):
            stack = torch.stack([torch.full((height, width), t)] + [cams[i, present[j]] for j in order])[None]
            small = F.interpolate(stack, size=half, mode="bilinear", align_corners=False).softmax(dim=1)
            refined = F.interpolate(par(image, small), size=(height, width), mode="bilinear", align_corners=False)
            scores = refined[0].permute(1, 2, 0).tolist()  # (H, W, C) nested lists
            winner = [[0] * width for _ in range(height)]
            for y in range(height):
                for x in range(width):
                    best = 0
                    for c in range(1, len(channel_labels)):
                        if scores[y][x][c] > scores[y][x][best]:
                            best = c
                    winner[y][x] = best
            winners.append(winner)
        for y in range(height):
            for x in range(width):
                w_high, w_low = winners[0][y][x], winners[1][y][x]
                if w_high != 0:
                    out[i, y, x] = channel_labels[w_high]
                elif w_low != 0:
                    out[i, y, x] = 255
                else:
                    out[i, y, x] = background
    return out


@pytest.mark.parametrize("classes", [VOC_LIKE, NO_BACKGROUND])
def test_batched_pseudo_segmentation_against_a_pixel_loop(classes):
    g = torch.Generator().manual_seed(7)
    images = F.interpolate(torch.rand(3, 3, 8, 12, generator=g), size=(32, 48), mode="bilinear")
    cams = F.interpolate(torch.rand(3, 4, 4, 5, generator=g), size=(32, 48), mode="bilinear")
    cams = normalize_maps(cams)  # smooth blobs reaching 1: sure, band and background regions
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    # The batch layout of step 1: each image's classes first, -1 in the unused slots (their maps are noise).
    slots = torch.tensor([[0, 2, -1], [1, 2, 3], [-1, -1, -1]])
    packed = torch.stack([torch.stack([cams[i, max(k, 0)] if k >= 0 else torch.rand(32, 48, generator=g)
                                       for k in slots[i].tolist()]) for i in range(3)])
    seg = pseudo_segmentation(packed, slots, images, classes)
    ref = loop_two_thresholds(cams, labels, images, classes)
    assert torch.equal(seg, ref)
    assert torch.equal(pseudo_segmentation(packed, slots, images, classes, chunk_size=2), seg)
    # Several classes and ignore pixels: the comparison is not between empty maps; the band matters.
    assert len(seg.unique()) >= 3 and (seg == 255).any()
    background = 0 if classes.has_background else 255
    assert (seg[2] == background).all()


def reference_aream_loss(model, x, labels, seg, layer_index, e=None) -> float:
    """Classification + 0.1 * mean over deep blocks of the loop-built balanced loss, from a fresh forward."""
    with torch.no_grad():
        out = model(x, capture=Capture(attn_logits=True))
    cls = float(F.multilabel_soft_margin_loss(out.logits, labels))
    y = loop_affinity_labels(seg, out.grid)
    p = out.num_prefix
    per_layer = [loop_balanced_loss(torch.sigmoid(lg.mean(1)[:, p:, p:]), y) for lg in out.attn_logits[layer_index:]]
    if e is not None:
        per_layer = [v * float(w) for v, w in zip(per_layer, e[layer_index:])]
    return cls + 0.1 * sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("classes", [VOC_LIKE, NO_BACKGROUND])
def test_objective_warmup_then_affinity_loss(classes):
    torch.manual_seed(4)
    model = create_model("vit_nano_patch16", num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    batch = {"image": x, "label": labels, "mask": torch.zeros(2, 64, 64, dtype=torch.long)}
    ent = [0.5, 0.1, 0.9, 0.3]
    obj = build_objective({"name": "aream", "warmup_steps": 3, "layer_index": 2, "layer_weights": ent},
                          classes=classes)
    loss, logs = obj(model, batch, step=2)  # warm-up: classification only
    assert "aff" not in logs
    cls_only = F.multilabel_soft_margin_loss(model(x).detach(), labels)
    assert float(loss.detach()) == pytest.approx(float(cls_only), rel=1e-6)
    loss, logs = obj(model, batch, step=3)
    seg = obj.pseudo_labels(model, x, labels)
    e = entropy_weights(ent)
    assert float(loss.detach()) == pytest.approx(reference_aream_loss(model, x, labels, seg, 2, e), rel=1e-5)
    assert logs["aff"] > 0
    for k in range(2):  # each image's labels: its own classes, background (only with a background class), ignore
        allowed = set(classes.fg_labels[labels[k].nonzero()[:, 0].numpy()].tolist()) | {255}
        allowed |= {0} if classes.has_background else set()
        assert set(seg[k].unique().tolist()) <= allowed
    loss.backward()
    assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0


def test_objective_options_checked():
    with pytest.raises(ConfigError, match="unknown"):
        build_objective({"name": "aream", "layer_idx": 3}, classes=VOC_LIKE)
    with pytest.raises(ConfigError, match="low"):
        build_objective({"name": "aream", "high": 0.3, "low": 0.5}, classes=VOC_LIKE)
    with pytest.raises(ConfigError, match="aff_weight"):
        build_objective({"name": "aream", "aff_weight": "0.1"}, classes=VOC_LIKE)  # strict: a string is no number
    obj = build_objective({"name": "aream", "layer_index": 4}, classes=VOC_LIKE)
    model = create_model("vit_nano_patch16", num_classes=4)
    batch = {"image": torch.randn(1, 3, 32, 32), "label": torch.ones(1, 4)}
    with pytest.raises(ConfigError, match="no deep block"):
        obj(model, batch, 0)


def sharpened(model):
    """A random model's attention and CAM are nearly flat, so every entropy is about log2 N; sharpen both."""
    with torch.no_grad():
        model.head.weight.mul_(300)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4)
    return model


def loop_entropy(model, image: torch.Tensor, present: list[int]) -> list[float]:
    """Per block: refine each class map separately, add them, softmax, entropy with numpy's log2."""
    with torch.no_grad():
        out = model(image[None], capture=Capture(attn=True))
        weight = model.class_weights()[0].detach()
    tokens = out.patch_tokens[0]
    result = []
    for a in out.attn:
        attn = a[0].mean(0)[1:, 1:].double()
        total = torch.zeros(tokens.shape[0], dtype=torch.float64)
        for c in present:
            total += attn @ (tokens @ weight[c]).relu().double()
        prob = np.exp(total.numpy() - total.numpy().max())
        prob /= prob.sum()
        result.append(float(-(prob * np.log2(prob)).sum()))
    return result


def test_layer_entropies_against_loops():
    torch.manual_seed(5)
    model = sharpened(create_model("vit_nano_patch16", num_classes=3).eval())
    images = torch.randn(3, 3, 48, 64)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0]])
    ent = layer_entropies(model, images, labels)
    assert ent.shape == (3, 4)
    assert np.allclose(ent[0].numpy(), loop_entropy(model, images[0], [0, 2]), rtol=1e-5)
    assert np.allclose(ent[1].numpy(), loop_entropy(model, images[1], [1]), rtol=1e-5)
    assert ent[2].isnan().all()
    assert float(ent.nan_to_num().max()) <= math.log2(12) + 1e-6


def test_entropy_command_writes_the_dataset_mean(shared_data, tmp_path):
    root = shared_data / "voc_mini"
    dataset = VOCDataset(root, "train")
    torch.manual_seed(6)
    model = sharpened(create_model("vit_nano_patch16", num_classes=dataset.classes.num_fg))
    save(tmp_path / "model.safetensors", model,
         describe(model, "vit_nano_patch16", dataset.classes.names, mean=(0.5,) * 3, std=(0.5,) * 3))
    out = tmp_path / "ent.json"
    from wsss.cli.main import main

    assert main(["entropy", "--checkpoint", str(tmp_path), "--data", str(root), "--split", "train", "--out",
                 str(out), "--size", "64", "--batch", "2", "--device", "cpu"]) == 0
    written = json.loads(out.read_text())
    assert written["num_images"] == len(dataset)
    loaded, _ = load(tmp_path)
    transform = eval_transforms((64, 64), interpolation="bicubic")
    per_image = [loop_entropy(loaded, transform(dataset.load_image(i))[0],
                              np.flatnonzero(dataset.labels(i)).tolist()) for i in range(len(dataset))]
    assert np.allclose(written["entropy"], np.mean(per_image, axis=0), rtol=1e-5)
    assert np.ptp(written["entropy"]) > 0.1  # the blocks differ, so the comparison above can fail


def test_conformer_preset_is_the_papers_recipe():
    cfg = load_config("aream_conformer_voc", ["data.root=/data"])
    build_transforms(cfg["data"]["transforms"])
    obj = build_objective(cfg["method"], classes=VOC_LIKE)
    assert cfg["model"]["name"] == "conformer_small_patch16" and cfg["model"]["head"] == "conformer"
    assert obj.layer_index == 9 and obj.options.cam_scales == [0.5, 1.0, 1.5]
    assert cfg["optim"]["lr"] == 5e-5 and cfg["optim"]["head_lr_mult"] == 10.0 and cfg["optim"]["weight_decay"] == 0.01
    assert cfg["data"]["batch_size"] == 8 and cfg["data"]["transforms"]["crop"] == 384
    steps_per_epoch = 10582 // 8
    assert cfg["train"]["steps"] == 12 * steps_per_epoch and obj.warmup_steps == 2 * steps_per_epoch


@pytest.mark.parametrize("preset,classes", [("aream_voc", VOC_LIKE), ("aream_coco", VOC_LIKE),
                                            ("aream_camvid", NO_BACKGROUND), ("baseline_camvid", NO_BACKGROUND)])
def test_presets_load_and_build(preset, classes):
    cfg = load_config(preset, ["data.root=/data"])
    build_transforms(cfg["data"]["transforms"])
    obj = build_objective(cfg["method"], classes=classes)
    assert cfg["model"]["weights"] is None  # never a hardcoded path: given on the command line
    if preset.startswith("aream"):
        assert isinstance(obj, AReAMObjective) and obj.layer_index == 7 and obj.options.aff_weight == 0.1
        assert 0 < obj.warmup_steps < cfg["train"]["steps"]
