"""The training objective of a config's ``method:`` section, built through the method registry."""

from __future__ import annotations

from typing import Any

from ..methods import get_method
from ..errors import ConfigError


def build_objective(cfg: dict, **context: Any):
    """The objective of the method ``cfg['name']`` with its typed options; ``context`` carries what some objectives
    need (``classes``, ``mean``, ``std``, ``device``)."""
    method = get_method(cfg.get("name", "baseline"))
    if method.objective is None:
        raise ConfigError(f"method {method.name!r} has no training objective (it only makes maps)")
    return method.objective(method.parse_options(cfg), **context)
