"""Typed YAML configs: defaults, a preset file, and ``key.sub=value`` overrides from the command line.

Every key of a config has a type and, where it matters, a range, declared once in the pydantic models below (their
defaults are the defaults of a run). The layers are merged first (defaults, then the file, then each override in
order) and the result is validated as a whole, so that a wrong value is a :class:`~wsss.errors.ConfigError` naming
the key and what is allowed before anything is built. Types are strict: ``true`` is not ``1``, ``"fast"`` is not a
number, ``1e3`` is not an integer; integers are accepted where a float is expected.

The ``method`` section holds ``name`` and the typed options of that registered method (:mod:`wsss.methods`); it is
validated by the method itself and resolved to its canonical name with every option.

:func:`load_config` returns the resolved config as a plain nested dict with every key, which :func:`dump_config`
writes and :func:`load_config` reads back unchanged.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from ..device import DEVICE_NAME
from ..errors import ConfigError
from ..models.multiview import check_views

DEFAULT_METHOD = "baseline"


class _Section(BaseModel):
    """A config section: unknown keys are errors, values keep their YAML types, numbers are finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------- value types

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what every generator the run seeds accepts
PathText = Annotated[str, Field(min_length=1)]  # a file or folder; "" would silently mean the working directory


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size(value: Any) -> int | list[int]:
    if _is_int(value) and value >= 1:
        return value
    if isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value):
        return value
    raise PydanticCustomError("size", "should be a positive integer or a [height, width] pair of them")


def _ordered(pair: list) -> list:
    if pair[0] > pair[1]:
        raise PydanticCustomError("ordered", "should be [low, high] with low <= high")
    return pair


def _flip(value: Any) -> bool | float:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and 0 <= value <= 1:
        return float(value)
    raise PydanticCustomError("flip", "should be true, false or a probability in [0, 1]")


def _jitter(values: list[float]) -> list[float]:
    if values[3] > 0.5:
        raise PydanticCustomError("hue", "the hue jitter (4th value) should be at most 0.5")
    return values


def _policy(value: str) -> str:
    from ..data.randaugment import RandAugment

    try:
        RandAugment.from_policy(value)
    except ValueError as exc:  # ConfigError is one
        raise PydanticCustomError("rand_augment", "{problem}", {"problem": str(exc)}) from None
    return value


def _hide_patches(value: Any) -> list:
    if (isinstance(value, list) and len(value) == 2 and _is_int(value[0]) and value[0] >= 1
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool) and 0 <= value[1] < 1):
        return [value[0], float(value[1])]
    raise PydanticCustomError("hide_patches", "should be [size, p] with an integer size >= 1 and 0 <= p < 1")


def _split_name(value: str) -> str:
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise PydanticCustomError("split", "should be a split name (ImageSets/Segmentation/<name>.txt), not a path")
    return value


def _thresholds(values: list[float]) -> list[float]:
    start, stop, step = values
    if step <= 0 or stop <= start:
        raise PydanticCustomError("thresholds", "should be [start, stop, step] with step > 0 and stop > start")
    return values


Size = Annotated[Any, AfterValidator(_size)]
IntRange = Annotated[list[PositiveInt], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
FloatRange = Annotated[list[PositiveFloat], Field(min_length=2, max_length=2), AfterValidator(_ordered)]
Colour = Annotated[list[float], Field(min_length=3, max_length=3)]
PositiveColour = Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]
ThresholdGrid = Annotated[list[float], Field(min_length=3, max_length=3), AfterValidator(_thresholds)]
SplitName = Annotated[str, AfterValidator(_split_name)]


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise PydanticCustomError("choice", "should be one of {choices} ({what})",
                                  {"choices": ", ".join(choices), "what": what})
    return value


# ------------------------------------------------------------------------------------------------------ sections

class ModelSection(_Section):
    """The backbone: a preset of :func:`wsss.models.list_models`, optional weights, the classifier head.

    ``pretrained: true`` with ``name: ARCH.TAG`` (a timm tag, e.g. ``vit_small_patch14_dinov2.lvd142m``) fetches
    the weights that tag names (:data:`wsss.models.hub.PRETRAINED`); ``weights`` is a local file instead.
    """

    name: str = "vit_tiny_patch16_224"
    weights: PathText | None = None
    pretrained: bool = False
    head: str = "token"
    pool: Literal["avg", "max"] = "avg"
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from ..models import list_models  # lazily: it imports torch
        from ..models.hub import split_name

        arch, tag = split_name(name)
        _choice(arch, list_models(), "the backbone presets")
        return name

    @field_validator("head")
    @classmethod
    def _known_head(cls, head: str) -> str:
        from ..models import HEADS
        from ..models.factory import CONFORMER_HEAD

        return _choice(head, [*HEADS, CONFORMER_HEAD], "the classifier heads")

    @model_validator(mode="after")
    def _weights_source(self) -> "ModelSection":
        from ..models.hub import split_name

        tag = split_name(self.name)[1]
        if self.pretrained and self.weights is not None:
            raise ValueError("model.pretrained and model.weights both given: choose one source of weights")
        if self.pretrained and tag is None:
            raise ValueError(f"model.pretrained needs a tagged name (ARCH.TAG), not {self.name!r}: "
                             "wsss.models.hub.PRETRAINED lists the tags")
        if tag is not None and not self.pretrained:
            raise ValueError(f"model.name {self.name!r} names pretrained weights: set model.pretrained=true, or use "
                             f"the bare architecture with model.weights=FILE")
        return self


class TransformsSection(_Section):
    """The training augmentation, as :func:`wsss.data.transforms.build_transforms` reads it.

    ``crop_mode`` left out is ``resized`` when ``scale`` is given, else ``random``; a ``resized`` crop without
    ``scale``/``ratio`` gets timm's defaults. ``mean``/``std`` ``null`` disables normalisation.
    """

    resize: Size | None = None  # short side, or [h, w]
    resize_long: IntRange | None = None  # GETAM: random long side in [min, max]
    random_scale: FloatRange | None = None  # random resize factor in [low, high]
    crop: Size | None = 224
    crop_mode: Literal["random", "center", "resized"] | None = None
    scale: FloatRange | None = None  # area fraction of the random resized crop
    ratio: FloatRange | None = None  # aspect ratio of the random resized crop
    hflip: Annotated[Any, AfterValidator(_flip)] = True  # or a probability
    color_jitter: Annotated[list[NonNegativeFloat], Field(min_length=4, max_length=4),
                            AfterValidator(_jitter)] | None = None  # [brightness, contrast, saturation, hue]
    color_jitter_p: Fraction = 1.0
    mean: Colour | None = [0.5, 0.5, 0.5]
    std: PositiveColour | None = [0.5, 0.5, 0.5]
    pad_mask: Annotated[int, Field(ge=0, le=255)] = 255
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    hide_patches: Annotated[Any, AfterValidator(_hide_patches)] | None = None  # Hide-and-Seek [size, p]
    rand_augment: Annotated[str, AfterValidator(_policy)] | None = None  # a timm policy string: rand-m9-mstd0.5-inc1 (MCTformer, AReAM)
    random_erasing: Fraction | None = None  # its probability (timm's reprob: 0.25)
    random_erasing_mode: Literal["pixel", "rand", "const"] = "pixel"

    @model_validator(mode="after")
    def _resolve_crop(self) -> "TransformsSection":
        if (self.mean is None) != (self.std is None):
            raise PydanticCustomError("normalisation", "give both mean and std, or neither (null: no normalisation)")
        if self.crop is None:
            if self.crop_mode is not None or self.scale is not None or self.ratio is not None:
                raise PydanticCustomError("crop", "crop_mode, scale and ratio need a crop size")
            return self
        if self.crop_mode is None:
            self.crop_mode = "resized" if self.scale is not None else "random"
        if self.crop_mode == "resized":
            self.scale = [0.08, 1.0] if self.scale is None else self.scale
            self.ratio = [3 / 4, 4 / 3] if self.ratio is None else self.ratio
        elif self.scale is not None or self.ratio is not None:
            raise PydanticCustomError("crop", "scale and ratio only apply to crop_mode resized")
        return self


class DataSection(_Section):
    """The training split and its loader."""

    root: PathText | None = None
    split: SplitName = "train"
    batch_size: PositiveInt = 8  # per process
    num_workers: NonNegativeInt = 2
    min_label_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0  # smaller classes do not count as present
    mask_dir: PathText | None = None  # masks from another folder (pseudo labels) instead of ROOT/SegmentationClass
    saliency_dir: PathText | None = None  # saliency maps <dir>/<id>.png for the objectives that use them (GETAM)
    # Image-level labels of a split without masks (default ROOT/labels.json or .csv).
    labels_file: PathText | None = None
    # A folder of your own images without classes.txt: a background class before the labels file's names.
    background: bool = True
    transforms: TransformsSection = Field(default_factory=TransformsSection)


class OptimSection(_Section):
    """The optimiser and learning-rate schedule (:mod:`wsss.train.optim`)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    head_lr_mult: PositiveFloat = 1.0
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 0
    poly_power: PositiveFloat = 0.9
    min_lr: NonNegativeFloat = 0.0
    # timm's epoch-wise cosine (MCTformer, AReAM): the lr changes once per epoch of this many steps (warmup_steps
    # then a whole number of epochs); see wsss.train.optim.lr_factor.
    epoch_steps: PositiveInt | None = None
    warmup_lr: NonNegativeFloat = 0.0  # where the linear warm-up starts (timm's warmup_lr_init)
    authors_sgd_quirk: bool = False  # see wsss.train.optim.build_optimizer

    @model_validator(mode="after")
    def _epoch_schedule(self) -> "OptimSection":
        if self.epoch_steps is not None:
            if self.schedule != "cosine":
                raise PydanticCustomError("epoch_steps", "epoch_steps (timm's epoch-wise schedule) needs schedule: "
                                          "cosine, not {schedule}", {"schedule": self.schedule})
            if self.warmup_steps % self.epoch_steps:
                raise PydanticCustomError("epoch_steps", "warmup_steps ({w}) must be a whole number of epochs of "
                                          "{e} steps", {"w": self.warmup_steps, "e": self.epoch_steps})
        return self

    @field_validator("min_lr")
    @classmethod
    def _floor_below_lr(cls, min_lr: float, info: ValidationInfo) -> float:
        lr = info.data.get("lr")  # absent when lr itself was invalid
        if lr is not None and min_lr > lr:
            raise PydanticCustomError("min_lr", "should be at most optim.lr ({lr}): the schedule decays from lr "
                                      "towards min_lr", {"lr": lr})
        return min_lr


class TrainSection(_Section):
    """The loop: length, logging, checkpoints, mixed precision, gradient clipping, DDP."""

    steps: PositiveInt = 1000
    log_every: PositiveInt = 10
    ckpt_every: NonNegativeInt = 200  # 0: only the final model
    keep_checkpoints: PositiveInt = 2
    amp: bool = False
    grad_clip: PositiveFloat | None = None
    find_unused_parameters: bool = False


class ValSection(_Section):
    """Validation during training (0 = never): the maps' mIoU, or the classifier's mAP (MCTformer, AReAM)."""

    every: NonNegativeInt = 0
    split: SplitName = "val"
    metric: Literal["miou", "map"] = "miou"  # map: per-image AP of the logits (MCTformer's compute_mAP)
    keep_best: bool = False  # also write model_best.safetensors whenever the metric improves
    method: str = "cam"
    limit: PositiveInt | None = None
    scales: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0]
    square_sizes: list[PositiveInt] | None = None  # ACR's geometry: the image resized to S x S, instead of scales
    flip: bool = False
    thresholds: ThresholdGrid = [0.0, 1.0, 0.01]  # [start, stop, step] of the background-threshold sweep
    images: NonNegativeInt = 4  # how many validation images TensorBoard shows; 0 for none

    @model_validator(mode="after")
    def _one_geometry(self) -> "ValSection":
        try:
            check_views(self.scales, self.square_sizes)
        except ConfigError as exc:
            raise PydanticCustomError("views", str(exc)) from None
        return self

    @field_validator("method")
    @classmethod
    def _known_map(cls, method: str) -> str:
        from ..methods import REGISTRY

        return _choice(method, sorted(REGISTRY.maps()), "the map methods")


class TrainingConfig(_Section):
    """A whole training config. ``method`` is checked by the registered method (see :func:`resolve_method`)."""

    seed: Seed = 0
    run_dir: Annotated[str, Field(min_length=1)] = "runs/train"
    device: str = "auto"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    method: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_METHOD})
    val: ValSection = Field(default_factory=ValSection)

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        if not DEVICE_NAME.fullmatch(device):
            raise PydanticCustomError("device", "should be auto, cpu, cuda or cuda:N")
        return device


# ------------------------------------------------------------------------------------------------------- parsing

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


def _packaged_presets() -> dict[str, Traversable]:
    """Preset name -> YAML file: ``wsss/configs/*.yaml`` and every registered method's presets."""
    from ..methods import REGISTRY

    folder = resources.files("wsss") / "configs"
    presets = {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".yaml")}
    presets.update(REGISTRY.presets())
    return presets


def preset_names() -> list[str]:
    """Names of the preset configs shipped with the package and its methods."""
    return sorted(_packaged_presets())


def read_yaml(source: str | Path) -> dict:
    """A config file's content: a path, or the name of a shipped preset."""
    path = Path(source)
    if path.is_file():
        text = path.read_text()
    else:
        presets = _packaged_presets()
        if str(source) not in presets:
            raise ConfigError(f"{source}: no such config file or preset (presets: {', '.join(sorted(presets))})")
        text = presets[str(source)].read_text()
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


def _merge(base: dict, update: dict) -> dict:
    """``update`` merged onto ``base`` section by section; any other value replaces what was there."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------- validation

def _known_keys(loc: Sequence[Any]) -> list[str]:
    """The keys of the section at ``loc`` (a path of field names from the top of the config)."""
    section: Any = TrainingConfig
    for part in loc:
        section = section.model_fields[part].annotation
    return list(section.model_fields)


def _problems(exc: ValidationError) -> list[str]:
    """One line per error: ``config key 'a.b': problem (got value)``."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        key = ".".join(str(part) for part in loc)
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            lines.append(f"unknown config key {key!r}; known at this level: {', '.join(known)}")
            continue
        got = err.get("input")
        where = f"config key {key!r}" if key else "config"
        lines.append(f"{where}: {err['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return lines


def _plain(value: Any) -> Any:
    """Tuples as lists, so that the config dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolve_method(section: dict[str, Any]) -> dict[str, Any]:
    """A ``method:`` section checked by its registered method: ``{"name": canonical name, **every option}``."""
    from ..methods import get_method

    name = section.get("name", DEFAULT_METHOD)
    if not isinstance(name, str):
        raise ConfigError(f"config key 'method.name': should be a method name (got {name!r})")
    try:
        method = get_method(name)
    except ConfigError as exc:
        raise ConfigError(f"config key 'method.name': {exc}") from None
    known = list(method.options.model_fields)
    problems = [f"unknown config key 'method.{key}'; the options of method {method.name!r}: "
                f"{', '.join(known) or 'none'}" for key in section if key != "name" and key not in known]
    try:
        options = method.parse_options({k: v for k, v in section.items() if k in known})
    except ConfigError as exc:
        problems += str(exc).splitlines()
    if problems:
        raise ConfigError("\n".join(problems))
    return {"name": method.name, **_plain(options.model_dump())}


def validate_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The defaults completed and checked by ``raw`` (a merged config): the resolved config as a plain dict, or a
    :class:`ConfigError` with one line per problem."""
    problems: list[str] = []
    cfg: dict[str, Any] = {}
    try:
        cfg = TrainingConfig.model_validate(raw).model_dump()
    except ValidationError as exc:
        problems += _problems(exc)
    section = raw.get("method", {"name": DEFAULT_METHOD})
    if isinstance(section, dict):  # otherwise the model reported it
        try:
            cfg["method"] = resolve_method(section)
        except ConfigError as exc:
            problems += str(exc).splitlines()
    if problems:
        raise ConfigError("\n".join(problems))
    return _plain(cfg)


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults, then the file or preset ``source``, then each override in order, validated and resolved."""
    raw: dict[str, Any] = {} if source is None else read_yaml(source)
    for item in overrides:
        raw = _merge(raw, parse_override(item))
    return validate_config(raw)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line (``scales: [1.0, 0.5]``)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                             flow_style=True))


def dump_config(cfg: dict) -> str:
    """The config as YAML text (what the run folder keeps); :func:`load_config` reads it back unchanged."""
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False)


# The default config, what load_config() returns without a file or overrides (the default method has no options).
DEFAULTS: dict[str, Any] = _plain(TrainingConfig().model_dump())
