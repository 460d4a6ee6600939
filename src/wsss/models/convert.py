"""Key converters from other projects' checkpoint layouts onto timm's ViT parameter names.

* :func:`dinov2_official`: facebookresearch/dinov2's torch hub files (``dinov2_vits14_pretrain.pth``, ...).
* :func:`hf_clip_vision`: Hugging Face transformers' ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` files
  (``openai/clip-vit-base-patch16``'s ``model.safetensors``, ...), onto ``vit_base_patch16_clip_224``.

:func:`detect` recognises both layouts by their keys, so a user's file converts without a flag; :func:`apply`
converts a state dict when it needs it and returns it unchanged when it is already in timm's names.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor

from ..errors import CheckpointError

State = dict[str, Tensor]

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # block_chunks > 0: blocks.CHUNK.INDEX.*
_SWIGLU = re.compile(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.(weight|bias)$")


def dinov2_official(state: State) -> State:
    """facebookresearch/dinov2 names onto timm's ``vit_*_patch14_dinov2`` / ``vit_*_patch14_reg4_dinov2``.

    ``mask_token`` (used only in training) is dropped. ``register_tokens`` becomes ``reg_token``; with registers
    timm's model embeds no position for the class and register tokens (``no_embed_class``), while DINOv2 adds
    ``pos_embed[:, 0]`` to the class token (the registers are inserted after the position embedding), so the class
    token takes that position in and ``pos_embed`` keeps only the patch positions. Without registers ``pos_embed``
    stays as it is. The layer scales ``blocks.i.ls1.gamma``/``ls2.gamma`` have timm's names already; the SwiGLU
    feed-forward of the giant model (``mlp.w12``/``mlp.w3``) becomes timm's packed ``mlp.fc1``/``mlp.fc2``.
    Checkpoints saved with ``block_chunks > 0`` (``blocks.CHUNK.INDEX.*``) are flattened to ``blocks.INDEX.*``.
    """
    for key in ("cls_token", "pos_embed"):
        if key not in state:
            raise CheckpointError(f"DINOv2 checkpoint lacks {key!r}")
    out: State = {}
    for k, v in state.items():
        if k == "mask_token":
            continue
        k = _CHUNKED_BLOCK.sub(r"blocks.\1.", k)
        m = _SWIGLU.match(k)
        if m:
            k = f"{m.group(1)}{'fc1' if m.group(2) == 'w12' else 'fc2'}.{m.group(3)}"
        out[k] = v
    if "register_tokens" in out:
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


_HF_VISION = "vision_model."
_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_NAMES = {
    "self_attn.out_proj": "attn.proj",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TOP_NAMES = {
    "vision_model.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "vision_model.pre_layrnorm.weight": "norm_pre.weight",  # (sic) transformers' spelling
    "vision_model.pre_layrnorm.bias": "norm_pre.bias",
    "vision_model.post_layernorm.weight": "norm.weight",
    "vision_model.post_layernorm.bias": "norm.bias",
}


def hf_clip_vision(state: State) -> State:
    """Hugging Face ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` names onto timm's ``vit_*_clip_*``.

    The class embedding (D,) becomes ``cls_token`` (1, 1, D), the position embedding table (N, D) ``pos_embed``
    (1, N, D); each layer's separate ``q_proj``/``k_proj``/``v_proj`` are stacked, in that order, into
    ``attn.qkv``; ``pre_layrnorm`` becomes ``norm_pre`` and ``post_layernorm`` ``norm``. ``visual_projection``
    (P, D), a linear layer without bias, becomes ``head.weight`` with a zero ``head.bias``, as timm does for
    OpenAI's own files. The text tower, ``text_projection``, ``logit_scale`` and the ``position_ids`` buffers are
    dropped. (transformers applies ``post_layernorm`` to the class token only, timm's ``norm`` to every token,
    exactly as for OpenAI's ``ln_post``.)
    """
    if f"{_HF_VISION}embeddings.class_embedding" not in state:
        raise CheckpointError("Hugging Face CLIP checkpoint lacks 'vision_model.embeddings.class_embedding'")
    out: State = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for k, v in state.items():
        if k == "visual_projection.weight":
            out["head.weight"] = v
            out["head.bias"] = torch.zeros(v.shape[0], dtype=v.dtype)
            continue
        if not k.startswith(_HF_VISION) or k.endswith("position_ids"):
            continue  # text tower, text_projection, logit_scale, buffers
        if k == "vision_model.embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "vision_model.embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif k in _HF_TOP_NAMES:
            out[_HF_TOP_NAMES[k]] = v
        elif (m := _HF_LAYER.match(k)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            module, _, param = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, param), {})[module[-6]] = v  # 'q', 'k' or 'v'
            elif module in _HF_LAYER_NAMES:
                out[f"blocks.{i}.{_HF_LAYER_NAMES[module]}.{param}"] = v
            else:
                out[k] = v  # unknown: left under its own name for the loader to report
        else:
            out[k] = v
    for (i, param), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"Hugging Face CLIP checkpoint: layer {i} lacks the "
                                  f"{'/'.join(p + '_proj' for p in missing)} {param}")
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


CONVERTERS: dict[str, Callable[[State], State]] = {
    "dinov2_official": dinov2_official,
    "hf_clip_vision": hf_clip_vision,
}


def detect(state: State) -> str | None:
    """The name of the converter ``state``'s layout needs, or None for timm's names (or an unknown layout)."""
    if "vision_model.embeddings.class_embedding" in state:
        return "hf_clip_vision"
    if "cls_token" in state and ("mask_token" in state or "register_tokens" in state):
        return "dinov2_official"
    return None


def apply(state: State, converter: str | None = None) -> State:
    """``state`` in timm's names: converted with ``converter`` (a key of :data:`CONVERTERS`), or with the
    converter :func:`detect` finds when None; unchanged when there is nothing to convert."""
    name = converter if converter is not None else detect(state)
    if name is None:
        return state
    if name not in CONVERTERS:
        raise CheckpointError(f"unknown checkpoint converter {name!r}; known: {', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[name](state)
