"""Optimisers and learning-rate schedules from the config's ``optim`` section."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float, lr: float, head_lr_mult: float) -> list[dict]:
    """No weight decay on norms, biases, tokens and position embeddings; heads may get a larger learning rate.

    The heads are the backbone's classifier (its ``head_keys``: ``head.`` of a ViT, the Conformer's two heads) and,
    in a segmentation model, everything around its ``encoder`` (the decoder); the rest is the pretrained trunk.
    """
    wrapped = isinstance(getattr(model, "encoder", None), nn.Module)
    backbone = model.encoder if wrapped else model
    head_keys = tuple(getattr(backbone, "head_keys", ("head.", "head_dist.")))
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("cls_token", "dist_token", "reg_token", "pos_embed"))
        if wrapped and not name.startswith("encoder."):
            is_head = True
        else:
            is_head = name.removeprefix("encoder.").startswith(head_keys)
        groups.setdefault((no_decay, is_head), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr": lr * (head_lr_mult if hd else 1.0),
             "lr_mult": head_lr_mult if hd else 1.0}
            for (nd, hd), ps in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """``adamw`` or ``sgd``. The GETAM/ACR PolyOptimizer quirk (momentum = weight decay value, no decay) is the
    explicit option ``authors_sgd_quirk: true`` in a method preset, not a default."""
    name = cfg["name"]
    groups = param_groups(model, cfg["weight_decay"], cfg["lr"], cfg.get("head_lr_mult", 1.0))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "sgd":
        if cfg.get("authors_sgd_quirk", False):
            # SGD(params, lr, weight_decay) passed positionally: momentum takes the decay value, decay is 0.
            for g in groups:
                g["weight_decay"] = 0.0
            return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["weight_decay"], weight_decay=0.0)
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    raise ConfigError(f"optim.name must be 'adamw' or 'sgd', got {name!r}")


def lr_factor(step: int, total: int, cfg: dict) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then the schedule).

    With ``epoch_steps`` the cosine is timm's ``CosineLRScheduler`` as DeiT's loop (and so MCTformer's and AReAM's)
    steps it: the lr is constant within an epoch; epoch e runs at the value of t = max(e - 1, 0) (the loop calls
    ``scheduler.step(epoch)`` after epoch e, so the first two epochs share t = 0); t < W warm-up epochs give
    ``warmup_lr + t (lr - warmup_lr) / W``, later ones ``min_lr + (lr - min_lr)(1 + cos(pi t / E)) / 2`` with
    E = total epochs and t not shifted by the warm-up (timm's ``warmup_prefix=False``).
    """
    if cfg.get("epoch_steps"):
        return _timm_epoch_cosine(step, total, cfg)
    warmup = cfg.get("warmup_steps", 0)
    if step < warmup:  # linear from warmup_lr (default 0) towards lr
        start = cfg.get("warmup_lr", 0.0) / cfg["lr"] if cfg["lr"] else 0.0
        return start + (1 - start) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.get("min_lr", 0.0) / cfg["lr"] if cfg["lr"] else 0.0
    schedule = cfg["schedule"]
    if schedule == "constant":
        return 1.0
    if schedule == "poly":
        return max(floor, (1 - progress) ** cfg.get("poly_power", 0.9))
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule must be cosine, poly or constant, got {schedule!r}")


def _timm_epoch_cosine(step: int, total: int, cfg: dict) -> float:
    per_epoch = int(cfg["epoch_steps"])
    t = max(step // per_epoch - 1, 0)
    epochs = max(1, total // per_epoch)
    warm = cfg.get("warmup_steps", 0) // per_epoch
    lr, start, floor = cfg["lr"], cfg.get("warmup_lr", 0.0), cfg.get("min_lr", 0.0)
    if t < warm:
        value = start + t * (lr - start) / warm
    else:
        value = floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * t / epochs))
    return value / lr


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: dict,
                    scale: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule of every group's learning rate: :func:`lr_factor`, times ``scale(step)`` when given (an
    objective's phase-dependent factor, e.g. GETAM's x0.1 in its second phase)."""
    lr_factor(0, total_steps, cfg)  # validate the schedule name now, not at the first step
    if scale is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: lr_factor(step, total_steps, cfg) * float(scale(step)))
