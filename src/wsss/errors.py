"""Exceptions raised on bad user input. Each names the offending file and the problem.

Every :class:`WSSSError` pickles with its fields, whatever its ``__init__`` takes, so that one raised in a worker
process (a ``ProcessPoolExecutor``, or a data-loader worker through :class:`WorkerFailure`) arrives in the main
process as the same named error, and the command line reports it as one line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator


def _rebuild(cls: type, args: tuple, state: dict[str, Any]) -> "WSSSError":
    """The inverse of :meth:`WSSSError.__reduce__`: the instance without calling ``__init__`` again."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class WSSSError(Exception):
    """Base class of every error the toolkit raises on purpose."""

    def __reduce__(self) -> tuple:
        # Exception's own reduce calls cls(*self.args), which fails for an __init__ with other parameters
        # (DataError(path, problem)) and drops the fields set on the instance.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


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


# Errors a data-loader worker hands to the main process as they are; anything else is a bug, whose traceback
# torch's own wrapping keeps.
CARRIED = (WSSSError, OSError)


class WorkerFailure:
    """What a data-loader worker returns instead of a sample or batch when loading raised a :data:`CARRIED`
    error. torch re-creates a worker's exception as ``type(message)`` (a ``RuntimeError`` for ``DataError``,
    with a traceback as its text); this carries the exception itself, pickled, for :meth:`reraise`."""

    def __init__(self, error: BaseException):
        self.error = error

    def reraise(self) -> None:
        """Raise the worker's error in this process."""
        raise self.error


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Give an ``OSError`` raised inside that names no file (a failed ``write()``: disk full) the name ``path``,
    so that the one-line report says which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
