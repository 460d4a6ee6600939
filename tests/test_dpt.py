"""GETAM's DPT decoder: the authors' key layout, their forward written out, the shared GETAM head, and training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from wsss.errors import CheckpointError
from wsss.models import Capture, DPTSegmentationModel, create_model, load_into
from wsss.models.checkpoint import build, describe, load, save
from wsss.models.dpt import from_authors_state_dict, is_authors_checkpoint


def _authors_decoder_keys(hybrid: bool, features: int = 256, vit: int = 768, classes: int = 20) -> dict:
    """Key -> shape of the non-backbone part of the authors' ``DPTSegmentationModel`` (read off ``DPT/DPT.py``,
    ``DPT/blocks.py`` and ``DPT/vit.py``: ``_make_scratch``, ``FeatureFusionBlock_custom(bn=True)``, ``SELayer``,
    the head in ``DPTSegmentationModel.__init__``, ``_make_vit_b_rn50_backbone`` / ``_make_vit_b16_backbone``)."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k, bias=True):
        keys[name + ".weight"] = (cout, cin, k, k)
        if bias:
            keys[name + ".bias"] = (cout,)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    def readout(name):
        keys[name + ".0.project.0.weight"] = (vit, 2 * vit)
        keys[name + ".0.project.0.bias"] = (vit,)

    # reassembly: (level, out channels, resampling) as in the authors' act_postprocess{k}
    if hybrid:
        reassembly = [(3, 768, None), (4, 768, "down")]
        scratch_in = [256, 512, 768, 768]
    else:
        reassembly = [(1, 96, 4), (2, 192, 2), (3, 384, None), (4, 768, "down")]
        scratch_in = [96, 192, 384, 768]
    for level, out, resample in reassembly:
        name = f"pretrained.act_postprocess{level}"
        readout(name)
        conv(name + ".3", vit, out, 1)
        if resample == "down":
            conv(name + ".4", out, out, 3)
        elif resample:
            keys[name + ".4.weight"] = (out, out, resample, resample)  # ConvTranspose2d: (in, out, k, k)
            keys[name + ".4.bias"] = (out,)
    for k, cin in enumerate(scratch_in, start=1):
        conv(f"scratch.layer{k}_rn", cin, features, 3, bias=False)
    for k in range(1, 5):
        block = f"scratch.refinenet{k}"
        conv(block + ".out_conv", features, features, 1)
        for unit in ("resConfUnit1", "resConfUnit2"):
            conv(f"{block}.{unit}.conv1", features, features, 3, bias=False)
            conv(f"{block}.{unit}.conv2", features, features, 3, bias=False)
            bn(f"{block}.{unit}.bn1", features)
            bn(f"{block}.{unit}.bn2", features)
    keys["cam_module.fc.0.weight"] = (features // 16, features)
    keys["cam_module.fc.2.weight"] = (features, features // 16)
    conv("cam_module.body.0", features, features, 3)
    conv("cam_module.body.2", features, features, 3)
    conv("scratch.output_conv.0", features, features, 3, bias=False)
    bn("scratch.output_conv.1", features)
    conv("scratch.output_conv.4", features, classes + 1, 1)
    keys["cls_head.weight"] = (classes, vit)
    keys["cls_head.bias"] = (classes,)
    return keys


def _authors_state(arch: str, hybrid: bool) -> dict[str, torch.Tensor]:
    """A random state dict with the authors' full layout: their timm ViT (ImageNet head included) under
    ``pretrained.model.`` plus the decoder."""
    timm_vit = create_model(arch, num_classes=1000, head="token").state_dict()
    state = {f"pretrained.model.{k}": torch.randn_like(v.float()).to(v.dtype) for k, v in timm_vit.items()}
    for key, shape in _authors_decoder_keys(hybrid).items():
        state[key] = torch.randint(0, 5, shape) if key.endswith("num_batches_tracked") else torch.randn(shape)
    return state


@pytest.mark.parametrize("arch,hybrid", [("vit_base_r50_s16_384", True), ("vit_base_patch16_384", False)])
def test_the_authors_checkpoint_layout_loads_strictly(arch, hybrid):
    state = _authors_state(arch, hybrid)
    assert is_authors_checkpoint(state)
    model = DPTSegmentationModel(create_model(arch, num_classes=20, head="getam"), 21, dim=256)
    renamed, dropped = from_authors_state_dict(state)
    assert dropped == ["pretrained.model.head.weight", "pretrained.model.head.bias"]
    load_into(model, renamed, source="authors")  # strict: every key and shape must match
    got = model.state_dict()
    assert torch.equal(got["encoder.head.conv2.weight"], state["pretrained.act_postprocess4.4.weight"])
    assert torch.equal(got["encoder.head.fc.weight"], state["cls_head.weight"])
    assert torch.equal(got["scratch.refinenet3.resConfUnit1.bn2.running_var"],
                       state["scratch.refinenet3.resConfUnit1.bn2.running_var"])
    decoder_keys = {k for k in got if not k.startswith("encoder.")}
    expected = {k for k in _authors_decoder_keys(hybrid) if not k.startswith(("cls_head", "pretrained.act_postprocess4"))}
    assert decoder_keys == expected
    # A checkpoint that does not fit is refused with the key named.
    renamed["scratch.layer1_rn.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(CheckpointError, match="scratch.layer1_rn.weight"):
        load_into(model, renamed, source="authors")


def _authors_forward(model: DPTSegmentationModel, x: torch.Tensor) -> torch.Tensor:
    """The decoder as the authors' ``DPT.forward`` runs it, written out with functional calls on the same
    parameters (scale-factor upsampling, SE from an average pool, the head's ops in order)."""
    enc = model.encoder
    out = enc(x, capture=Capture(hidden=True))
    h, w = out.grid
    p = model.pretrained

    def reassemble(seq, tokens):
        cls = tokens[:, :1].expand(-1, tokens.shape[1] - 1, -1)
        lin = seq[0].project[0]
        t = F.gelu(F.linear(torch.cat([tokens[:, 1:], cls], -1), lin.weight, lin.bias))
        t = t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
        for layer in list(seq)[3:]:
            t = layer(t)
        return t

    hidden = out.hidden
    layers = [reassemble(p.act_postprocess1, hidden[model.levels[0]]),
              reassemble(p.act_postprocess2, hidden[model.levels[1]]),
              reassemble(p.act_postprocess3, hidden[model.levels[2]])]
    head = enc.head
    t = F.gelu(head.readout[0](torch.cat([hidden[-1][:, 1:], hidden[-1][:, :1].expand(-1, h * w, -1)], -1)))
    layers.append(head.conv2(head.conv1(t.transpose(1, 2).reshape(t.shape[0], -1, h, w))))
    s = model.scratch
    rn = [getattr(s, f"layer{k}_rn")(layers[k - 1]) for k in range(1, 5)]

    def unit(u, x):
        y = u.bn1(F.conv2d(F.relu(x), u.conv1.weight, padding=1))
        return u.bn2(F.conv2d(F.relu(y), u.conv2.weight, padding=1)) + x

    def fuse(block, x, skip=None):
        if skip is not None:
            x = x + unit(block.resConfUnit1, skip)
        x = F.interpolate(unit(block.resConfUnit2, x), scale_factor=2, mode="bilinear", align_corners=True)
        return block.out_conv(x)

    path = fuse(s.refinenet4, rn[3])
    path = fuse(s.refinenet3, path, rn[2])
    path = fuse(s.refinenet2, path, rn[1])
    path = fuse(s.refinenet1, path, rn[0])
    se = model.cam_module
    y = se.body[2](F.relu(se.body[0](path)))
    gate = torch.sigmoid(se.fc[2](F.relu(se.fc[0](F.adaptive_avg_pool2d(y, 1).flatten(1)))))
    path = y * gate[:, :, None, None] + path
    oc = s.output_conv
    logits = oc[4](F.relu(oc[1](oc[0](path))))
    return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)


def _tiny_dpt(head: str = "getam", classes: int = 4) -> DPTSegmentationModel:
    torch.manual_seed(0)
    backbone = create_model("vit_tiny_patch16_224", num_classes=classes - 1, head=head)
    model = DPTSegmentationModel(backbone, classes, dim=32)
    for module in model.modules():  # non-trivial BN statistics, so eval mode is tested with them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_the_decoder_equals_the_authors_forward_and_reaches_the_input_size():
    model = _tiny_dpt()
    x = torch.randn(2, 3, 128, 160)  # an even token grid (8 x 10), as the authors' 256/320/480 inputs
    with torch.no_grad():
        ours, ref = model(x), _authors_forward(model, x)
    assert ours.shape == (2, 4, 128, 160)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # The classifier logits are the pooled GETAM head features through fc (the authors' cls_head on layer_4).
    out = model(x, capture=Capture())
    pooled = out.vit.head_features.mean(dim=(2, 3))
    torch.testing.assert_close(out.vit.logits, model.encoder.head.fc(pooled), rtol=1e-4, atol=1e-5)


def test_odd_grids_and_other_heads_work():
    model = _tiny_dpt(head="token")
    assert hasattr(model.pretrained, "act_postprocess4")  # no GETAM head to share: the decoder owns block 11's
    with torch.no_grad():
        y = model(torch.randn(1, 3, 112, 144))  # a 7 x 9 grid: the /32 level is 4 x 5
    assert y.shape == (1, 4, 112, 144) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="4 distinct"):
        DPTSegmentationModel(create_model("vit_tiny_patch16_224", num_classes=3), 4, levels=[8, 11])


def test_a_dpt_checkpoint_round_trips_through_its_spec(tmp_path):
    model = _tiny_dpt()
    spec = describe(model, "vit_tiny_patch16_224", classes=["background", "a", "b", "c"])
    assert spec.segmenter["decoder"] == "dpt"
    save(tmp_path / "model.safetensors", model, spec)
    loaded, _ = load(tmp_path / "model.safetensors")
    assert isinstance(loaded, DPTSegmentationModel)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert isinstance(build(spec), DPTSegmentationModel)


def test_getam_trains_end_to_end_with_the_dpt_decoder():
    from wsss.data.classes import ClassSet
    from wsss.methods.getam.objective import GETAMObjective, GETAMOptions

    torch.manual_seed(0)
    classes = ClassSet(["background", "a", "b"])
    options = GETAMOptions(decoder="dpt", dim=16, cls_steps=0, start_layer=2)
    objective = GETAMObjective(options, classes=classes, mean=(0.5,) * 3, std=(0.5,) * 3, device=torch.device("cpu"))
    model = objective.build_model(create_model("vit_nano_patch16", num_classes=2, head="getam"))
    assert isinstance(model, DPTSegmentationModel)
    images = torch.randn(2, 3, 64, 64)
    batch = {"image": images, "label": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss, logs = objective(model, batch, step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert "seg_fg" in logs and losses[-1] < losses[0]
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("scratch.layer"))


def test_import_checkpoint_turns_a_released_getam_model_into_a_wsss_run(tmp_path, capsys):
    from wsss.cli.main import main

    state = _authors_state("vit_base_r50_s16_384", hybrid=True)
    path = tmp_path / "getam_released.pth"
    torch.save(state, path)
    assert main(["import-checkpoint", str(path), "--out", str(tmp_path / "run")]) == 0
    assert "21 classes" in capsys.readouterr().out
    model, spec = load(tmp_path / "run")
    assert isinstance(model, DPTSegmentationModel) and spec.classes[15] == "person" and spec.method == "getam"
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert torch.equal(model.state_dict()["scratch.output_conv.4.weight"], state["scratch.output_conv.4.weight"])
    assert torch.equal(model.state_dict()["encoder.blocks.3.attn.qkv.weight"],
                       state["pretrained.model.blocks.3.attn.qkv.weight"])
    # Not a GETAM checkpoint: refused with the file named.
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert main(["import-checkpoint", str(tmp_path / "other.pth"), "--out", str(tmp_path / "run2")]) == 2
    assert "other.pth: not a GETAM DPT checkpoint" in capsys.readouterr().err
