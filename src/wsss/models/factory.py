"""``create_model``: named presets, heads and checkpoint loading with a strict fit check."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .vit import PRESETS, VisionTransformer, grid_side
from .weights import describe_mismatch, load_state_dict

log = logging.getLogger(__name__)

HEAD_KEYS = ("head.", "head_dist.")


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(PRESETS)


def create_model(name: str, weights: str | Path | None = None, num_classes: int | None = None,
                 head: str = "token", pool: str = "avg", **overrides) -> VisionTransformer:
    """Build a ViT/DeiT preset and optionally load weights.

    Args:
        name: a preset from :func:`list_models`.
        weights: a local ``.safetensors``, ``.pth``/``.pt`` (loaded with ``weights_only=True``), JAX ``.npz``, or
            ``hf-hub:ORG/REPO[/FILE]``.
        num_classes: classifier outputs. With weights and ``None`` the checkpoint's head is kept (an ImageNet
            classifier works as it is); a different count builds a fresh head and says so in the log.
        head: ``token``, ``gap``, ``conv`` or ``mct`` (see :class:`VisionTransformer`).
        pool: pooling of the ``conv`` head, ``avg`` or ``max``.
        overrides: any other :class:`VisionTransformer` argument (``drop_path_rate``, ``img_size``, ...).

    Raises:
        CheckpointError: the checkpoint cannot be read, or does not fit (it lists the mismatched keys and shapes).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    cfg = PRESETS[name]
    kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                  num_heads=cfg.num_heads, distilled=cfg.distilled, head_type=head, pool=pool)
    kwargs.update(overrides)
    state = None
    if weights is not None:
        state = load_state_dict(weights)
        kwargs["img_size"] = _checkpoint_img_size(state, kwargs, source=str(weights))
        ckpt_classes = _checkpoint_num_classes(state)
        if num_classes is None:
            num_classes = ckpt_classes if ckpt_classes is not None else 0
        if head == "mct":
            state = _expand_class_tokens(state, num_classes)
    model = VisionTransformer(num_classes=1000 if num_classes is None else num_classes, **kwargs)
    if state is not None:
        # The checkpoint's head is kept only when it is the same kind of layer (linear, 1x1 or 3x3 conv) with the
        # same class count, so a trained conv/mct head reloads while an ImageNet classifier is never forced into one.
        if ckpt_classes != num_classes or not _same_head_kind(state, model.state_dict()):
            dropped = [k for k in state if k.startswith(HEAD_KEYS)]
            if dropped:
                log.warning("%s: not loading the checkpoint's classifier (%s); a new %s head with %d outputs is "
                            "initialised", weights, ", ".join(dropped), head, num_classes)
            state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
        load_into(model, state, source=str(weights), allow_fresh_head=True)
    return model


def load_into(model: torch.nn.Module, state: dict[str, Tensor], source: str = "checkpoint",
              allow_fresh_head: bool = False) -> None:
    """Load ``state`` strictly; only a freshly built head may be absent when ``allow_fresh_head``."""
    target = model.state_dict()
    problems = describe_mismatch(target, state)
    if allow_fresh_head:
        missing_head = [k for k in target if k.startswith(HEAD_KEYS) and k not in state]
        state = {**state, **{k: target[k] for k in missing_head}}
        problems = describe_mismatch(target, state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)


def _checkpoint_num_classes(state: dict[str, Tensor]) -> int | None:
    w = state.get("head.weight")
    return None if w is None else int(w.shape[0])


def _same_head_kind(state: dict[str, Tensor], target: dict[str, Tensor]) -> bool:
    """Whether the checkpoint's and the model's ``head.weight`` have the same kernel (none for a linear head)."""
    ckpt_w, model_w = state.get("head.weight"), target.get("head.weight")
    if ckpt_w is None or model_w is None:
        return ckpt_w is model_w
    return ckpt_w.ndim == model_w.ndim and ckpt_w.shape[2:] == model_w.shape[2:]


def _checkpoint_img_size(state: dict[str, Tensor], kwargs: dict, source: str = "checkpoint") -> int:
    """The training size the checkpoint's position embeddings were made for (any input size still works)."""
    pos = state.get("pos_embed")
    if pos is None:
        return kwargs["img_size"]
    # Prefix tokens as stored: an mct checkpoint holds one class token per class, DeiT a distillation token.
    cls = state.get("cls_token")
    n_prefix = (1 if cls is None or cls.ndim != 3 else cls.shape[1]) + ("dist_token" in state)
    try:
        return grid_side(pos.shape[1] - n_prefix) * kwargs["patch_size"]
    except ValueError as exc:
        raise CheckpointError(f"{source}: pos_embed {tuple(pos.shape)} does not fit the model ({exc})") from exc


def _expand_class_tokens(state: dict[str, Tensor], num_classes: int) -> dict[str, Tensor]:
    """Replicate a single class token (and its position embedding) once per class, as MCTformer does."""
    cls, pos = state.get("cls_token"), state.get("pos_embed")
    if cls is None or pos is None or cls.shape[1] == num_classes:
        return state
    state = dict(state)
    state["cls_token"] = cls[:, :1].repeat(1, num_classes, 1)
    state["pos_embed"] = torch.cat([pos[:, :1].repeat(1, num_classes, 1), pos[:, cls.shape[1]:]], dim=1)
    return state
