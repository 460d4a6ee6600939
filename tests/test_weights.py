"""Checkpoint loading through ``create_model``: formats, wrappers, JAX names, heads, fit errors and safety."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wsss.errors import CheckpointError
from wsss.models import create_model, load_into
from wsss.models.weights import load_state_dict, unwrap_state_dict

NAME = "vit_nano_patch16"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from the initialiser's, so a tensor that was not loaded cannot pass as loaded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def images(b: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(3))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def source():
    """A randomised nano model with a 6-class linear head and its state dict."""
    model = randomize(create_model(NAME, num_classes=6))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_create_model_without_weights():
    model = create_model(NAME)
    assert model.num_classes == 1000 and model.base_grid == (4, 4) and model.embed_dim == 64
    with pytest.raises(ValueError, match="unknown model 'vit_bogus'"):
        create_model("vit_bogus")


# --------------------------------------------------------------------------------------------- file formats


def test_safetensors_and_torch_files_give_identical_weights(source, tmp_path):
    model, sd = source
    files = {"plain.safetensors": None, "plain.pth": sd, "model.pth": {"model": sd, "epoch": 3},
             "state.pt": {"state_dict": sd, "optimizer": {"lr": 0.1}},
             "ddp.pth": {"model": {f"module.{k}": v for k, v in sd.items()}},
             "ddp.safetensors": {f"module.{k}": v.contiguous() for k, v in sd.items()}}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "plain.safetensors")
    save_file(files["ddp.safetensors"], tmp_path / "ddp.safetensors")
    for name, obj in files.items():
        if name.endswith((".pth", ".pt")):
            torch.save(obj, tmp_path / name)
    x = images()
    for name in files:
        loaded = create_model(NAME, weights=tmp_path / name)
        assert_same_weights(loaded, sd)
        torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=0, rtol=0)


def test_unwrap_strips_prefixes_and_drops_non_tensors():
    t = torch.ones(2)
    raw = {"state_dict": {"module.module.a": t, "backbone.b": t, "c": t, "step": 7}}
    assert sorted(unwrap_state_dict(raw)) == ["a", "b", "c"]
    with pytest.raises(CheckpointError, match="expected a state dict, found list"):
        unwrap_state_dict([t])



def _payload(marker: str) -> str:
    """What a malicious pickle would run; here it only leaves a file behind."""
    Path(marker).write_text("executed")
    return marker


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _payload, (self.marker,)


def test_torch_file_holding_a_pickled_object_is_refused(source, tmp_path):
    _, sd = source
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        create_model(NAME, weights=path)
    assert not marker.exists()
    # the payload is real: an unrestricted unpickler runs it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "executed"


# ------------------------------------------------------------------------------------------------- JAX .npz


def to_jax(sd: dict[str, torch.Tensor], heads: int) -> dict[str, np.ndarray]:
    """timm names -> the original JAX ViT layout (kernels stored input-first, attention split per head)."""
    a = {k: v.detach().numpy() for k, v in sd.items()}
    d = a["cls_token"].shape[-1]
    hd = d // heads
    out = {
        "embedding/kernel": a["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": a["patch_embed.proj.bias"],
        "cls": a["cls_token"],
        "Transformer/posembed_input/pos_embedding": a["pos_embed"],
        "Transformer/encoder_norm/scale": a["norm.weight"],
        "Transformer/encoder_norm/bias": a["norm.bias"],
        "head/kernel": a["head.weight"].T,
        "head/bias": a["head.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in a:
        b, j = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        att = j + "MultiHeadDotProductAttention_1/"
        w_qkv, b_qkv = a[b + "attn.qkv.weight"], a[b + "attn.qkv.bias"]
        for n, name in enumerate(("query", "key", "value")):
            w = w_qkv[n * d:(n + 1) * d]  # (out, in) rows of this projection
            out[att + f"{name}/kernel"] = np.stack([w[h * hd:(h + 1) * hd].T for h in range(heads)], axis=1)
            out[att + f"{name}/bias"] = b_qkv[n * d:(n + 1) * d].reshape(heads, hd)
        proj = a[b + "attn.proj.weight"]  # (out D, in D) with the input laid out head by head
        out[att + "out/kernel"] = np.stack([proj[:, h * hd:(h + 1) * hd].T for h in range(heads)], axis=0)
        out[att + "out/bias"] = a[b + "attn.proj.bias"]
        out[j + "LayerNorm_0/scale"], out[j + "LayerNorm_0/bias"] = a[b + "norm1.weight"], a[b + "norm1.bias"]
        out[j + "LayerNorm_2/scale"], out[j + "LayerNorm_2/bias"] = a[b + "norm2.weight"], a[b + "norm2.bias"]
        for n, fc in enumerate(("fc1", "fc2")):
            out[j + f"MlpBlock_3/Dense_{n}/kernel"] = a[b + f"mlp.{fc}.weight"].T
            out[j + f"MlpBlock_3/Dense_{n}/bias"] = a[b + f"mlp.{fc}.bias"]
        i += 1
    return out


def test_jax_npz_round_trip(source, tmp_path):
    model, sd = source
    arrays = to_jax(sd, heads=model.num_heads)
    assert arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (64, 2, 32)
    assert arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (2, 32, 64)
    np.savez(tmp_path / "vit.npz", **arrays)
    loaded = create_model(NAME, weights=tmp_path / "vit.npz")
    assert_same_weights(loaded, sd)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)


def test_jax_npz_without_blocks_names_the_file(source, tmp_path):
    _, sd = source
    arrays = {k: v for k, v in to_jax(sd, heads=2).items() if "encoderblock" not in k}
    np.savez(tmp_path / "empty.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"empty\.npz.*encoderblock"):
        load_state_dict(tmp_path / "empty.npz")


# ----------------------------------------------------------------------------------------------- the heads


@pytest.fixture(scope="module")
def saved(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "nano.safetensors"
    save_file({k: v.contiguous() for k, v in source[1].items()}, path)
    return path


def test_num_classes_none_keeps_the_checkpoint_head(source, saved):
    model, sd = source
    loaded = create_model(NAME, weights=saved, num_classes=None)
    assert loaded.num_classes == 6
    assert_same_weights(loaded, sd)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=0, rtol=0)


def test_other_class_count_builds_a_new_head(source, saved, caplog):
    _, sd = source
    with caplog.at_level(logging.WARNING, logger="wsss.models.factory"):
        loaded = create_model(NAME, weights=saved, num_classes=3)
    assert "not loading the checkpoint's classifier" in caplog.text
    state = loaded.state_dict()
    assert state["head.weight"].shape == (3, 64)
    for k, v in sd.items():
        if not k.startswith("head."):
            assert torch.equal(state[k], v), k


def test_linear_checkpoint_head_is_not_forced_into_a_conv_head(source, saved):
    _, sd = source
    loaded = create_model(NAME, weights=saved, num_classes=6, head="conv")
    state = loaded.state_dict()
    assert state["head.weight"].shape == (6, 64, 1, 1)
    assert not torch.equal(state["head.weight"].flatten(1), sd["head.weight"])
    for k, v in sd.items():
        if not k.startswith("head."):
            assert torch.equal(state[k], v), k


@pytest.mark.parametrize("head", ["conv", "mct"])
def test_trained_conv_and_mct_heads_reload(head, tmp_path):
    model = randomize(create_model(NAME, num_classes=4, head=head), seed=5)
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    loaded = create_model(NAME, weights=tmp_path / "m.safetensors", num_classes=4, head=head)
    assert_same_weights(loaded, sd)
    assert loaded.base_grid == (4, 4)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=0, rtol=0)


def test_mct_head_replicates_the_single_class_token(source, saved):
    _, sd = source
    loaded = create_model(NAME, weights=saved, num_classes=3, head="mct")
    assert loaded.num_prefix == 3
    cls, pos = loaded.state_dict()["cls_token"], loaded.state_dict()["pos_embed"]
    assert cls.shape == (1, 3, 64) and pos.shape == (1, 3 + 16, 64)
    for i in range(3):
        assert torch.equal(cls[0, i], sd["cls_token"][0, 0])
        assert torch.equal(pos[0, i], sd["pos_embed"][0, 0])
    assert torch.equal(pos[0, 3:], sd["pos_embed"][0, 1:])
    assert torch.equal(loaded.state_dict()["blocks.2.mlp.fc1.weight"], sd["blocks.2.mlp.fc1.weight"])


def test_distilled_checkpoint_round_trip(tmp_path):
    model = randomize(create_model("vit_nano_patch16", num_classes=5, distilled=True), seed=2)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "deit.pth")
    loaded = create_model(NAME, weights=tmp_path / "deit.pth", distilled=True)
    assert loaded.num_prefix == 2 and loaded.base_grid == (4, 4)
    assert_same_weights(loaded, sd)


def test_checkpoint_at_384_builds_a_24x24_grid(tmp_path):
    model = randomize(create_model(NAME, num_classes=2, img_size=384), seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "big.safetensors")
    loaded = create_model(NAME, weights=tmp_path / "big.safetensors")
    assert loaded.base_grid == (24, 24)
    assert_same_weights(loaded, model.state_dict())
    x = images(1, 384, 384)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=0, rtol=0)


# -------------------------------------------------------------------------------------------------- errors


def test_wrong_architecture_lists_the_mismatched_keys(saved):
    with pytest.raises(CheckpointError) as err:
        create_model("vit_pico_patch8", weights=saved)
    msg = str(err.value)
    assert str(saved) in msg
    assert "shape mismatch for patch_embed.proj.weight: checkpoint (64, 3, 16, 16) vs model (96, 3, 8, 8)" in msg
    assert "shape mismatch for blocks.0.attn.qkv.weight: checkpoint (192, 64) vs model (288, 96)" in msg
    assert "missing keys (24): blocks.4.attn.proj.bias" in msg  # pico has 6 blocks, nano 4


def test_vit_tiny_checkpoint_into_vit_small(vit_tiny_weights):
    with pytest.raises(CheckpointError) as err:
        create_model("vit_small_patch16_224", weights=vit_tiny_weights)
    msg = str(err.value)
    assert msg.startswith(f"{vit_tiny_weights} does not fit the model:")
    assert "shape mismatch for blocks.11.mlp.fc1.weight: checkpoint (768, 192) vs model (1536, 384)" in msg
    assert "shape mismatch for head.weight: checkpoint (1000, 192) vs model (1000, 384)" in msg


def test_wrong_width_lists_the_head_too(saved):
    with pytest.raises(CheckpointError, match=r"shape mismatch for head\.weight: checkpoint \(6, 64\) vs model "
                                              r"\(6, 32\)"):
        create_model(NAME, weights=saved, embed_dim=32)


def test_load_into_reports_unexpected_keys(source):
    _, sd = source
    model = create_model(NAME, num_classes=6)
    with pytest.raises(CheckpointError, match=r"mine\.pth does not fit the model:\n  unexpected keys \(1\): extra"):
        load_into(model, {**sd, "extra": torch.zeros(1)}, source="mine.pth")
    load_into(model, sd)
    assert_same_weights(model, sd)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "vit.safetensors"
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint file not found"):
        create_model(NAME, weights=path)


@pytest.mark.parametrize("name", ["bad.safetensors", "bad.pth", "bad.npz", "bad.bin"])
def test_corrupt_file_names_the_path(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage\xff" * 40)
    with pytest.raises(CheckpointError, match=f"{path}: cannot read checkpoint"):
        create_model(NAME, weights=path)


def test_non_square_position_table_is_a_checkpoint_error(source, tmp_path):
    _, sd = source
    save_file({**{k: v.contiguous() for k, v in sd.items()}, "pos_embed": torch.zeros(1, 1 + 15, 64)},
              tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="odd.safetensors"):
        create_model(NAME, weights=tmp_path / "odd.safetensors")


# ------------------------------------------------------------------------------------------------------ hub


def test_hub_without_huggingface_hub_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(CheckpointError, match=r"hf-hub:org/vit.*pip install"):
        create_model(NAME, weights="hf-hub:org/vit")


def test_hub_names_are_split_into_repo_and_file(monkeypatch, saved):
    calls = []

    def fake_download(repo, filename):
        calls.append((repo, filename))
        if filename == "missing.pth":
            raise OSError("404")
        return str(saved)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    model = create_model(NAME, weights="hf-hub:org/vit")
    assert model.num_classes == 6
    create_model(NAME, weights="hf-hub:org/vit/sub/dir/w.safetensors")
    with pytest.raises(CheckpointError, match=r"hf-hub:org/vit/missing.pth: download failed \(404\)"):
        create_model(NAME, weights="hf-hub:org/vit/missing.pth")
    assert calls == [("org/vit", "model.safetensors"), ("org/vit", "sub/dir/w.safetensors"),
                     ("org/vit", "missing.pth")]
