"""Reading checkpoints safely: safetensors, ``weights_only`` torch files and JAX ``.npz`` ViT weights.

Official DINOv2 and Hugging Face CLIP files are converted to timm's names on load (:mod:`.convert`).

Nothing here unpickles arbitrary objects. A torch checkpoint is read with ``weights_only=True``; the usual wrappers
(``{'model': ...}``, ``{'state_dict': ...}``) and DDP ``module.`` prefixes are removed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError
from . import convert

HUB_PREFIX = "hf-hub:"
META_KEY = "wsss_model"  # the safetensors metadata entry that holds a wsss checkpoint's spec


def resolve_weights(spec: str | Path) -> Path:
    """A local file, or ``hf-hub:ORG/REPO[/FILE]`` downloaded through ``huggingface_hub`` (needs a network)."""
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as exc:
            raise CheckpointError(f"{spec}: hub weights need huggingface_hub: pip install 'wsss[hub]'") from exc
        parts = spec[len(HUB_PREFIX):].split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "model.safetensors"
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # network, auth or missing-file errors all end here
            raise CheckpointError(f"{spec}: download failed ({exc})") from exc
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


def load_state_dict(spec: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``/``.pt``/``.bin`` or JAX ``.npz``; a wsss checkpoint (its
    metadata holds the spec under :data:`META_KEY`) keeps its keys as they are, every other file is unwrapped and
    converted (the module docstring)."""
    path = resolve_weights(spec)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                own = META_KEY in (f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
            if own:  # a wsss checkpoint holds the model's own names (DeepLabV2's backbone.*): nothing to rename
                return state
            state = unwrap_state_dict(state)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                state = convert_jax_vit({k: z[k] for k in z.files})
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            state = unwrap_state_dict(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not state:
        raise CheckpointError(f"{path}: checkpoint holds no tensors")
    # Official DINOv2 and Hugging Face CLIP layouts are recognised by their keys and renamed to timm's.
    try:
        return convert.apply(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def unwrap_state_dict(raw: object) -> dict[str, Tensor]:
    """Strip ``{'model'|'state_dict'|'module': ...}`` wrappers and ``module.`` prefixes."""
    for key in ("model", "state_dict", "module", "teacher"):
        if isinstance(raw, dict) and key in raw and isinstance(raw[key], dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict):
        raise CheckpointError(f"expected a state dict, found {type(raw).__name__}")
    state = {}
    for k, v in raw.items():
        if not isinstance(v, Tensor):
            continue
        k = re.sub(r"^(module\.)+", "", k)
        k = re.sub(r"^backbone\.", "", k)
        state[k] = v
    return state


def convert_jax_vit(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Map the original JAX/Flax ViT ``.npz`` layout (big_vision / AugReg) onto timm's parameter names."""

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).float()

    def get(name: str) -> np.ndarray:
        if name not in arrays:
            raise CheckpointError(f"JAX checkpoint lacks {name!r}")
        return arrays[name]

    state = {
        "patch_embed.proj.weight": t(get("embedding/kernel").transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": t(get("embedding/bias")),
        "cls_token": t(get("cls")),
        "pos_embed": t(get("Transformer/posembed_input/pos_embedding")),
        "norm.weight": t(get("Transformer/encoder_norm/scale")),
        "norm.bias": t(get("Transformer/encoder_norm/bias")),
    }
    if "head/kernel" in arrays:
        state["head.weight"] = t(arrays["head/kernel"].T)
        state["head.bias"] = t(arrays["head/bias"])
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in arrays:
        p, q = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = p + "MultiHeadDotProductAttention_1/"
        qkv_w = [get(att + f"{n}/kernel") for n in ("query", "key", "value")]  # (D, heads, hd) each
        qkv_b = [get(att + f"{n}/bias") for n in ("query", "key", "value")]  # (heads, hd) each
        state.update({
            q + "norm1.weight": t(get(p + "LayerNorm_0/scale")),
            q + "norm1.bias": t(get(p + "LayerNorm_0/bias")),
            q + "attn.qkv.weight": t(np.concatenate([w.reshape(w.shape[0], -1).T for w in qkv_w])),
            q + "attn.qkv.bias": t(np.concatenate([b_.reshape(-1) for b_ in qkv_b])),
            q + "attn.proj.weight": t(get(att + "out/kernel").reshape(-1, qkv_w[0].shape[0]).T),
            q + "attn.proj.bias": t(get(att + "out/bias")),
            q + "norm2.weight": t(get(p + "LayerNorm_2/scale")),
            q + "norm2.bias": t(get(p + "LayerNorm_2/bias")),
            q + "mlp.fc1.weight": t(get(p + "MlpBlock_3/Dense_0/kernel").T),
            q + "mlp.fc1.bias": t(get(p + "MlpBlock_3/Dense_0/bias")),
            q + "mlp.fc2.weight": t(get(p + "MlpBlock_3/Dense_1/kernel").T),
            q + "mlp.fc2.bias": t(get(p + "MlpBlock_3/Dense_1/bias")),
        })
        i += 1
    if i == 0:
        raise CheckpointError("JAX checkpoint holds no Transformer/encoderblock_* entries")
    return state


def describe_mismatch(model_state: dict[str, Tensor], ckpt: dict[str, Tensor]) -> list[str]:
    """Lines naming missing, unexpected and wrongly shaped keys; empty when the checkpoint fits."""
    lines = []
    missing = sorted(set(model_state) - set(ckpt))
    unexpected = sorted(set(ckpt) - set(model_state))
    shaped = sorted(k for k in set(model_state) & set(ckpt) if model_state[k].shape != ckpt[k].shape)
    if missing:
        lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        lines.append(
            f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}"
        )
    for k in shaped:
        lines.append(f"shape mismatch for {k}: checkpoint {tuple(ckpt[k].shape)} vs model {tuple(model_state[k].shape)}")
    return lines
