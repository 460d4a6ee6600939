"""The one checkpoint format: weights as safetensors, and a spec that carries everything needed to use them.

The spec (JSON in the safetensors metadata under ``wsss_model``) records the architecture (backbone preset, head,
pool, class count, training size, and the segmentation decoder if any; a DeepLab's CNN backbone has no head, pool or
training size, and those entries keep their defaults), the dataset's class names, the input
normalisation (mean/std), the method that trained it and the resolved training config. :func:`load` is the one way
in: ``model, spec = load(path)`` works on a run folder, a checkpoint folder or a ``model.safetensors`` file, and
the commands take the normalisation and classes from ``spec``.

Files written before the spec had a version (version 1) still load: their mean/std come from the run folder's
``config.yaml`` (what the engine trained with); without one, the error says how to convert the file
(:func:`upgrade`, ``wsss upgrade-checkpoint``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from ..data.io import atomic_path
from ..errors import CheckpointError, ConfigError, naming
from .factory import CNN_BACKBONES, create_model, load_into
from .decoders import DECODERS, is_segmentation_model, make_segmenter
from .vit import VisionTransformer
from .weights import META_KEY, load_state_dict

MODEL_FILE = "model.safetensors"
SPEC_VERSION = 2
LATEST = Path("checkpoints") / "latest"


@dataclass
class ModelSpec:
    """What a checkpoint holds besides its weights.

    ``arch`` is the backbone preset (:func:`wsss.models.list_models`); ``segmenter`` the settings of a segmentation
    model (its ``config()``: the decoder and its settings, :mod:`wsss.models.decoders`; None for a classifier);
    ``head``, ``pool``, ``num_classes`` and ``img_size`` describe a ViT backbone (a CNN backbone, ``resnet101`` or
    ``resnet38d``, has none of them: they keep their defaults, ``num_classes`` 0); ``classes`` the dataset's class names
    (background first where it has one); ``mean``/``std`` the input normalisation; ``method`` the registered method
    that trained it; ``config`` the resolved training config.
    """

    arch: str
    head: str = "token"
    pool: str = "avg"
    num_classes: int = 0
    img_size: tuple[int, int] = (224, 224)
    segmenter: dict[str, Any] | None = None
    classes: list[str] | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    method: str | None = None
    config: dict[str, Any] | None = field(default=None, repr=False)
    version: int = SPEC_VERSION

    @property
    def task(self) -> str:
        """``classification`` (no decoder), else its decoder's task: ``segmentation`` or ``affinity``."""
        if self.segmenter is None:
            return "classification"
        decoder = DECODERS.get(self.segmenter.get("decoder", "light"))
        return "segmentation" if decoder is None else decoder.task

    @property
    def is_segmenter(self) -> bool:
        """Whether the model segments (its output is per-class logits at the input size)."""
        return self.task == "segmentation"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "checkpoint") -> "ModelSpec":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown spec entries {unknown} (written by a newer wsss?)")
        wrong = [f"{key} should be {what}" for key, (kinds, what) in _SPEC_TYPES.items()
                 if key in data and not _is(data[key], kinds)]
        if isinstance(data.get("classes"), list) and not all(isinstance(c, str) for c in data["classes"]):
            wrong.append("classes should be a list of names")
        if wrong:
            raise CheckpointError(f"{source}: malformed spec ({'; '.join(wrong)}); the file is damaged or was not "
                                  f"written by wsss")
        try:
            spec = cls(**data)
            spec.img_size = tuple(int(v) for v in spec.img_size)
            spec.mean = tuple(float(v) for v in spec.mean)
            spec.std = tuple(float(v) for v in spec.std)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed spec ({exc})") from exc
        if len(spec.mean) != 3 or len(spec.std) != 3 or len(spec.img_size) != 2:
            raise CheckpointError(f"{source}: malformed spec (mean/std need 3 values, img_size 2)")
        return spec


# The JSON types of the spec's entries (an int is no bool; None where the entry is optional).
_SPEC_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "arch": ((str,), "a backbone name"), "head": ((str,), "a head name"), "pool": ((str,), "a pooling name"),
    "num_classes": ((int,), "an integer"), "img_size": ((list, tuple), "[height, width]"),
    "segmenter": ((dict, type(None)), "a mapping or null"), "classes": ((list, type(None)), "a list or null"),
    "mean": ((list, tuple), "3 numbers"), "std": ((list, tuple), "3 numbers"),
    "method": ((str, type(None)), "a method name or null"), "config": ((dict, type(None)), "a mapping or null"),
    "version": ((int,), "an integer"),
}


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def describe(model: nn.Module, arch: str, classes: Sequence[str] | None = None,
             mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
             method: str | None = None, config: dict[str, Any] | None = None) -> ModelSpec:
    """The spec of ``model``: a classifier (a :class:`VisionTransformer` or Conformer) or a segmentation model (a
    :class:`~wsss.models.segmenter.Segmenter` on a ViT, or a DeepLab on the CNN backbone ``arch``).

    Raises:
        ConfigError: ``model`` is a bare CNN backbone: it has no classifier, only a DeepLab decoder makes it a model.
    """
    segmenter = model.config() if is_segmentation_model(model) else None
    if arch in CNN_BACKBONES:
        if segmenter is None:
            fitting = [n for n, d in DECODERS.items() if isinstance(model, d.backbone)]
            raise ConfigError(f"{arch} is a headless CNN backbone without a classifier: train it with method "
                              f"segmentation and decoder {' or '.join(fitting) or 'deeplabv2/deeplab_resnet38'}")
        backbone: dict[str, Any] = {}
    else:
        vit: VisionTransformer = model.encoder if segmenter is not None else model
        backbone = {"head": vit.head_type, "pool": vit.pool, "num_classes": vit.num_classes,
                    "img_size": (vit.base_grid[0] * vit.patch_size, vit.base_grid[1] * vit.patch_size)}
    return ModelSpec(arch=arch, **backbone, segmenter=segmenter, classes=None if classes is None else list(classes),
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), method=method,
                     config=config)


def save(path: str | Path, model: nn.Module, spec: ModelSpec) -> None:
    """Write the weights (contiguous CPU copies) and ``spec`` atomically to ``path`` (never through a symlink)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # A fresh temporary file renamed onto ``path``: a kill or a full disk leaves the old file, and a symlink at
    # ``path`` is replaced by the file, never written through.
    # Serialised in memory and written by Python, so that a full disk is an OSError naming the file (safetensors'
    # own writer raises its own error type).
    data = save_bytes(state, metadata={META_KEY: spec.to_json()})
    with naming(path), atomic_path(path) as tmp:
        tmp.write_bytes(data)


def resolve(path: str | Path) -> Path:
    """The ``model.safetensors`` a path means: the file itself, a checkpoint folder's, or a run folder's final model
    (else its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        pointer = path / LATEST
        if pointer.is_file():
            latest = path / "checkpoints" / pointer.read_text().strip() / MODEL_FILE
            if latest.is_file():
                return latest
            raise CheckpointError(f"{pointer}: points at a missing checkpoint {latest}")
        raise CheckpointError(f"{path}: no {MODEL_FILE} and no {LATEST} in this folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: wsss checkpoints are .safetensors files (for other weights use "
                              "create_model(name, weights=FILE))")
    return path


def read_spec(path: str | Path) -> ModelSpec:
    """The spec of a checkpoint (version 1 files are upgraded on the fly, see the module docstring)."""
    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc
    if META_KEY not in meta:
        raise CheckpointError(f"{path}: no wsss spec in this file; load plain weights with "
                              "wsss.models.create_model(name, weights=FILE)")
    try:
        data = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the wsss spec is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the wsss spec is not a mapping")
    if "version" not in data:
        data = _from_version_1(path, data)
    return ModelSpec.from_dict(data, source=str(path))


def load(path: str | Path, device: torch.device | str | None = None) -> tuple[nn.Module, ModelSpec]:
    """``(model, spec)`` of a checkpoint: a classifier (:class:`VisionTransformer`) or a segmentation model (on a
    ViT, or a DeepLab), its weights loaded strictly, in eval mode (on ``device`` if given)."""
    path = resolve(path)
    spec = read_spec(path)
    model = build(spec, source=str(path))
    load_into(model, load_state_dict(path), source=str(path))
    model.eval()
    return (model if device is None else model.to(device)), spec


def build(spec: ModelSpec, source: str = "checkpoint") -> nn.Module:
    """A freshly initialised model of the architecture ``spec`` (read from ``source``) describes."""
    # A CNN backbone takes none of the ViT entries (they are at their defaults in its spec).
    vit = {} if spec.arch in CNN_BACKBONES else dict(head=spec.head, pool=spec.pool, num_classes=spec.num_classes,
                                                    img_size=tuple(spec.img_size))
    try:
        backbone = create_model(spec.arch, **vit)
        if spec.segmenter is None:
            return backbone
        return make_segmenter(backbone, spec.segmenter)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: the architecture its spec describes cannot be built ({exc}); the file is "
                              f"damaged or from another wsss version") from exc


def upgrade(path: str | Path, mean: Sequence[float], std: Sequence[float], method: str | None = None) -> ModelSpec:
    """Rewrite a version-1 checkpoint in place with the current spec, given the normalisation it was trained with."""
    path = resolve(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    data = json.loads(meta.get(META_KEY, "{}"))
    if "version" in data:
        raise CheckpointError(f"{path}: already a version-{data['version']} checkpoint")
    spec = ModelSpec.from_dict(_version_1_fields(data, mean, std, method), source=str(path))
    model = build(spec, source=str(path))
    load_into(model, load_state_dict(path), source=str(path))
    save(path, model, spec)
    return spec


def _from_version_1(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 spec with the mean/std (and method, config) recovered from the run folder's ``config.yaml``."""
    if "mean" in data and "std" in data:  # version-1 segmentation checkpoints already recorded them
        return _version_1_fields(data, data["mean"], data["std"], None)
    config = _run_config(path)
    if config is None:
        raise CheckpointError(
            f"{path}: an older wsss checkpoint without its input normalisation, and no config.yaml of its run "
            f"beside it. Convert it once with the mean/std it was trained with, e.g. "
            f"`wsss upgrade-checkpoint {path} --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5`")
    transforms = (config.get("data") or {}).get("transforms") or {}
    method = (config.get("method") or {}).get("name")
    fields = _version_1_fields(data, transforms.get("mean", [0.5] * 3), transforms.get("std", [0.5] * 3), method)
    fields["config"] = config
    return fields


def _version_1_fields(data: dict[str, Any], mean: Sequence[float], std: Sequence[float],
                      method: str | None) -> dict[str, Any]:
    if "name" not in data:
        raise CheckpointError("an older wsss spec without the architecture name cannot be read")
    return {"arch": data["name"], "head": data.get("head", "token"), "pool": data.get("pool", "avg"),
            "num_classes": data.get("num_classes", 0), "img_size": data.get("img_size", (224, 224)),
            "segmenter": data.get("segmenter"), "classes": data.get("classes"), "mean": list(mean),
            "std": list(std), "method": method}


def _run_config(path: Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of the run a checkpoint belongs to (``RUN/model.safetensors`` or
    ``RUN/checkpoints/step_*/model.safetensors``), or None."""
    import yaml

    for folder in (path.parent, path.parent.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            try:
                config = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError:
                return None
            return config if isinstance(config, dict) else None
    return None
