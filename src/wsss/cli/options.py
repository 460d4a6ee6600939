"""Option groups shared by the subcommands, and how their values are resolved.

``add_device``, ``add_normalization``, ``add_views`` and ``add_limit`` put the same flags with the same meaning on
every command that takes them; :func:`resolve_device`, :func:`normalization` and :func:`limited` turn the parsed
values into what the library calls want. Torch is imported only when a value is resolved, so building a parser
stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..device import DEVICE_NAME, resolve_device
from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

    from ..models.checkpoint import ModelSpec

log = logging.getLogger(__name__)


def _number(text: str, cast: type, ok: Callable[[float], bool], requirement: str) -> Any:
    """``text`` as a ``cast`` number meeting ``requirement`` (checked by ``ok``), else an argparse error."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, ">= 1")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _number(text, float, lambda v: 0 < v < math.inf, "a finite number > 0")


def finite_float(text: str) -> float:
    """An argparse type: a finite number (not nan or inf)."""
    return _number(text, float, math.isfinite, "a finite number")


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    return _number(text, float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (a probability, a threshold on normalised maps, a percentile)."""
    return _number(text, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def positive_fraction(text: str) -> float:
    """An argparse type: a number in (0, 1] (a downscaling factor)."""
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper bound with ``high`` None)."""
    requirement = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        return _number(text, int, lambda v: v >= low and (high is None or v <= high), requirement)

    parse.__name__ = f"int {requirement}"
    return parse


def positive_float_list(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers > 0, at least one (``1,0.5,1.5``)."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers > 0, got {text!r}")
    return [positive_float(item) for item in items]


def device_name(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not DEVICE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option, hidden from the help: it stores into the new option's ``dest`` and warns
    (a ``FutureWarning``, shown to users by default) that ``new`` replaces it."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any):
        kwargs.update(help=argparse.SUPPRESS, default=argparse.SUPPRESS)  # the new option's default stands
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed; use {self.new}", FutureWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser | argparse._ActionsContainer, old: str,
                         new: argparse.Action, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden, warning spelling of the option ``new`` (its value type, choices and metavar; in
    the same group as ``parser`` when that is ``new``'s group, so it conflicts as ``new`` does)."""
    parser.add_argument(old, action=DeprecatedAlias, dest=new.dest, new=new.option_strings[0], type=new.type,
                        choices=new.choices, nargs=new.nargs, metavar=new.metavar, **kwargs)


def add_crf(parser: argparse.ArgumentParser, presets: Sequence[str], default_help: str) -> None:
    """``--crf-preset P`` (and its old spelling ``--crf P``, deprecated) as every command with a ``--refine crf``
    spells it; given alone it also turns the CRF on (:func:`crf_refinement`). ``default_help`` says what the preset
    is when it is left out."""
    action = parser.add_argument("--crf-preset", choices=sorted(presets), default=None, metavar="P",
                                 help=f"dense CRF parameters ({', '.join(sorted(presets))}); alone, it also selects "
                                 f"--refine crf (default: {default_help})")
    add_deprecated_alias(parser, "--crf", action)


def crf_refinement(refine: str | None, crf_preset: str | None) -> str | None:
    """The refinement asked for: ``refine``, or ``crf`` where only ``--crf-preset`` is given; a preset with another
    refinement is a ConfigError (it would be ignored)."""
    if crf_preset is None:
        return refine
    if refine not in (None, "crf"):
        raise ConfigError(f"--crf-preset {crf_preset} sets the dense CRF, but --refine is {refine}: give --refine "
                          "crf, or leave --crf-preset out")
    return "crf"


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``auto``: CUDA when available, else the CPU)."""
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")


def add_normalization(parser: argparse.ArgumentParser) -> None:
    """``--mean M M M`` / ``--std S S S``; left out, the checkpoint's normalisation is used."""
    group = parser.add_argument_group("input normalisation")
    group.add_argument("--mean", type=finite_float, nargs=3, metavar="M", default=None,
                       help="per-channel mean of RGB in [0, 1] (default: the checkpoint's)")
    group.add_argument("--std", type=positive_float, nargs=3, metavar="S", default=None,
                       help="per-channel standard deviation (default: the checkpoint's)")


def _values(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def normalization(args: argparse.Namespace, spec: "ModelSpec", source: str | Path) -> tuple[tuple[float, ...],
                                                                                              tuple[float, ...]]:
    """``(mean, std)``: the flags where given, else the checkpoint's. A flag that contradicts the checkpoint (read
    from ``source``) is used, with a warning naming both values."""
    resolved = []
    for name in ("mean", "std"):
        flag, trained = getattr(args, name), tuple(getattr(spec, name))
        if flag is None:
            resolved.append(trained)
            continue
        if any(abs(a - b) > 1e-6 for a, b in zip(flag, trained)):
            log.warning("--%s %s contradicts the checkpoint's %s %s (%s); using the flag", name, _values(flag), name,
                        _values(trained), source)
        resolved.append(tuple(float(v) for v in flag))
    return resolved[0], resolved[1]


def check_classes(spec: "ModelSpec", names: Sequence[str], source: str | Path, data: str | Path) -> None:
    """The checkpoint's classes (where it records them) must be the dataset's: a CheckpointError naming both lists."""
    if spec.classes is not None and list(spec.classes) != list(names):
        raise CheckpointError(f"{source} was trained on the classes {list(spec.classes)}, but {data} has "
                              f"{list(names)}")


def classifier_of(model: "torch.nn.Module", spec: "ModelSpec", source: str | Path) -> "torch.nn.Module":
    """The ViT a localisation command reads: the checkpoint's classifier, or the backbone of a ViT segmentation
    model; a model with no ViT classifier (an AffinityNet, a DeepLab) is a :class:`CheckpointError`."""
    if spec.task == "classification":
        return model
    encoder = getattr(model, "encoder", None)
    if spec.task != "segmentation" or encoder is None:
        raise CheckpointError(f"{source} is a {spec.segmenter.get('decoder')} model with no classifier to localise "
                              "(localise with the classifier run that made its training labels)")
    return encoder


def check_classifier(num_outputs: int, num_fg: int, source: str | Path, data: str | Path) -> None:
    """A classifier to localise must have one output per foreground class of the dataset."""
    if num_outputs == 0:
        raise CheckpointError(f"{source} has no classifier to localise (a segmentation model trained without one)")
    if num_outputs != num_fg:
        raise CheckpointError(f"{source}: the classifier has {num_outputs} outputs, {data} has {num_fg} foreground "
                              f"classes")


def add_views(parser: argparse.ArgumentParser, what: str = "maps", squares: bool = False) -> None:
    """``--scales`` (resize factors > 0 of the views) and ``--flip``; with ``squares`` also ``--square-sizes``
    (views resized to squares instead of by the scales, :func:`wsss.models.multiview.views`)."""
    group = parser.add_argument_group("test-time views")
    group.add_argument("--scales", type=positive_float, nargs="+", metavar="S", default=[1.0],
                       help=f"resize factors of the views whose {what} are summed (the aspect ratio kept)")
    group.add_argument("--flip", action="store_true", help="add the horizontally flipped view of every view")
    if squares:
        group.add_argument("--square-sizes", type=positive_int, nargs="+", metavar="S", default=None,
                           help=f"instead of --scales: views resized to each S x S (the aspect ratio not kept), "
                           f"their {what} summed at the image size; ACR's infer_cam: 384 with --flip; GETAM's "
                           "test: 256 320 480 with --crf-preset getam (default: none)")


def add_batching(parser: argparse.ArgumentParser) -> None:
    """``--batch-size`` and ``--workers`` of split inference."""
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="B",
                        help="images of one size computed together (default: 4; the memory budget still splits a "
                        "batch that would not fit)")
    parser.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                        help="data-loader processes that decode the images (default: 2 on a GPU; 0 on the CPU, "
                        "whose cores compute the maps)")


def loader_workers(args: argparse.Namespace, device: "torch.device") -> int:
    """``--workers``, or its default for the device."""
    if args.workers is not None:
        return args.workers
    return 2 if device.type == "cuda" else 0


def add_limit(parser: argparse.ArgumentParser) -> None:
    """``--limit N``: only the first N images of the split."""
    parser.add_argument("--limit", type=positive_int, metavar="N", default=None,
                        help="process only the first N images of the split (default: all)")


def limited(items: Sequence[Any], limit: int | None) -> Sequence[Any]:
    """The first ``limit`` items (all with None)."""
    return items if limit is None else items[:limit]
