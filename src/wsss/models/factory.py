"""``create_model``: named presets, heads and checkpoint loading with a strict fit check.

Three families: the ViT presets (:data:`wsss.models.vit.PRESETS`), the Conformers, and the headless CNN backbones
of the DeepLab and AffinityNet decoders (:data:`CNN_BACKBONES`: ``resnet101``, ``resnet38d``), which only a decoder
(:func:`wsss.models.decoders.make_segmenter`) turns into a model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .resnet import ResNet, resnet101
from .resnet38 import ResNet38, resnet38d
from .vit import PRESETS, VisionTransformer, grid_side
from .weights import describe_mismatch, load_state_dict

log = logging.getLogger(__name__)

# The Conformer presets have their own two heads (CNN and transformer branch), named ``head="conformer"``.
CONFORMER_HEAD = "conformer"


@dataclass(frozen=True)
class CNNBackbone:
    """A headless CNN backbone preset: how it is built, how a weights file loads into it, and which file that is."""

    build: Callable[[], nn.Module]
    load: Callable[[Any, Mapping[str, Tensor]], object]  # strict; drops only the file's ImageNet/VOC classifier
    weights: str


CNN_BACKBONES: dict[str, CNNBackbone] = {
    # DeepLabV2's ResNet-101 at output stride 8 (dilation 2 in layer3, 4 in layer4), torchvision's names.
    "resnet101": CNNBackbone(lambda: resnet101(num_classes=None, replace_stride_with_dilation=(False, True, True)),
                             ResNet.load_torchvision, "torchvision's resnet101-*.pth (its fc is dropped)"),
    # PSA's ResNet-38 (flat names, frozen BatchNorm and conv1a).
    "resnet38d": CNNBackbone(resnet38d, ResNet38.load_psa,
                             "PSA's resnet38d.pth or res38_cls.pth (its fc8 is dropped)"),
}

# The ViT arguments the engine passes to every backbone, at the values that change nothing on a CNN backbone.
_NEUTRAL_FOR_CNN = {"head": "token", "pool": "avg", "drop_path_rate": 0.0}


def _conformer_presets() -> dict:
    from .conformer import CONFORMER_PRESETS  # the Conformer module is only imported when one is asked for

    return CONFORMER_PRESETS


def list_models() -> list[str]:
    """Architecture names accepted by :func:`create_model` (add ``.TAG`` for pretrained weights)."""
    return sorted([*PRESETS, *_conformer_presets(), *CNN_BACKBONES])


def create_model(name: str, weights: str | Path | None = None, num_classes: int | None = None,
                 head: str = "token", pool: str = "avg", pretrained: bool = False, **overrides) -> torch.nn.Module:
    """Build a backbone preset and optionally load weights.

    Args:
        name: an architecture from :func:`list_models`; with ``pretrained=True``, ``ARCH.TAG`` with one of timm's
            pretrained tags (``vit_base_r50_s16_384.orig_in21k_ft_in1k``, ``vit_small_patch14_dinov2.lvd142m``,
            ``vit_base_patch16_clip_224.openai``, ...; :data:`wsss.models.hub.PRETRAINED` lists them). A bare name
            with ``pretrained=True`` is an error that lists the tags, so no one gets other weights than they think.
        weights: a local ``.safetensors``, ``.pth``/``.pt`` (loaded with ``weights_only=True``), JAX ``.npz``, or
            ``hf-hub:ORG/REPO[/FILE]``. Official DINOv2 and Hugging Face CLIP files are converted on load.
        num_classes: classifier outputs. With weights and ``None`` the checkpoint's head is kept (an ImageNet
            classifier works as it is); a different count builds a fresh head and says so in the log.
        head: ``token``, ``gap``, ``conv`` or ``mct`` for the ViTs (see :class:`VisionTransformer`); ``conformer``
            (its CNN and transformer heads) for the Conformers.
        pool: pooling of the ``conv`` head, ``avg`` or ``max``.
        pretrained: download (or find in the cache) the weights ``name``'s tag names.
        **overrides (Any): any other constructor argument (``drop_path_rate``, ``img_size``, ...).

    The CNN backbones (:data:`CNN_BACKBONES`) are built headless, their weights loaded strictly (only the file's
    classifier is dropped). ``num_classes`` does not apply to them (the segmentation decoder has the classes; the
    engine passes the dataset's count to every backbone); ``head``, ``pool`` and ``drop_path_rate`` must stay at the
    values that change nothing (``token``, ``avg``, 0), and other overrides are not accepted.

    Raises:
        CheckpointError: the checkpoint cannot be found or read, or does not fit (it lists the mismatched keys and
            shapes).
        ConfigError: a ViT-only setting given to a CNN backbone.
    """
    from .hub import resolve_pretrained, split_name

    arch, tag = split_name(name)
    if pretrained:
        if weights is not None:
            raise ValueError(f"{name}: give pretrained=True or weights=FILE, not both")
        weights = resolve_pretrained(name).path
    elif tag is not None:
        raise ValueError(f"{name!r} names pretrained weights: pass pretrained=True, or weights=FILE with the bare "
                         f"architecture name {arch!r}")
    if arch in CNN_BACKBONES:
        return _create_cnn(arch, weights, head=head, pool=pool, **overrides)
    return _create_transformer(arch, weights, num_classes, head, pool, overrides)


def _create_cnn(arch: str, weights: str | Path | None, **vit_arguments: Any) -> nn.Module:
    """The headless CNN backbone ``arch``, with ``weights`` loaded strictly; any ViT argument that would change
    something is an error, not ignored."""
    changed = [f"{key}={value!r}" for key, value in vit_arguments.items()
               if key not in _NEUTRAL_FOR_CNN or value != _NEUTRAL_FOR_CNN[key]]
    if changed:
        raise ConfigError(f"{arch} is a headless CNN backbone (for the DeepLab and AffinityNet decoders) and takes no ViT setting: "
                          f"got {', '.join(changed)}; leave head, pool and drop_path_rate at their defaults (token, "
                          f"avg, 0)")
    preset = CNN_BACKBONES[arch]
    model = preset.build()
    if weights is not None:
        state = load_state_dict(weights)
        try:
            preset.load(model, state)
        except CheckpointError as exc:
            raise CheckpointError(f"{weights}: {exc} (expected {preset.weights})") from exc
    return model


def _create_transformer(arch: str, weights: str | Path | None, num_classes: int | None, head: str, pool: str,
                        overrides: dict[str, Any]) -> nn.Module:
    """A ViT or Conformer preset (see :func:`create_model`)."""
    conformers = _conformer_presets()
    if arch not in PRESETS and arch not in conformers:
        raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(list_models())}")
    if arch in conformers:
        if head != CONFORMER_HEAD:
            raise ValueError(f"{arch} has its own CNN and transformer heads: use head={CONFORMER_HEAD!r}, not {head!r}")
        kwargs = dict(conformers[arch])
    else:
        if head == CONFORMER_HEAD:
            raise ValueError(f"head {CONFORMER_HEAD!r} belongs to the Conformer models, not {arch}")
        kwargs = dict(PRESETS[arch].kwargs(), head_type=head, pool=pool)
    kwargs.update(overrides)
    state, ckpt_classes = None, None
    if weights is not None:
        state = load_state_dict(weights)
        if arch in PRESETS:  # the Conformers have no position embeddings to size
            kwargs["img_size"] = _checkpoint_img_size(state, kwargs, source=str(weights))
        head_keys = _head_keys(arch)
        ckpt_classes = _checkpoint_num_classes(state, head_keys)
        if num_classes is None:
            num_classes = ckpt_classes if ckpt_classes is not None else 0
        if head == "mct":
            state = _expand_class_tokens(state, num_classes, embeds_prefix=not kwargs.get("no_embed_class", False))
    model = _build(arch, 1000 if num_classes is None else num_classes, kwargs)
    if state is not None:
        # The checkpoint's head is kept only when it is the same kind of layer (linear, 1x1 or 3x3 conv) with the
        # same class count, so a trained conv/mct head reloads while an ImageNet classifier is never forced into one.
        keys = model.head_keys
        if ckpt_classes != num_classes or not _same_head_kind(state, model.state_dict(), keys):
            dropped = [k for k in state if k.startswith(keys)]
            if dropped:
                log.warning("%s: not loading the checkpoint's classifier (%s); a new %s head with %d outputs is "
                            "initialised", weights, ", ".join(dropped), head, num_classes)
            state = {k: v for k, v in state.items() if not k.startswith(keys)}
        load_into(model, state, source=str(weights), allow_fresh_head=True)
    return model


def _build(arch: str, num_classes: int, kwargs: dict) -> torch.nn.Module:
    if arch in PRESETS:
        return VisionTransformer(num_classes=num_classes, **kwargs)
    from .conformer import Conformer

    return Conformer(num_classes=num_classes, **kwargs)


def _head_keys(arch: str) -> tuple[str, ...]:
    if arch in PRESETS:
        return VisionTransformer.head_keys
    from .conformer import Conformer

    return Conformer.head_keys


def load_into(model: torch.nn.Module, state: dict[str, Tensor], source: str = "checkpoint",
              allow_fresh_head: bool = False) -> None:
    """Load ``state`` strictly; only a freshly built head may be absent when ``allow_fresh_head``."""
    target = model.state_dict()
    problems = describe_mismatch(target, state)
    if allow_fresh_head:
        keys = tuple(getattr(model, "head_keys", VisionTransformer.head_keys))
        missing_head = [k for k in target if k.startswith(keys) and k not in state]
        state = {**state, **{k: target[k] for k in missing_head}}
        problems = describe_mismatch(target, state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)


def _checkpoint_num_classes(state: dict[str, Tensor], head_keys: tuple[str, ...]) -> int | None:
    w = state.get(head_keys[0] + "weight")
    return None if w is None else int(w.shape[0])


def _same_head_kind(state: dict[str, Tensor], target: dict[str, Tensor], head_keys: tuple[str, ...]) -> bool:
    """Whether the checkpoint's and the model's head weights have the same kernel (none for a linear head)."""
    key = head_keys[0] + "weight"
    ckpt_w, model_w = state.get(key), target.get(key)
    if ckpt_w is None or model_w is None:
        return ckpt_w is model_w
    return ckpt_w.ndim == model_w.ndim and ckpt_w.shape[2:] == model_w.shape[2:]


def _checkpoint_img_size(state: dict[str, Tensor], kwargs: dict, source: str = "checkpoint") -> int:
    """The training size the checkpoint's position embeddings were made for (any input size still works)."""
    pos = state.get("pos_embed")
    if pos is None:
        return kwargs["img_size"]
    # Prefix tokens as stored: an mct checkpoint holds one class token per class, DeiT a distillation token,
    # DINOv2 registers; with no_embed_class none of them has a position embedding.
    cls, reg = state.get("cls_token"), state.get("reg_token")
    n_prefix = (1 if cls is None or cls.ndim != 3 else cls.shape[1]) + ("dist_token" in state)
    n_prefix += 0 if reg is None or reg.ndim != 3 else reg.shape[1]
    if kwargs.get("no_embed_class"):
        n_prefix = 0
    try:
        return grid_side(pos.shape[1] - n_prefix) * kwargs["patch_size"]
    except ValueError as exc:
        raise CheckpointError(f"{source}: pos_embed {tuple(pos.shape)} does not fit the model ({exc})") from exc


def _expand_class_tokens(state: dict[str, Tensor], num_classes: int, embeds_prefix: bool = True) -> dict[str, Tensor]:
    """Replicate a single class token (and its position embedding) once per class, as MCTformer does."""
    cls, pos = state.get("cls_token"), state.get("pos_embed")
    if cls is None or pos is None or cls.shape[1] == num_classes:
        return state
    state = dict(state)
    state["cls_token"] = cls[:, :1].repeat(1, num_classes, 1)
    if embeds_prefix:
        state["pos_embed"] = torch.cat([pos[:, :1].repeat(1, num_classes, 1), pos[:, cls.shape[1]:]], dim=1)
    return state
