"""The method registry: what each WSSS method is, declared once, in its own folder.

A :class:`Method` names its localisation-map formulas, its training objective and the typed options of that
objective, its default pseudo-label recipe and its preset folder. The CLI, the config validator, the benchmarks and
the demo read the registry; nothing else names the methods.

Methods are found in three places, on first use: the sub-packages of :mod:`wsss.methods` (the built-in ones), the
``wsss.methods`` entry-point group of installed packages, and the modules listed in ``$WSSS_PLUGINS``
(comma-separated). A test or a notebook may also call :func:`register_method` directly.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata, resources
from importlib.abc import Traversable
from typing import Any, Callable, Iterator, Mapping, Protocol

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError

PLUGINS_ENV = "WSSS_PLUGINS"
ENTRY_POINT_GROUP = "wsss.methods"


class MethodOptions(BaseModel):
    """Base of every method's typed options (the keys of the config's ``method:`` section besides ``name``).

    Unknown keys are errors and values keep their YAML types (``strict``), so a typo never becomes a default.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoOptions(MethodOptions):
    """A method without options."""


class Objective(Protocol):
    """A training objective: ``objective(model, batch, step) -> (loss, {name: float})``.

    Optional extras the engine uses when present: ``build_model(backbone, spec)`` returns the model to train and
    records its architecture in ``spec``; ``lr_scale(step)`` multiplies the scheduled learning rate;
    ``state_dict()`` / ``load_state_dict(state)`` carry objective state across a resume.
    """

    def __call__(self, model: Any, batch: dict, step: int) -> tuple[Any, dict[str, float]]: ...


ObjectiveFactory = Callable[..., Objective]
"""``factory(options, classes=ClassSet, mean=..., std=..., device=...) -> Objective``."""


@dataclass(frozen=True)
class PseudoRecipe:
    """How a method turns its maps into pseudo labels by default (``wsss pseudo --method NAME``).

    ``rule`` is one of :data:`wsss.pseudo.RULES` with its ``params`` (``bg_threshold``; ``high``/``low``; ``alpha``;
    ``cut_threshold``); ``refine`` one of :data:`wsss.refine.REFINEMENTS` with ``iterations`` (PAMR/PAR), ``crf``
    (a CRF preset); ``scale`` resizes the score stack for the refinement; ``softmax`` normalises it first.
    """

    rule: str
    params: Mapping[str, Any] = field(default_factory=dict)
    refine: str = "none"
    iterations: int = 10
    crf: str = "psa"
    scale: float = 1.0
    softmax: bool = False


@dataclass(frozen=True)
class Method:
    """One method, declared in one place.

    Args:
        name: the name used everywhere (``method.name`` in configs, ``--method`` on the command line).
        summary: one line for help texts and ``wsss methods``.
        maps: the localisation-map formulas the method contributes, name -> :class:`~wsss.localize.Localizer`
            subclass (may be empty, e.g. for the segmentation stage).
        own_map: the map the method is judged by (a key of some method's ``maps``); left out, the map named like
            the method if it has one, else None (a non-WSSS stage).
        objective: the training objective factory, None for a map-only method.
        options: the typed options of the objective (a :class:`MethodOptions` subclass).
        pseudo: the default pseudo-label recipe, None when the method makes no pseudo labels.
        presets: the folder of the method's YAML presets (``<name>.yaml``), None for none.
        paper: the paper, for docs and help.
        aliases: older names still accepted in configs (e.g. ``classification`` for ``baseline``).
    """

    name: str
    summary: str
    maps: Mapping[str, type] = field(default_factory=dict)
    own_map: str | None = None
    objective: ObjectiveFactory | None = None
    options: type[MethodOptions] = NoOptions
    pseudo: PseudoRecipe | None = None
    presets: Traversable | None = None
    paper: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.own_map is None and self.name in self.maps:  # getam, acr, aream: the method's map is its name
            object.__setattr__(self, "own_map", self.name)

    def preset_names(self) -> list[str]:
        """The names of this method's presets."""
        if self.presets is None or not self.presets.is_dir():
            return []
        return sorted(p.name[:-5] for p in self.presets.iterdir() if p.name.endswith(".yaml"))

    def parse_options(self, section: Mapping[str, Any], where: str = "method") -> MethodOptions:
        """The typed options of a config ``method:`` section (``name`` excluded); a bad key or value is a
        :class:`~wsss.errors.ConfigError` naming it."""
        from pydantic import ValidationError

        values = {k: v for k, v in section.items() if k != "name"}
        try:
            return self.options.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, where)) from None


def describe_validation_error(exc: Any, where: str = "") -> str:
    """A pydantic ``ValidationError`` as lines ``config key 'a.b': problem (got value)``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in (where, *err["loc"]) if part != "")
        got = err.get("input")
        problem = err["msg"]
        if err["type"] == "extra_forbidden":
            problem = "unknown key"
        lines.append(f"config key {key!r}: {problem} (got {got!r})" if err["type"] != "missing"
                     else f"config key {key!r}: required")
    return "\n".join(lines)


def preset_folder(package: str) -> Traversable:
    """The ``presets`` folder of a method package (for :attr:`Method.presets`)."""
    return resources.files(package) / "presets"


class Registry:
    """Methods by name, discovered lazily (see the module docstring). One instance: :data:`REGISTRY`."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}
        self._discovered = False

    def register(self, method: Method, replace: bool = False) -> Method:
        """Add ``method``; a second method of the same name (or map name) is an error unless ``replace``."""
        self._discover()
        taken = {} if replace else self._map_owners()
        if not replace and (method.name in self._methods or method.name in self._aliases()):
            raise ValueError(f"a method named {method.name!r} is already registered")
        clash = sorted(set(method.maps) & set(taken))
        if clash:
            raise ValueError(f"map(s) {clash} of {method.name!r} are already registered by "
                             f"{sorted({taken[c] for c in clash})}")
        self._methods[method.name] = method
        return method

    def unregister(self, name: str) -> None:
        """Remove a method (tests register temporary ones)."""
        self._methods.pop(name, None)

    def get(self, name: str) -> Method:
        """The method called ``name`` (or one of its aliases); unknown names are a ConfigError listing the known."""
        self._discover()
        if name in self._methods:
            return self._methods[name]
        for method in self._methods.values():
            if name in method.aliases:
                return method
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Every registered method's name."""
        self._discover()
        return sorted(self._methods)

    def __iter__(self) -> Iterator[Method]:
        self._discover()
        return iter([self._methods[n] for n in sorted(self._methods)])

    def wsss_methods(self) -> list[Method]:
        """The methods that localise (they have an ``own_map``): baseline, getam, acr, aream, plug-ins."""
        return [m for m in self if m.own_map is not None]

    def maps(self) -> dict[str, type]:
        """Every map formula of every method, name -> Localizer class."""
        out: dict[str, type] = {}
        for method in self:
            out.update(method.maps)
        return out

    def localizer(self, name: str) -> type:
        """The Localizer class of the map formula ``name``."""
        maps = self.maps()
        if name not in maps:
            raise ConfigError(f"unknown map method {name!r}; choose one of {', '.join(sorted(maps))}")
        return maps[name]

    def presets(self) -> dict[str, Traversable]:
        """Every method's presets, preset name -> YAML file."""
        out: dict[str, Traversable] = {}
        for method in self:
            for preset in method.preset_names():
                out[preset] = method.presets / f"{preset}.yaml"
        return out

    def _aliases(self) -> set[str]:
        return {a for m in self._methods.values() for a in m.aliases}

    def _map_owners(self) -> dict[str, str]:
        return {map_name: m.name for m in self._methods.values() for map_name in m.maps}

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # set first: the imported modules call register()
        modules = [f"{__package__}.{info.name}" for info in pkgutil.iter_modules(_package_path()) if info.ispkg]
        modules += [ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
        modules += [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in modules:
            try:
                importlib.import_module(module.split(":")[0])
            except ImportError as exc:
                raise ConfigError(f"cannot import the method plug-in {module!r} ({exc})") from exc


def _package_path() -> list[str]:
    from . import __path__ as path

    return list(path)


REGISTRY = Registry()
register_method = REGISTRY.register
unregister_method = REGISTRY.unregister
get_method = REGISTRY.get
