"""Plain-YAML configs: defaults, preset files, and ``key.sub=value`` overrides from the command line.

A config is a nested dict. Every key must exist in :data:`DEFAULTS` (a typo is an error, never a silently ignored
setting), except inside the open sections listed in :data:`OPEN_SECTIONS`, whose consumers validate them. A value
must also keep the kind of its default (a section stays a section, a number a number), so ``model=vit`` cannot
silently replace the whole ``model`` section.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "run_dir": "runs/train",
    "device": "auto",  # auto | cpu | cuda
    "model": {"name": "vit_tiny_patch16_224", "weights": None, "head": "token", "pool": "avg",
              "drop_path_rate": 0.0},
    "data": {
        "root": None,
        "split": "train",
        "batch_size": 8,  # per process
        "num_workers": 2,
        "min_label_fraction": 0.0,
        "mask_dir": None,  # masks from another folder (pseudo labels) instead of ROOT/SegmentationClass
        "saliency_dir": None,  # saliency maps <dir>/<id>.png for the objectives that use them (GETAM)
        "labels_file": None,  # image-level labels of a split without masks (default ROOT/labels.json or .csv)
        "transforms": {"crop": 224, "hflip": True},  # see wsss.data.transforms.build_transforms
    },
    "optim": {
        "name": "adamw",  # adamw | sgd
        "lr": 1e-4,
        "weight_decay": 0.05,
        "momentum": 0.9,
        "head_lr_mult": 1.0,
        "schedule": "cosine",  # cosine | poly | constant
        "warmup_steps": 0,
        "poly_power": 0.9,
        "min_lr": 0.0,
        "authors_sgd_quirk": False,  # see wsss.train.optim.build_optimizer
    },
    "train": {"steps": 1000, "log_every": 10, "ckpt_every": 200, "keep_checkpoints": 2, "amp": False,
              "grad_clip": None, "find_unused_parameters": False},
    "method": {"name": "classification"},
    # images: how many validation images TensorBoard shows (input, ground truth, pseudo label, map); 0 for none.
    "val": {"every": 0, "split": "val", "method": "cam", "limit": None, "scales": [1.0], "flip": False,
            "thresholds": [0.0, 1.0, 0.01], "images": 4},
}

OPEN_SECTIONS = ("data.transforms", "method")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading, but ``1e-4`` is a float (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text to Python values (safe loading; ``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)


def _is_open(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a section (mapping)"
    return type(value).__name__


def _check_kind(key: str, default: Any, value: Any) -> None:
    """A value must keep its default's kind; a default of None accepts anything, ints pass for floats."""
    if default is None:
        return
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return
    if _kind(default) != _kind(value):
        raise ConfigError(f"config key {key!r} must be {_kind(default)}, got {value!r}")


def _merge(base: dict, update: dict, path: str = "") -> dict:
    """Recursively merge ``update`` onto ``base``; keys unknown to ``base`` are errors outside open sections."""
    out = copy.deepcopy(base)
    section = path.rstrip(".")
    for key, value in update.items():
        full = f"{path}{key}"
        if not isinstance(key, str):
            raise ConfigError(f"config key {full!r} must be a string")
        if key not in out and not _is_open(section):
            raise ConfigError(f"unknown config key {full!r}; known at this level: {sorted(out)}")
        if key in out and not _is_open(section):
            _check_kind(full, out[key], value)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, full + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_names() -> list[str]:
    """Names of the preset configs shipped with the package."""
    folder = resources.files("wsss") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(source: str | Path) -> dict:
    """A config file's content: a path, or the name of a shipped preset."""
    path = Path(source)
    if not path.is_file():
        packaged = resources.files("wsss") / "configs" / f"{source}.yaml"
        if not packaged.is_file():
            raise ConfigError(f"{source}: no such config file or preset (presets: {', '.join(preset_names())})")
        text = packaged.read_text()
    else:
        text = path.read_text()
    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys to values")
    return data


def parse_override(text: str) -> dict:
    """``a.b.c=value`` to ``{'a': {'b': {'c': value}}}``; the value is YAML (``1e-4``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: invalid value ({exc})") from exc
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults, then the file or preset ``source``, then each override in order."""
    cfg = copy.deepcopy(DEFAULTS)
    if source is not None:
        cfg = _merge(cfg, read_yaml(source))
    for item in overrides:
        cfg = _merge(cfg, parse_override(item))
    return cfg


def dump_config(cfg: dict) -> str:
    """The config as YAML text (what the run folder keeps); :func:`load_config` reads it back unchanged."""
    return yaml.safe_dump(cfg, sort_keys=False)
