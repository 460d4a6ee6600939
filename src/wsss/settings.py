"""Nested settings as flat dotted keys, and what changed between two of them.

A resumed run, a resumed pipeline, a rerun demo and an output manifest all name a change the same way, so these
live below every stage (``wsss.data`` included) rather than in the config loader.
"""

from __future__ import annotations

from typing import Any, Mapping


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}`` (how resumed runs report their changed settings)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` of every setting that differs between two nested dicts (a key one lacks is
    None): how a resumed run, a resumed pipeline and a rerun demo name what changed."""
    old, new = flatten(old), flatten(new)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key: old -> new, ...`` of :func:`changed_settings`."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
