"""Key converters: official DINOv2 and Hugging Face CLIP layouts onto timm's ViT names.

The source key lists and shapes are written out here from the reference code (facebookresearch/dinov2
``dinov2/models/vision_transformer.py`` and ``dinov2/layers``; transformers ``models/clip/modeling_clip.py``), the
target lists from timm's ``VisionTransformer`` (``vit_small_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``,
``vit_base_patch16_clip_224``).
"""

from __future__ import annotations

import pytest
import torch

from wsss.errors import CheckpointError
from wsss.models import convert

D_S, DEPTH = 384, 12


def _rand(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _dinov2_block_shapes(i: int, d: int) -> dict[str, tuple[int, ...]]:
    p = f"blocks.{i}."
    return {
        p + "norm1.weight": (d,), p + "norm1.bias": (d,),
        p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
        p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
        p + "ls1.gamma": (d,),
        p + "norm2.weight": (d,), p + "norm2.bias": (d,),
        p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
        p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,),
        p + "ls2.gamma": (d,),
    }


def official_dinov2_vits14(registers: int) -> dict[str, tuple[int, ...]]:
    """``dinov2_vits14[_reg4]_pretrain.pth``: 518 px / 14 = 37 x 37 = 1369 patches + the class position."""
    shapes = {
        "cls_token": (1, 1, D_S),
        "pos_embed": (1, 1370, D_S),
        "mask_token": (1, D_S),
        "patch_embed.proj.weight": (D_S, 3, 14, 14),
        "patch_embed.proj.bias": (D_S,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, D_S)
    for i in range(DEPTH):
        shapes.update(_dinov2_block_shapes(i, D_S))
    shapes.update({"norm.weight": (D_S,), "norm.bias": (D_S,)})
    return shapes


def timm_dinov2_vits14(registers: int) -> dict[str, tuple[int, ...]]:
    """timm's ``vit_small_patch14_dinov2`` / ``vit_small_patch14_reg4_dinov2`` (``num_classes=0``)."""
    shapes = {
        "cls_token": (1, 1, D_S),
        "pos_embed": (1, 1369 if registers else 1370, D_S),
        "patch_embed.proj.weight": (D_S, 3, 14, 14),
        "patch_embed.proj.bias": (D_S,),
    }
    if registers:
        shapes["reg_token"] = (1, registers, D_S)
    for i in range(DEPTH):
        shapes.update(_dinov2_block_shapes(i, D_S))
    shapes.update({"norm.weight": (D_S,), "norm.bias": (D_S,)})
    return shapes


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_official_names_and_shapes(registers):
    src = _rand(official_dinov2_vits14(registers))
    assert convert.detect(src) == "dinov2_official"
    out = convert.dinov2_official(src)
    assert _shapes(out) == timm_dinov2_vits14(registers)
    assert "mask_token" not in out and "register_tokens" not in out
    assert all(f"blocks.{i}.ls1.gamma" in out and f"blocks.{i}.ls2.gamma" in out for i in range(DEPTH))
    assert convert.detect(out) is None  # timm's names: nothing left to convert


def test_dinov2_with_registers_moves_the_class_position_into_the_class_token():
    src = _rand(official_dinov2_vits14(4), seed=1)
    out = convert.dinov2_official(src)
    torch.testing.assert_close(out["cls_token"], src["cls_token"] + src["pos_embed"][:, :1])
    torch.testing.assert_close(out["pos_embed"], src["pos_embed"][:, 1:])
    torch.testing.assert_close(out["reg_token"], src["register_tokens"])
    torch.testing.assert_close(out["blocks.3.attn.qkv.weight"], src["blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(out["blocks.5.ls1.gamma"], src["blocks.5.ls1.gamma"])


def test_dinov2_without_registers_keeps_tokens_and_positions():
    src = _rand(official_dinov2_vits14(0), seed=2)
    out = convert.dinov2_official(src)
    torch.testing.assert_close(out["cls_token"], src["cls_token"])
    torch.testing.assert_close(out["pos_embed"], src["pos_embed"])


def test_dinov2_swiglu_and_chunked_blocks():
    d = 8
    src = {
        "cls_token": torch.randn(1, 1, d), "pos_embed": torch.randn(1, 5, d), "mask_token": torch.randn(1, d),
        "blocks.0.mlp.w12.weight": torch.randn(4 * d, d), "blocks.0.mlp.w12.bias": torch.randn(4 * d),
        "blocks.0.mlp.w3.weight": torch.randn(d, 2 * d), "blocks.0.mlp.w3.bias": torch.randn(d),
        "blocks.1.3.norm1.weight": torch.randn(d),  # block_chunks > 0: chunk 1, block 3
    }
    out = convert.dinov2_official(src)
    assert set(out) == {"cls_token", "pos_embed", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
                        "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias", "blocks.3.norm1.weight"}
    assert out["blocks.0.mlp.fc1.weight"] is src["blocks.0.mlp.w12.weight"]


# --- Hugging Face CLIP ViT-B/16 ---------------------------------------------------------------------------------

D_B, HIDDEN, PROJ, N_POS = 768, 3072, 512, 197


def hf_clip_vit_b16_vision() -> dict[str, tuple[int, ...]]:
    """The vision half of ``CLIPModel`` for ``openai/clip-vit-base-patch16``."""
    v = "vision_model."
    shapes = {
        v + "embeddings.class_embedding": (D_B,),
        v + "embeddings.patch_embedding.weight": (D_B, 3, 16, 16),
        v + "embeddings.position_embedding.weight": (N_POS, D_B),
        v + "pre_layrnorm.weight": (D_B,), v + "pre_layrnorm.bias": (D_B,),
        v + "post_layernorm.weight": (D_B,), v + "post_layernorm.bias": (D_B,),
        "visual_projection.weight": (PROJ, D_B),
    }
    for i in range(DEPTH):
        p = f"{v}encoder.layers.{i}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (D_B, D_B)
            shapes[p + f"self_attn.{name}.bias"] = (D_B,)
        shapes.update({
            p + "layer_norm1.weight": (D_B,), p + "layer_norm1.bias": (D_B,),
            p + "mlp.fc1.weight": (HIDDEN, D_B), p + "mlp.fc1.bias": (HIDDEN,),
            p + "mlp.fc2.weight": (D_B, HIDDEN), p + "mlp.fc2.bias": (D_B,),
            p + "layer_norm2.weight": (D_B,), p + "layer_norm2.bias": (D_B,),
        })
    return shapes


def hf_clip_ignored() -> dict[str, torch.Tensor]:
    """Keys the converter drops: the text tower (a few, small), the text projection, the scale, the buffers."""
    return {
        "text_model.embeddings.token_embedding.weight": torch.empty(8, 512),
        "text_model.embeddings.position_embedding.weight": torch.empty(77, 512),
        "text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.empty(512, 512),
        "text_model.final_layer_norm.weight": torch.empty(512),
        "text_projection.weight": torch.empty(PROJ, 512),
        "logit_scale": torch.tensor(2.6592),
        "vision_model.embeddings.position_ids": torch.arange(N_POS).unsqueeze(0),
    }


def timm_vit_base_patch16_clip_224() -> dict[str, tuple[int, ...]]:
    """timm's ``vit_base_patch16_clip_224`` with ``num_classes=512`` (pre-norm, no patch bias)."""
    shapes = {
        "cls_token": (1, 1, D_B),
        "pos_embed": (1, N_POS, D_B),
        "patch_embed.proj.weight": (D_B, 3, 16, 16),
        "norm_pre.weight": (D_B,), "norm_pre.bias": (D_B,),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (D_B,), p + "norm1.bias": (D_B,),
            p + "attn.qkv.weight": (3 * D_B, D_B), p + "attn.qkv.bias": (3 * D_B,),
            p + "attn.proj.weight": (D_B, D_B), p + "attn.proj.bias": (D_B,),
            p + "norm2.weight": (D_B,), p + "norm2.bias": (D_B,),
            p + "mlp.fc1.weight": (HIDDEN, D_B), p + "mlp.fc1.bias": (HIDDEN,),
            p + "mlp.fc2.weight": (D_B, HIDDEN), p + "mlp.fc2.bias": (D_B,),
        })
    shapes.update({"norm.weight": (D_B,), "norm.bias": (D_B,), "head.weight": (PROJ, D_B), "head.bias": (PROJ,)})
    return shapes


@pytest.fixture(scope="module")
def hf_clip():
    src = _rand(hf_clip_vit_b16_vision(), seed=3)
    src.update(hf_clip_ignored())
    return src, convert.hf_clip_vision(src)


def test_hf_clip_names_and_shapes(hf_clip):
    src, out = hf_clip
    assert convert.detect(src) == "hf_clip_vision"
    assert _shapes(out) == timm_vit_base_patch16_clip_224()
    assert convert.detect(out) is None


def test_hf_clip_values(hf_clip):
    src, out = hf_clip
    v = "vision_model."
    torch.testing.assert_close(out["cls_token"][0, 0], src[v + "embeddings.class_embedding"])
    torch.testing.assert_close(out["pos_embed"][0], src[v + "embeddings.position_embedding.weight"])
    torch.testing.assert_close(out["norm_pre.weight"], src[v + "pre_layrnorm.weight"])
    torch.testing.assert_close(out["norm.bias"], src[v + "post_layernorm.bias"])
    torch.testing.assert_close(out["head.weight"], src["visual_projection.weight"])
    assert torch.count_nonzero(out["head.bias"]) == 0
    for i in (0, 11):
        p, q = f"{v}encoder.layers.{i}.self_attn.", f"blocks.{i}.attn."
        w, b = out[q + "qkv.weight"], out[q + "qkv.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):  # rows: q, then k, then v
            torch.testing.assert_close(w[j * D_B:(j + 1) * D_B], src[p + name + ".weight"])
            torch.testing.assert_close(b[j * D_B:(j + 1) * D_B], src[p + name + ".bias"])
        torch.testing.assert_close(out[q + "proj.weight"], src[p + "out_proj.weight"])
        torch.testing.assert_close(out[f"blocks.{i}.norm2.weight"], src[f"{v}encoder.layers.{i}.layer_norm2.weight"])
        torch.testing.assert_close(out[f"blocks.{i}.mlp.fc1.weight"], src[f"{v}encoder.layers.{i}.mlp.fc1.weight"])


def test_hf_clip_vision_model_without_projection_has_no_head():
    src = {k: torch.zeros(s) for k, s in hf_clip_vit_b16_vision().items()
           if k != "visual_projection.weight" and ".layers." not in k}
    out = convert.hf_clip_vision(src)
    assert "head.weight" not in out and "head.bias" not in out


def test_hf_clip_missing_projection_piece_is_named():
    src = {"vision_model.embeddings.class_embedding": torch.zeros(4),
           "vision_model.encoder.layers.2.self_attn.q_proj.weight": torch.zeros(4, 4),
           "vision_model.encoder.layers.2.self_attn.k_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match=r"layer 2 lacks the v_proj weight"):
        convert.hf_clip_vision(src)


def test_detect_and_apply():
    timm_state = {"cls_token": torch.zeros(1, 1, 4), "pos_embed": torch.zeros(1, 5, 4)}
    assert convert.detect(timm_state) is None
    assert convert.apply(timm_state) is timm_state
    dino = dict(timm_state, mask_token=torch.zeros(1, 4))
    assert convert.detect(dino) == "dinov2_official"
    assert set(convert.apply(dino)) == {"cls_token", "pos_embed"}
    assert set(convert.CONVERTERS) == {"dinov2_official", "hf_clip_vision"}
    with pytest.raises(CheckpointError, match="unknown checkpoint converter"):
        convert.apply(timm_state, "nope")
