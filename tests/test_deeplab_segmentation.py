"""The two DeepLabs as segmentation models of the toolkit: ``create_model`` builds their CNN backbones, the decoder
registry turns them into DeepLabs, the engine trains them (head x10, frozen BatchNorm and stem left out), checkpoints
reload them and ``wsss predict`` runs on them, with AReAM's max fusion.

Both networks run at full width (ResNet-101, ResNet-38) on 48-pixel images. Their weights are random, with
BatchNorm statistics measured on one batch (as pretrained weights have), so the frozen BatchNorms keep the
activations in range; the torchvision ResNet's residual branches are scaled down for the same reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cli.main import main
from wsss.data.io import read_mask
from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset
from wsss.errors import CheckpointError, ConfigError
from wsss.models import create_model, list_models, make_segmenter
from wsss.models.checkpoint import build, describe, load
from wsss.models.decoders import DECODERS
from wsss.models.resnet import resnet101
from wsss.models.resnet38 import ResNet38
from wsss.segment import DecoderOptions
from wsss.segment.deeplab import DeepLabV2, ResNet38DeepLab
from wsss.segment.predict import predict_probs
from wsss.train import Trainer, load_config

SIZE = 48  # image side: 6 x 6 positions at output stride 8
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _calibrate(model: nn.Module, forward, x: torch.Tensor) -> None:
    """BatchNorm running statistics of one batch (momentum None: the plain average), then eval mode."""
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.train()
        m.momentum = None
    with torch.no_grad():
        forward(x)
    for m in bns:
        m.momentum = 0.1
        m.eval()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("dl") / "d", num_train=2, num_val=2, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> Path:
    """A torchvision ``resnet101-*.pth`` layout (with its 1000-way fc)."""
    torch.manual_seed(0)
    net = resnet101(num_classes=1000, replace_stride_with_dilation=(False, True, True))
    _calibrate(net, net.forward_features, torch.randn(4, 3, SIZE, SIZE))
    with torch.no_grad():
        for name, m in net.named_modules():
            if name.endswith("bn3"):  # residual branches small: 33 blocks of frozen BN would add up
                m.weight.mul_(0.1)
    path = tmp_path_factory.mktemp("w") / "resnet101-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def psa_file(tmp_path_factory) -> Path:
    """PSA's ``res38_cls.pth`` layout: the ResNet-38 without num_batches_tracked, plus its classifier fc8."""
    torch.manual_seed(1)
    net = ResNet38()
    _calibrate(net, net.forward_features, torch.randn(2, 3, SIZE, SIZE))
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc8.weight"] = torch.randn(20, 4096, 1, 1)
    path = tmp_path_factory.mktemp("w") / "res38_cls-random.pth"
    torch.save(state, path)
    return path


def _train(preset: str, synth: Path, run: Path, weights: Path, *extra: str) -> Trainer:
    # The same two images every step, unaugmented: the loss must fall.
    cfg = load_config(preset, [f"data.root={synth}", "data.split=train", f"run_dir={run}", f"model.weights={weights}",
                               "data.batch_size=2", "data.num_workers=0", f"data.transforms.crop={SIZE}",
                               "data.transforms.random_scale=null", "data.transforms.hflip=false",
                               "train.ckpt_every=0", "train.log_every=1", "device=cpu", *extra])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def run101(synth, torchvision_file, tmp_path_factory) -> tuple[Path, Trainer]:
    run = tmp_path_factory.mktemp("run") / "dl101"
    # The random ResNet-101 needs a smaller lr than the recipe's pretrained one (2.5e-4).
    return run, _train("segment_acr_voc", synth, run, torchvision_file, "train.steps=4", "optim.lr=2e-5")


@pytest.fixture(scope="module")
def run38(synth, psa_file, tmp_path_factory) -> tuple[Path, Trainer]:
    run = tmp_path_factory.mktemp("run") / "dl38"
    return run, _train("segment_aream_voc", synth, run, psa_file, "train.steps=2")


def _seg_losses(run: Path) -> list[float]:
    return [json.loads(line)["seg"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _groups(trainer: Trainer) -> dict[float, set[int]]:
    """Parameter ids by learning-rate multiplier of the engine's optimiser."""
    groups: dict[float, set[int]] = {}
    for g in trainer.optimizer.param_groups:
        groups.setdefault(g["lr_mult"], set()).update(id(p) for p in g["params"])
    return groups


# --------------------------------------------------------------------------------------------- backbones


def test_create_model_builds_the_headless_backbones_and_loads_them_strictly(torchvision_file, psa_file, tmp_path):
    assert {"resnet101", "resnet38d"} <= set(list_models())
    file = torch.load(torchvision_file, weights_only=True)
    r101 = create_model("resnet101", weights=torchvision_file)
    own = r101.state_dict()
    assert set(own) == set(file) - {"fc.weight", "fc.bias"}  # exactly the classifier dropped
    assert all(torch.equal(own[k], file[k]) for k in own)
    assert r101.output_stride == 8 and r101.eval()(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 2048, 6, 6)
    # What the engine passes to every backbone changes nothing.
    same = create_model("resnet101", weights=torchvision_file, num_classes=20, head="token", pool="avg",
                        drop_path_rate=0.0).state_dict()
    assert set(same) == set(own) and all(torch.equal(same[k], own[k]) for k in own)

    psa = torch.load(psa_file, weights_only=True)
    r38 = create_model("resnet38d", weights=psa_file)
    own38 = r38.state_dict()
    assert "fc8.weight" not in own38 and set(own38) - set(psa) == {k for k in own38 if "num_batches_tracked" in k}
    assert all(torch.equal(own38[k], psa[k]) for k in psa if k != "fc8.weight")

    for bad, word in ((dict(head="conv"), "head='conv'"), (dict(pool="max"), "pool='max'"),
                      (dict(drop_path_rate=0.1), "drop_path_rate=0.1"), (dict(img_size=224), "img_size=224")):
        with pytest.raises(ConfigError, match=f"headless CNN backbone.*{word}"):
            create_model("resnet101", **bad)
    extra = tmp_path / "extra.pth"
    torch.save({**file, "layer5.weight": torch.zeros(1)}, extra)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*unexpected keys \(1\): layer5.weight"):
        create_model("resnet101", weights=extra)
    with pytest.raises(CheckpointError, match=r"resnet101-random\.pth.*missing.*b2\..*expected PSA"):
        create_model("resnet38d", weights=torchvision_file)


def test_decoders_check_their_backbone_and_settings(psa_file):
    # The objective offers exactly the registered decoders.
    segmenting = {name for name, decoder in DECODERS.items() if decoder.task == "segmentation"}
    assert set(get_args(DecoderOptions.model_fields["decoder"].annotation)) == segmenting
    vit = create_model("vit_nano_patch16")
    r101 = create_model("resnet101")
    with pytest.raises(ValueError, match="deeplabv2 decoder sits on a headless ResNet.*VisionTransformer.*light or dpt"):
        make_segmenter(vit, {"decoder": "deeplabv2", "num_classes": 3})
    with pytest.raises(ValueError, match="dpt decoder sits on a ViT, not on a ResNet; .*choose deeplabv2"):
        make_segmenter(r101, {"decoder": "dpt", "num_classes": 3, "dim": 16})
    with pytest.raises(ValueError, match="deeplab_resnet38 decoder sits on PSA's ResNet-38.*choose deeplabv2"):
        make_segmenter(r101, {"decoder": "deeplab_resnet38", "num_classes": 3})
    with pytest.raises(ValueError, match="deeplabv2 decoder has no setting dim, levels"):
        make_segmenter(r101, {"decoder": "deeplabv2", "num_classes": 3, "dim": 16, "levels": [1]})
    r38 = create_model("resnet38d", weights=psa_file)
    with pytest.raises(ValueError, match="deeplabv2 decoder sits on .* not on a ResNet38; .*choose deeplab_resnet38"):
        make_segmenter(r38, {"decoder": "deeplabv2", "num_classes": 3})
    # The ResNet-38 DeepLab is the flat-named network with the backbone's weights.
    seg = make_segmenter(r38, {"decoder": "deeplab_resnet38", "num_classes": 3})
    assert isinstance(seg, ResNet38DeepLab)
    backbone, own = r38.state_dict(), seg.state_dict()
    assert set(own) - set(backbone) == {f"fc8_seg_conv{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert all(torch.equal(own[k], v) for k, v in backbone.items())
    x = torch.randn(1, 3, 40, 56)  # not a multiple of 8: the logits still come at the input size
    seg.eval()
    with torch.no_grad():
        torch.testing.assert_close(seg(x), F.interpolate(seg(x, upsample=False), size=(40, 56), mode="bilinear",
                                                         align_corners=False), rtol=0, atol=0)


def test_wrong_pairs_and_foreign_settings_are_config_errors(synth, tmp_path):
    base = [f"data.root={synth}", "data.split=train", f"run_dir={tmp_path / 'r'}", "data.batch_size=2",
            "device=cpu", "model.weights=null"]
    with pytest.raises(ConfigError, match="the dpt decoder sits on a ViT, not on a ResNet"):
        Trainer(load_config("segment_acr_voc", [*base, "method.decoder=dpt"]))
    with pytest.raises(ConfigError, match="deeplabv2 decoder has no setting dim"):
        Trainer(load_config("segment_acr_voc", [*base, "method.dim=256"]))
    with pytest.raises(ConfigError, match="deeplabv2 decoder sits on a headless ResNet"):
        Trainer(load_config("segment_camvid", [*base, "model.name=vit_nano_patch16", "method.decoder=deeplabv2"]))
    # A classifier's method on a CNN backbone: there is no classifier to train.
    with pytest.raises(ConfigError, match="resnet101 is a headless CNN backbone without a classifier"):
        Trainer(load_config("baseline_camvid", [*base, "model.name=resnet101", "model.head=token"]))


# --------------------------------------------------------------------------------------------- engine


def test_deeplabv2_trains_through_the_engine_with_a_x10_head(run101):
    run, trainer = run101
    model = trainer.model
    assert isinstance(model, DeepLabV2) and trainer.cfg["method"]["decoder"] == "deeplabv2"
    losses = _seg_losses(run)
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    groups = _groups(trainer)
    assert groups[10.0] == {id(p) for p in model.aspp.parameters()}
    trainable = {id(p) for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    assert groups[1.0] == trainable
    convs = {id(m.weight) for m in model.backbone.modules() if isinstance(m, nn.Conv2d)}
    assert trainable == convs  # every BatchNorm parameter frozen, in no group
    lrs = {g["lr_mult"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {1.0: pytest.approx(2e-5), 10.0: pytest.approx(2e-4)}


def test_deeplabv2_checkpoint_reloads_with_the_same_logits(run101):
    run, trainer = run101
    model, spec = load(run)
    assert isinstance(model, DeepLabV2) and spec.arch == "resnet101" and spec.method == "segmentation"
    assert spec.segmenter == {"decoder": "deeplabv2", "num_classes": 5, "rates": [6, 12, 18, 24], "freeze_bn": True}
    assert spec.num_classes == 0 and spec.mean == IMAGENET[0] and spec.classes[0] == "background"
    x = torch.randn(2, 3, 40, 56)
    trained = trainer.model.eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5, 40, 56)
        torch.testing.assert_close(out, trained(x), rtol=0, atol=0)
    # describe and build round-trip without the engine, too.
    again = build(describe(model, "resnet101", spec.classes))
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), out, rtol=0, atol=0)


def test_resnet38_deeplab_trains_and_reloads(run38):
    run, trainer = run38
    model = trainer.model
    assert isinstance(model, ResNet38DeepLab)
    losses = _seg_losses(run)  # at the recipe's lr 7e-4, x10 on the head
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], losses
    head = [model.fc8_seg_conv1.weight, model.fc8_seg_conv1.bias, model.fc8_seg_conv2.weight,
            model.fc8_seg_conv2.bias]
    groups = _groups(trainer)
    assert groups[10.0] == {id(p) for p in head}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[i].startswith(("fc8", "conv1a")) and ".bn" not in names[i] and not names[i].startswith("bn")
               for i in groups[1.0])
    assert id(model.conv1a.weight) not in groups[1.0] | groups[10.0]
    assert len(groups[1.0]) == 42  # every conv of PSA's ResNet-38 but conv1a
    # AReAM's PolyOptimizer quirk: its weight decay value is the momentum, and there is no decay.
    assert {(g["momentum"], g["weight_decay"]) for g in trainer.optimizer.param_groups} == {(1e-5, 0.0)}
    reloaded, spec = load(run)
    assert isinstance(reloaded, ResNet38DeepLab) and spec.arch == "resnet38d"
    assert spec.segmenter["decoder"] == "deeplab_resnet38" and "b7.conv_branch2b2.weight" in reloaded.state_dict()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- predict


class _TinySegmenter(nn.Module):
    """A stand-in segmentation model at stride 8: a 3x3 conv, 8x8 average pooling, logits resized to the input."""

    patch_size = 8

    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        nn.init.normal_(self.conv.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(F.avg_pool2d(self.conv(x), 8), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _by_hand(model: nn.Module, images: torch.Tensor, sizes: list[tuple[int, int]], flip: bool, fusion: str):
    """Every view size's logits at the image size (the mirror image's averaged in), fused by hand."""
    h, w = images.shape[-2:]
    per_size = []
    with torch.no_grad():
        for size in sizes:
            view = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            logits = F.interpolate(model(view), size=(h, w), mode="bilinear", align_corners=False)
            if flip:
                mirrored = F.interpolate(model(view.flip(-1)), size=(h, w), mode="bilinear", align_corners=False)
                logits = (logits + mirrored.flip(-1)) / 2
            per_size.append(logits)
    if fusion == "mean":
        return (sum(per_size) / len(per_size)).softmax(dim=1)
    probs = torch.stack([p.softmax(dim=1) for p in per_size])
    return probs.amax(dim=0)


def test_max_fusion_is_the_pixelwise_max_over_the_scales():
    model = _TinySegmenter().eval()
    images = torch.randn(2, 3, 48, 64)
    sizes = [(24, 32), (48, 64), (72, 96)]  # scales 0.5, 1, 1.5: all multiples of 8, no rounding
    for flip in (False, True):
        got = predict_probs(model, images, (0.5, 1.0, 1.5), flip=flip, fusion="max")
        torch.testing.assert_close(got, _by_hand(model, images, sizes, flip, "max"), atol=1e-6, rtol=1e-5)
        mean = predict_probs(model, images, (0.5, 1.0, 1.5), flip=flip)
        torch.testing.assert_close(mean, _by_hand(model, images, sizes, flip, "mean"), atol=1e-6, rtol=1e-5)
        assert (got - mean).abs().max() > 1e-2  # the fusion matters on this model
    squares = predict_probs(model, images, square_sizes=[32, 48], fusion="max")
    torch.testing.assert_close(squares, _by_hand(model, images, [(32, 32), (48, 48)], False, "max"),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="fusion must be one of mean, max"):
        predict_probs(model, images, fusion="median")


def test_wsss_predict_runs_on_a_trained_deeplab_with_max_fusion(run101, synth, tmp_path):
    run, _ = run101
    out = tmp_path / "pred"
    scales = ["0.5", "1.0", "1.5"]
    assert main(["predict", "--checkpoint", str(run), "--data", str(synth), "--split", "val", "--out", str(out),
                 "--scales", *scales, "--fusion", "max", "--device", "cpu"]) == 0
    model, spec = load(run)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (spec.mean, spec.std))
    ds = VOCDataset(synth, "val")
    sizes = [(SIZE // 2, SIZE // 2), (SIZE, SIZE), (SIZE * 3 // 2, SIZE * 3 // 2)]
    for i, image_id in enumerate(ds.ids):
        image = torch.from_numpy(ds.load_image(i)).permute(2, 0, 1).float() / 255
        x = ((image - mean) / std)[None]
        reference = _by_hand(model, x, sizes, False, "max")
        torch.testing.assert_close(predict_probs(model, x, (0.5, 1.0, 1.5), fusion="max"), reference,
                                   atol=1e-5, rtol=1e-4)
        np.testing.assert_array_equal(read_mask(out / f"{image_id}.png"), reference[0].argmax(0).numpy())
    settings = json.loads((out / "wsss-manifest.json").read_text())["settings"]
    assert settings["fusion"] == "max" and settings["scales"] == [0.5, 1.0, 1.5] and not settings["flip"]
    # Another fusion is another setting of the folder: refused without --overwrite.
    assert main(["predict", "--checkpoint", str(run), "--data", str(synth), "--split", "val", "--out", str(out),
                 "--scales", *scales, "--device", "cpu"]) == 2
