"""PSA's ResNet-38, torchvision's ResNet-101 and the two DeepLabs built on them (issue 13).

The expected state-dict layouts are generated from small tables written from the sources (PSA's
``network/resnet38d.py`` ``Net.__init__``, torchvision's ``torchvision/models/resnet.py``), never by introspecting the
modules under test. Forward passes run on 32x32 inputs only, so the large networks stay fast on two cores.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
import pytest
from torch import nn

from wsss.errors import CheckpointError
from wsss.models.resnet import Bottleneck, ResNet, drop_classifier, resnet101
from wsss.models.resnet38 import BottleneckBlock, ResBlock, ResNet38
from wsss.segment.deeplab import ASPP, DeepLabV2, ResNet38DeepLab, upsample_logits
from wsss.train.optim import param_groups as wsss_param_groups

# --- the specs, written from the sources ------------------------------------------------------------------------

# PSA resnet38d.Net.__init__: (name, kind, in, mid, out, stride); "bot" is ResBlock_bot(in, out) (mid unused).
PSA_BLOCKS = [
    ("b2", "res", 64, 128, 128, 2), ("b2_1", "res", 128, 128, 128, 1), ("b2_2", "res", 128, 128, 128, 1),
    ("b3", "res", 128, 256, 256, 2), ("b3_1", "res", 256, 256, 256, 1), ("b3_2", "res", 256, 256, 256, 1),
    ("b4", "res", 256, 512, 512, 2), ("b4_1", "res", 512, 512, 512, 1), ("b4_2", "res", 512, 512, 512, 1),
    ("b4_3", "res", 512, 512, 512, 1), ("b4_4", "res", 512, 512, 512, 1), ("b4_5", "res", 512, 512, 512, 1),
    ("b5", "res", 512, 512, 1024, 1), ("b5_1", "res", 1024, 512, 1024, 1), ("b5_2", "res", 1024, 512, 1024, 1),
    ("b6", "bot", 1024, None, 2048, 1), ("b7", "bot", 2048, None, 4096, 1),
]
# torchvision resnet101: (layer, blocks, planes, stride) and the 4x expansion of Bottleneck.
TV_LAYERS = [(1, 3, 64, 1), (2, 4, 128, 2), (3, 23, 256, 2), (4, 3, 512, 2)]


def _bn(prefix: str, c: int, tracked: bool) -> list[tuple[str, tuple[int, ...]]]:
    keys = [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,))]
    return keys + ([(f"{prefix}.num_batches_tracked", ())] if tracked else [])


def psa_keys(tracked: bool) -> list[tuple[str, tuple[int, ...]]]:
    """PSA's state dict; ``tracked=False`` is what ``convert_mxnet_to_torch`` writes (no num_batches_tracked)."""
    keys = [("conv1a.weight", (64, 3, 3, 3))]
    for name, kind, cin, mid, cout, stride in PSA_BLOCKS:
        if kind == "res":
            keys += _bn(f"{name}.bn_branch2a", cin, tracked)
            keys += [(f"{name}.conv_branch2a.weight", (mid, cin, 3, 3))]
            keys += _bn(f"{name}.bn_branch2b1", mid, tracked)
            keys += [(f"{name}.conv_branch2b1.weight", (cout, mid, 3, 3))]
            if cin != cout or stride != 1:
                keys += [(f"{name}.conv_branch1.weight", (cout, cin, 1, 1))]
        else:
            keys += _bn(f"{name}.bn_branch2a", cin, tracked)
            keys += [(f"{name}.conv_branch2a.weight", (cout // 4, cin, 1, 1))]
            keys += _bn(f"{name}.bn_branch2b1", cout // 4, tracked)
            keys += [(f"{name}.conv_branch2b1.weight", (cout // 2, cout // 4, 3, 3))]
            keys += _bn(f"{name}.bn_branch2b2", cout // 2, tracked)
            keys += [(f"{name}.conv_branch2b2.weight", (cout, cout // 2, 1, 1))]
            keys += [(f"{name}.conv_branch1.weight", (cout, cin, 1, 1))]
    return keys + _bn("bn7", 4096, tracked)


def torchvision_keys(tracked: bool, fc: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    keys = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64, tracked)
    inplanes = 64
    for layer, blocks, planes, _ in TV_LAYERS:
        for j in range(blocks):
            p = f"layer{layer}.{j}"
            keys += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + _bn(f"{p}.bn1", planes, tracked)
            keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes, tracked)
            keys += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + _bn(f"{p}.bn3", planes * 4, tracked)
            if j == 0:
                keys += [(f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1))]
                keys += _bn(f"{p}.downsample.1", planes * 4, tracked)
            inplanes = planes * 4
    return keys + ([("fc.weight", (1000, 2048)), ("fc.bias", (1000,))] if fc else [])


def random_state(keys: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Positive values keep running_var a valid variance; the loader does not care, the forward might.
    return {k: torch.rand(shape, generator=g) + 0.5 for k, shape in keys}


def layout(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@contextmanager
def restored(module: nn.Module):
    """Load test states into a shared fixture, then put its own weights back (random all-positive weights would
    make the 100-layer forwards of later tests overflow)."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        yield module
    finally:
        module.load_state_dict(saved, strict=True)


# --- fixtures: each large network is built once ------------------------------------------------------------------


@pytest.fixture(scope="module")
def r38() -> ResNet38:
    torch.manual_seed(0)
    return ResNet38().eval()


@pytest.fixture(scope="module")
def psa_state() -> dict[str, torch.Tensor]:
    return random_state(psa_keys(tracked=False))  # as convert_mxnet_to_torch saves it (no num_batches_tracked)


@pytest.fixture(scope="module")
def r101() -> ResNet:
    torch.manual_seed(0)
    return resnet101().eval()


@pytest.fixture(scope="module")
def deeplab101() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(5).eval()


@pytest.fixture(scope="module")
def deeplab38() -> ResNet38DeepLab:
    torch.manual_seed(0)
    return ResNet38DeepLab(5).eval()


# --- ResNet-38 ---------------------------------------------------------------------------------------------------


def test_resnet38_layout_is_psas_and_converted_weights_load_strictly(r38, psa_state):
    assert layout(r38) == psa_keys(tracked=True)
    sd = psa_state
    with restored(r38):
        assert r38.load_state_dict(sd, strict=True).missing_keys == []
        own = r38.state_dict()
        for key in ("conv1a.weight", "b4_5.conv_branch2b1.weight", "b7.bn_branch2b2.running_var", "bn7.bias"):
            assert torch.equal(own[key], sd[key])
        with pytest.raises(RuntimeError):  # one key short is an error, not a silent skip
            r38.load_state_dict({k: v for k, v in sd.items() if k != "b6.conv_branch1.weight"}, strict=True)


def test_resnet38_strides_dilations_dropout_as_psa(r38):
    # (module path, stride, dilation) from PSA's constructor arguments.
    facts = [("b2.conv_branch2a", 2, 1), ("b4.conv_branch2a", 2, 1), ("b4_5.conv_branch2b1", 1, 1),
             ("b5.conv_branch2a", 1, 1), ("b5.conv_branch2b1", 1, 2), ("b5_1.conv_branch2a", 1, 2),
             ("b5_2.conv_branch2b1", 1, 2), ("b6.conv_branch2b1", 1, 4), ("b7.conv_branch2b1", 1, 4)]
    for path, stride, dilation in facts:
        conv = r38.get_submodule(path)
        assert conv.stride == (stride, stride) and conv.dilation == (dilation,) * 2 and conv.padding == (dilation,) * 2
    assert r38.b6.dropout_2b1.p == 0.3 and r38.b7.dropout_2b2.p == 0.5
    assert r38.b2_1.conv_branch1 is None and r38.b5.conv_branch1 is not None


def test_resnet38_forward_features_values_and_strides(r38):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = r38.forward_features(x)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            "conv4": (1, 512, 4, 4), "conv5": (1, 1024, 4, 4), "conv6": (1, 4096, 4, 4)}
        # PSA's forward_as_dict, step by step with the blocks' own forward.
        h = r38.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            h = getattr(r38, name)(h)
        conv4 = F.relu(r38.b5.bn_branch2a(h))
        h = r38.b5_2(r38.b5_1(r38.b5(h)))
        conv5 = F.relu(r38.b6.bn_branch2a(h))
        conv6 = F.relu(r38.bn7(r38.b7(r38.b6(h))))
        torch.testing.assert_close(feats["conv4"], conv4)
        torch.testing.assert_close(feats["conv5"], conv5)
        torch.testing.assert_close(feats["conv6"], conv6)
        torch.testing.assert_close(r38(x), conv6)
        assert r38(torch.randn(1, 3, 33, 41)).shape[-2:] == (5, 6)  # ceil(H / 8)


def _random_bn_stats(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))


def _bn_eval(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_psa_blocks_by_hand():
    torch.manual_seed(0)
    block = ResBlock(6, 4, 8, stride=2, first_dilation=1, dilation=2).eval()
    _random_bn_stats(block)
    x = torch.randn(2, 6, 9, 9)
    pre = F.relu(_bn_eval(x, block.bn_branch2a))
    br = F.conv2d(pre, block.conv_branch2a.weight, stride=2, padding=1)
    br = F.conv2d(F.relu(_bn_eval(br, block.bn_branch2b1)), block.conv_branch2b1.weight, padding=2, dilation=2)
    expected = F.conv2d(pre, block.conv_branch1.weight, stride=2) + br
    out, preact = block.forward_with_preact(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(preact, pre)

    same = ResBlock(8, 4, 8).eval()  # identity shortcut on the raw (not BN-ReLU'd) input
    _random_bn_stats(same)
    inp = torch.randn(1, 8, 5, 5)
    pre = F.relu(_bn_eval(inp, same.bn_branch2a))
    br = F.conv2d(F.relu(_bn_eval(F.conv2d(pre, same.conv_branch2a.weight, padding=1), same.bn_branch2b1)),
                  same.conv_branch2b1.weight, padding=1)
    torch.testing.assert_close(same(inp), inp + br)

    bot = BottleneckBlock(8, 16, dilation=4, dropout=0.5).eval()
    _random_bn_stats(bot)
    x = torch.randn(1, 8, 7, 7)
    pre = F.relu(_bn_eval(x, bot.bn_branch2a))
    br = F.conv2d(pre, bot.conv_branch2a.weight)
    br = F.conv2d(F.relu(_bn_eval(br, bot.bn_branch2b1)), bot.conv_branch2b1.weight, padding=4, dilation=4)
    br = F.conv2d(F.relu(_bn_eval(br, bot.bn_branch2b2)), bot.conv_branch2b2.weight)
    torch.testing.assert_close(bot(x), F.conv2d(pre, bot.conv_branch1.weight) + br)


def test_resnet38_train_mode_freezes_as_psa(r38):
    r38.train()
    try:
        bns = [m for m in r38.modules() if isinstance(m, nn.BatchNorm2d)]
        n_bn = sum(k.endswith("running_mean") for k, _ in psa_keys(tracked=False))
        assert len(bns) == n_bn == 37 and all(not m.training for m in bns)  # 15 ResBlocks x 2, 2 bots x 3, bn7
        assert all(not p.requires_grad for m in bns for p in m.parameters())
        assert not r38.conv1a.weight.requires_grad
        assert r38.b2.conv_branch2a.weight.requires_grad
        assert r38.b7.dropout_2b1.training  # dropout still follows train()
        r38.not_training.append(r38.b2)  # PSA's AffinityNet freezes b2..b2_2 this way
        r38.train()
        assert not r38.b2.conv_branch2a.weight.requires_grad
    finally:  # the shared fixture back as it was
        if r38.b2 in r38.not_training:
            r38.not_training.remove(r38.b2)
        r38.b2.requires_grad_(True)
        r38.train(False)
    free = ResNet38(freeze_bn=False, freeze_stem=False).train()
    assert free.bn7.training and free.bn7.weight.requires_grad and free.conv1a.weight.requires_grad


# --- ResNet-101 --------------------------------------------------------------------------------------------------


def test_resnet101_layout_is_torchvisions_and_loads_strictly(r101):
    assert layout(r101) == torchvision_keys(tracked=True)
    with restored(r101):
        for tracked in (False, True):  # resnet101-5d3b4d8f.pth predates num_batches_tracked; newer files have it
            sd = random_state(torchvision_keys(tracked), seed=int(tracked))
            r101.load_state_dict(sd, strict=True)
            own = r101.state_dict()
            for key in ("conv1.weight", "layer3.22.conv2.weight", "layer4.0.downsample.1.running_var", "fc.bias"):
                assert torch.equal(own[key], sd[key])


def test_headless_backbone_drops_exactly_the_classifier(deeplab101):
    backbone = deeplab101.backbone
    assert layout(backbone) == torchvision_keys(tracked=True, fc=False)
    sd = random_state(torchvision_keys(tracked=False), seed=3)
    with restored(deeplab101):
        assert deeplab101.load_backbone(sd) == ["fc.weight", "fc.bias"]
        assert torch.equal(backbone.state_dict()["layer2.1.conv3.weight"], sd["layer2.1.conv3.weight"])
    kept, dropped = drop_classifier(sd)
    assert dropped == ["fc.weight", "fc.bias"] and set(sd) - set(kept) == {"fc.weight", "fc.bias"}
    with pytest.raises(CheckpointError, match="missing"):
        backbone.load_torchvision({k: v for k, v in sd.items() if k != "layer1.0.conv1.weight"})
    with pytest.raises(CheckpointError, match="unexpected"):
        backbone.load_torchvision({**sd, "aux.weight": torch.zeros(1)})


def test_resnet101_dilation_as_torchvision(deeplab101, r101):
    dil = deeplab101.backbone
    # torchvision's _make_layer: the first block keeps the previous dilation, the others take the new one.
    assert dil.layer2[0].conv2.stride == (2, 2) and dil.layer2[0].conv2.dilation == (1, 1)
    assert dil.layer3[0].conv2.stride == (1, 1) and dil.layer3[0].conv2.dilation == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in dil.layer3[1:])
    assert dil.layer4[0].conv2.dilation == (2, 2) and dil.layer4[0].downsample[0].stride == (1, 1)
    assert all(b.conv2.dilation == (4, 4) for b in dil.layer4[1:])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        shapes = {k: tuple(v.shape) for k, v in dil.forward_features(x).items()}
        assert shapes == {"layer1": (1, 256, 8, 8), "layer2": (1, 512, 4, 4), "layer3": (1, 1024, 4, 4),
                          "layer4": (1, 2048, 4, 4)}
        plain = {k: tuple(v.shape) for k, v in r101.forward_features(x).items()}
        assert plain["layer3"] == (1, 1024, 2, 2) and plain["layer4"] == (1, 2048, 1, 1)
        feats = r101.forward_features(x)["layer4"]
        torch.testing.assert_close(r101(x), F.linear(feats.mean((2, 3)), r101.fc.weight, r101.fc.bias))
    assert dil.output_stride == 8 and r101.output_stride == 32


def test_bottleneck_by_hand():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=1, bias=False), nn.BatchNorm2d(16))
    block = Bottleneck(8, 4, stride=1, downsample=down, dilation=2).eval()
    _random_bn_stats(block)
    x = torch.randn(2, 8, 6, 6)
    h = F.relu(_bn_eval(F.conv2d(x, block.conv1.weight), block.bn1))
    h = F.relu(_bn_eval(F.conv2d(h, block.conv2.weight, padding=2, dilation=2), block.bn2))
    h = _bn_eval(F.conv2d(h, block.conv3.weight), block.bn3)
    ident = _bn_eval(F.conv2d(x, down[0].weight), down[1])
    torch.testing.assert_close(block(x), F.relu(h + ident))


# --- DeepLab -----------------------------------------------------------------------------------------------------


def test_aspp_is_the_sum_of_four_dilated_convs():
    torch.manual_seed(0)
    aspp = ASPP(16, 7)
    for conv in aspp.stages.children():  # non-zero biases, so a missing bias would show
        nn.init.normal_(conv.bias)
    x = torch.randn(2, 16, 30, 30)
    expected = sum(F.conv2d(x, getattr(aspp.stages, f"c{i}").weight, getattr(aspp.stages, f"c{i}").bias,
                            padding=r, dilation=r) for i, r in enumerate((6, 12, 18, 24)))
    torch.testing.assert_close(aspp(x), expected)
    assert [k for k, _ in aspp.named_parameters()] == [f"stages.c{i}.{p}" for i in range(4) for p in ("weight", "bias")]


def test_deeplabv2_forward_and_init(deeplab101):
    aspp = deeplab101.aspp
    w = torch.cat([c.weight.flatten() for c in aspp.stages.children()])
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4  # kazuto1011: N(0, 0.01)
    assert all(torch.equal(c.bias, torch.zeros_like(c.bias)) for c in aspp.stages.children())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = deeplab101(x)
        assert logits.shape == (1, 5, 4, 4)
        feats = deeplab101.backbone.forward_features(x)["layer4"]
        expected = sum(F.conv2d(feats, c.weight, c.bias, padding=r, dilation=r)
                       for c, r in zip(aspp.stages.children(), (6, 12, 18, 24)))
        torch.testing.assert_close(logits, expected)
        up = deeplab101(x, upsample=True)
        assert up.shape == (1, 5, 32, 32)
        torch.testing.assert_close(up, F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False))
        torch.testing.assert_close(upsample_logits(logits, (32, 32)), up)
    assert [k for k in deeplab101.state_dict() if not k.startswith("backbone.")] == [
        f"aspp.stages.c{i}.{p}" for i in range(4) for p in ("weight", "bias")]


def test_resnet38_deeplab_layout_forward_and_backbone_load(deeplab38, psa_state):
    head = [("fc8_seg_conv1.weight", (512, 4096, 3, 3)), ("fc8_seg_conv1.bias", (512,)),
            ("fc8_seg_conv2.weight", (5, 512, 3, 3)), ("fc8_seg_conv2.bias", (5,))]
    assert layout(deeplab38) == psa_keys(tracked=True) + head
    bound = (6 / (4096 * 9 + 512 * 9)) ** 0.5  # Xavier-uniform bound of fc8_seg_conv1
    w1 = deeplab38.fc8_seg_conv1.weight
    assert w1.abs().max() <= bound and abs(w1.std().item() - bound / 3 ** 0.5) < 0.02 * bound

    head_before = {k: v.clone() for k, v in deeplab38.state_dict().items() if k.startswith("fc8")}
    sd = psa_state
    with restored(deeplab38):
        deeplab38.load_backbone(sd)
        own = deeplab38.state_dict()
        assert torch.equal(own["b5_2.conv_branch2b1.weight"], sd["b5_2.conv_branch2b1.weight"])
        assert all(torch.equal(own[k], v) for k, v in head_before.items())
        with pytest.raises(CheckpointError, match="unexpected"):
            deeplab38.load_backbone({**sd, "linear1000.weight": torch.zeros(1)})
        with pytest.raises(CheckpointError, match="missing"):
            deeplab38.load_backbone({k: v for k, v in sd.items() if not k.startswith("bn7.")})

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = deeplab38(x)
        conv6 = deeplab38.forward_features(x)["conv6"]
        c1, c2 = deeplab38.fc8_seg_conv1, deeplab38.fc8_seg_conv2
        expected = F.conv2d(F.relu(F.conv2d(conv6, c1.weight, c1.bias, padding=12, dilation=12)),
                            c2.weight, c2.bias, padding=12, dilation=12)
        assert logits.shape == (1, 5, 4, 4)
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(deeplab38(x, upsample=True), upsample_logits(logits, (32, 32)))


def test_param_groups_split_backbone_and_head(deeplab101, deeplab38):
    g = deeplab101.param_groups()
    assert {id(p) for p in g.head} == {id(p) for p in deeplab101.aspp.parameters()}
    convs = [m.weight for m in deeplab101.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert {id(p) for p in g.backbone} == {id(p) for p in convs}  # frozen BatchNorm is in no group
    groups = g.optimizer_groups(1e-3, 10.0, head_bias_lr_mult=20.0)
    assert [(len(x["params"]), x["lr"]) for x in groups] == [(len(convs), 1e-3), (4, 1e-2), (4, 2e-2)]

    g = deeplab38.param_groups()
    head = [deeplab38.fc8_seg_conv1.weight, deeplab38.fc8_seg_conv1.bias, deeplab38.fc8_seg_conv2.weight,
            deeplab38.fc8_seg_conv2.bias]
    assert [id(p) for p in g.head] == [id(p) for p in head]
    names = {id(p): n for n, p in deeplab38.named_parameters()}
    assert all("fc8" not in names[id(p)] for p in g.backbone)
    assert id(deeplab38.conv1a.weight) not in {id(p) for p in g.backbone}
    psa_convs = [k for k, shape in psa_keys(tracked=False) if len(shape) == 4]
    assert len(g.backbone) == len(psa_convs) - 1 == 42  # every conv of PSA's ResNet-38 but conv1a

    # The toolkit's own optimiser grouping reads head_keys and reaches the same split.
    for model, expected_head in ((deeplab101, list(deeplab101.aspp.parameters())), (deeplab38, head)):
        tv = wsss_param_groups(model, weight_decay=1e-4, lr=1.0, head_lr_mult=10.0)
        ten = {id(p) for grp in tv if grp["lr_mult"] == 10.0 for p in grp["params"]}
        assert ten == {id(p) for p in expected_head}


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give a randomly initialised network the BatchNorm statistics of one batch, as pretrained weights have:
    without them the frozen (identity) BatchNorms let the activations grow or vanish over 100 layers."""
    model.eval()  # dropout off: the statistics of the network that is evaluated
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.train()
        m.momentum = 1.0
    with torch.no_grad():
        model(x)
    for m in bns:
        m.momentum = 0.1
        m.eval()


# lr per model: the random-weight ResNet-101 is far more sensitive than the pretrained one (the recipe's 2.5e-4).
# The last tests of the file: they train the shared fixtures.
@pytest.mark.parametrize("kind, lr, margin", [("deeplab101", 1e-5, 0.1), ("deeplab38", 1e-4, 0.05)])
def test_train_step_lowers_the_loss(kind, lr, margin, request):
    model = request.getfixturevalue(kind)
    torch.manual_seed(0)
    _calibrate_batchnorm(model, torch.randn(8, 3, 64, 64) if kind == "deeplab101" else torch.randn(4, 3, 32, 32))
    model.train()
    # A learnable task: four quadrants, each its own colour; the top rows ignored, as unsure pseudo-label pixels.
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, :16, 16:], target[:, 16:, :16], target[:, 16:, 16:] = 1, 2, 3
    x = torch.randn(5, 3)[target].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 32, 32)
    target[:, :4] = 255
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    mean_before = bn.running_mean.clone()
    opt = torch.optim.SGD(model.param_groups().optimizer_groups(lr=lr, head_lr_mult=10.0), lr=lr)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks in both evaluations: the step must lower this function
        return F.cross_entropy(model(x, upsample=True), target, ignore_index=255)

    first = loss()
    first.backward()
    head = model.param_groups().head
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    opt.step()
    with torch.no_grad():
        last = loss()
    assert last.item() < first.item() - margin
    assert torch.equal(bn.running_mean, mean_before)  # frozen BatchNorm: statistics untouched by training
