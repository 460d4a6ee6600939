"""What a training run writes besides checkpoints: ``train.log``, ``metrics.jsonl`` and TensorBoard events.

Only rank 0 keeps a :class:`RunLog` open; the other ranks get a closed one whose methods do nothing. The files are
the run folder's own: a symlink in their place is replaced by a regular copy before anything is appended, so that a
run never writes into a file it was pointed at.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import write_bytes_atomic
from ..errors import naming

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
TB_DIR = "tb"


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` logged after ``last_step`` (a killed run's steps that will be redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if step <= last_step:
            kept.append(line + "\n")
    with naming(path):
        write_bytes_atomic(path, "".join(kept).encode())


def own_file(path: Path) -> None:
    """Replace a symlink at ``path`` by a regular file with what it pointed at (nothing for a dangling link)."""
    if path.is_symlink():
        with naming(path):
            write_bytes_atomic(path, path.read_bytes() if path.is_file() else b"")


class _FileHandler(logging.FileHandler):
    """A log file whose write errors (a full disk) are not printed as a traceback for every record: the run's next
    checkpoint or metrics write reports the problem as an error that stops it."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class RunLog:
    """Scalars to ``metrics.jsonl`` (one JSON object per line), the ``wsss`` log to ``train.log``, and scalars
    and image grids to TensorBoard when it is installed (an optional extra; without it nothing is said)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        self._handler: logging.Handler | None = None
        self._old_level = logging.NOTSET

    def open(self, resumed_step: int | None) -> None:
        """Start writing; a resumed run keeps the metrics up to ``resumed_step``, a new one starts them afresh."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if resumed_step is None:
            metrics.unlink(missing_ok=True)
        else:
            own_file(metrics)
            trim_metrics(metrics, resumed_step)
        own_file(self.run_dir / LOG_FILE)
        self._handler = _FileHandler(self.run_dir / LOG_FILE)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("wsss")
        root.addHandler(self._handler)
        self._old_level = root.level
        if root.getEffectiveLevel() > logging.INFO:  # the file gets INFO even when the console does not
            root.setLevel(logging.INFO)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        # purge_step hides the events a killed run logged after its checkpoint (all of them for a fresh start).
        self.writer = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=resumed_step or 0)

    @property
    def wants_images(self) -> bool:
        """Whether :meth:`image` goes anywhere (so the caller can skip drawing)."""
        return self.writer is not None

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` line with ``step`` and the numbers (and strings) of ``values``."""
        if not self.enabled:
            return
        flat = {"step": step, **{k: v for k, v in values.items() if isinstance(v, (int, float, str)) or v is None}}
        line = json.dumps(flat)
        logging.getLogger("wsss.train").info(line)
        with naming(self.run_dir / METRICS_FILE), open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(line + "\n")
        if self.writer is not None:
            for key, value in flat.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def image(self, tag: str, step: int, picture: np.ndarray) -> None:
        """An ``(H, W, 3)`` uint8 picture to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(tag, picture, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and detach everything (so a second run in the same process logs to its own folder)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._handler is not None:
            root = logging.getLogger("wsss")
            root.removeHandler(self._handler)
            root.setLevel(self._old_level)
            self._handler.close()
            self._handler = None
