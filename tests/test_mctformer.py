"""MCTformer-V2: the fused map equals a transcription of the authors' ``generate_attention_maps_ms`` (xulianuwa/
MCTformer ``engine.py`` with ``MCTformerV2.forward(return_att=True, attention_type='fused')``), and the method is
registered with its own training recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.errors import ConfigError
from wsss.localize import localize
from wsss.methods import REGISTRY
from wsss.models import Capture, create_model
from wsss.train.config import load_config

K = 4


def mct_model(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("vit_tiny_patch16_224", num_classes=K, head="mct", embed_dim=48, depth=4, num_heads=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def authors_forward(model, images):
    """``x_cls_logits, cams, patch_attn`` as MCTformerV2.forward(return_att=True) builds them (n_layers = all)."""
    out = model(images, capture=Capture(attn=True, hidden=True))
    x = out.hidden[-1]  # forward_features returns the last block's output, no norm
    x_cls, x_patch = x[:, :K], x[:, K:]
    n, p, c = x_patch.shape
    w0, h0 = images.shape[2] // 16, images.shape[3] // 16
    x_patch = x_patch.reshape(n, w0, h0, c).permute(0, 3, 1, 2).contiguous()
    x_patch = F.conv2d(x_patch, model.head.weight, model.head.bias, padding=1)
    attn_weights = torch.stack(out.attn).mean(dim=2)  # 12 x B x N x N
    feature_map = F.relu(x_patch.detach().clone())
    n, c, h, w = feature_map.shape
    mtatt = attn_weights.sum(0)[:, :K, K:].reshape(n, c, h, w)
    cams = mtatt * feature_map
    patch_attn = attn_weights[:, :, K:, K:]
    return x_cls.mean(-1), cams, patch_attn


def authors_maps(model, image, target):
    """generate_attention_maps_ms for one image: scale 1 and its flip, patch_attn_refine on, min-max per class."""
    cam_list = []
    for s, view in enumerate([image, image.flip(-1)]):
        _, cls_attentions, patch_attn = authors_forward(model, view)
        patch_attn = torch.sum(patch_attn, dim=0)
        wf, hf = view.shape[2] // 16, view.shape[3] // 16
        cls_attentions = torch.matmul(patch_attn.unsqueeze(1), cls_attentions.view(1, K, -1, 1)).reshape(1, K, wf, hf)
        cls_attentions = F.interpolate(cls_attentions, size=image.shape[2:], mode="bilinear", align_corners=False)[0]
        cls_attentions = cls_attentions.numpy() * target.view(K, 1, 1).numpy()
        if s % 2 == 1:
            cls_attentions = np.flip(cls_attentions, axis=-1)
        cam_list.append(cls_attentions)
    sum_cam = np.sum(cam_list, axis=0)
    maps = {}
    for k in range(K):
        if target[k] > 0:
            a = sum_cam[k]
            maps[k] = (a - a.min()) / (a.max() - a.min() + 1e-8)
    return sum_cam, maps


def test_fused_map_equals_the_authors_generate_attention_maps():
    model = mct_model()
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        raw, ref = authors_maps(model, image, target)
    present = [k for k in range(K) if target[k] > 0]
    ours_raw = localize(model, image, [present], method="mctformer", scales=(1.0,), flip=True, normalize=False)
    ours = localize(model, image, [present], method="mctformer", scales=(1.0,), flip=True)
    depth = model.depth
    for i, k in enumerate(present):
        # The authors sum the class attention and the affinity over the blocks where wsss averages: depth^2.
        torch.testing.assert_close(ours_raw[0, i] * depth**2, torch.from_numpy(raw[k].copy()), atol=1e-5, rtol=1e-5)
        # Normalised, only the min-max eps differs (theirs 1e-8 on the sums, ours 1e-6 on the means).
        torch.testing.assert_close(ours[0, i], torch.from_numpy(ref[k].copy()).float(), atol=2e-4, rtol=0)
    # The fused map is the class attention times the CAM, refined: not the CAM alone.
    cam = localize(model, image, [present], method="cam", scales=(1.0,), flip=True)
    assert (cam - ours).abs().max() > 0.05


def test_the_mctformer_map_needs_the_mct_head():
    model = create_model("vit_nano_patch16", num_classes=3)
    with pytest.raises(ConfigError, match="model.head=mct"):
        localize(model, torch.randn(1, 3, 32, 32), [[0]], method="mctformer")


def test_mctformer_is_a_method_with_presets_and_trains_on_both_logits():
    method = REGISTRY.get("mctformer")
    assert method.own_map == "mctformer"
    assert {"mctformer_msrc", "mctformer_voc"} <= set(method.preset_names())
    cfg = load_config("mctformer_voc", [])
    assert cfg["model"]["head"] == "mct" and cfg["model"]["name"] == "deit_small_patch16_224"
    # The AReAM VOC recipe is the same run plus the re-activation loss.
    aream = load_config("aream_voc", [])
    for section in ("model", "data", "optim", "train"):
        assert {k: v for k, v in cfg[section].items() if k != "run_dir"} == \
               {k: v for k, v in aream[section].items() if k != "run_dir"}, section
    objective = method.objective(method.parse_options({"name": "mctformer"}))
    model = mct_model().train()
    batch = {"image": torch.randn(2, 3, 32, 48), "label": torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])}
    loss, logs = objective(model, batch, 0)
    assert set(logs) == {"cls", "cls_patch"}
    assert loss.item() == pytest.approx(logs["cls"] + logs["cls_patch"], rel=1e-5)


def _official_mctformer_v2_keys(num_classes: int, depth: int, dim: int, grid: int) -> dict[str, tuple[int, ...]]:
    """The state dict of the authors' ``deit_small_MCTformerV2_patch16_224`` (timm 0.3.2's VisionTransformer with the
    class tokens, position embedding and 3x3 conv head replaced), written out from their model definition."""
    keys = {"cls_token": (1, num_classes, dim), "pos_embed": (1, grid * grid + num_classes, dim),
            "patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,),
            "head.weight": (num_classes, dim, 3, 3), "head.bias": (num_classes,)}
    for i in range(depth):
        for name, shape in (("norm1", (dim,)), ("norm2", (dim,))):
            keys[f"blocks.{i}.{name}.weight"] = keys[f"blocks.{i}.{name}.bias"] = shape
        for name, (out, inp) in (("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                                 ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))):
            keys[f"blocks.{i}.{name}.weight"], keys[f"blocks.{i}.{name}.bias"] = (out, inp), (out,)
    return keys


def test_an_official_mctformer_v2_checkpoint_loads_strictly(tmp_path):
    model = create_model("vit_small_patch16_224", num_classes=20, head="mct")
    official = _official_mctformer_v2_keys(20, 12, 384, 14)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official
    # The authors save {"model": state_dict, "optimizer": ..., "epoch": ...} with torch.save.
    torch.manual_seed(3)
    state = {k: torch.randn(shape) * 0.02 for k, shape in official.items()}
    torch.save({"model": state, "epoch": 59}, tmp_path / "checkpoint_best.pth")
    loaded = create_model("vit_small_patch16_224", num_classes=20, head="mct",
                          weights=tmp_path / "checkpoint_best.pth")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
