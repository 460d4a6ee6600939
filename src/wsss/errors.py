"""Exceptions raised on bad user input. Each names the offending file and the problem."""

from __future__ import annotations

from pathlib import Path


class WSSSError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class DataError(WSSSError, ValueError):
    """A data file is missing, unreadable or inconsistent with the dataset."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class CheckpointError(WSSSError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class ConfigError(WSSSError, ValueError):
    """A configuration key or value is invalid."""
