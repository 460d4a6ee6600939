"""Helpers shared by the benchmark scripts: data paths, the shared ViT-Ti, timing, peak memory, tables, JSON.

The benchmarks are scripts run by hand (``python benchmarks/<name>.py``), not tests. Each prints a markdown table
and writes a small JSON file (default under ``benchmarks/results/``) with the numbers and the environment they were
measured in.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from wsss.data.io import write_bytes_atomic
from wsss.models import create_model

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
VIT_TINY = "vit_tiny_patch16_224"
VIT_TINY_FILE = "vit_tiny_patch16_224_in1k.safetensors"
VIT_TINY_MEAN = VIT_TINY_STD = (0.5, 0.5, 0.5)  # the AugReg convention of the shared checkpoint


def shared_data_dir() -> Path:
    """The shared data folder: ``$WSSS_SHARED_DATA``, else ``../shared/data`` beside the repository.

    Raises ``SystemExit`` with a message when it is absent (a benchmark cannot run without its data).
    """
    env = os.environ.get("WSSS_SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise SystemExit(f"shared data folder not found at {path} (set WSSS_SHARED_DATA to its location)")
    return path


def load_vit_tiny(device: str | torch.device = "cpu", weights: str | Path | None = None) -> torch.nn.Module:
    """The shared ImageNet ViT-Ti/16 (1000-class head) in eval mode on ``device``."""
    path = Path(weights) if weights is not None else shared_data_dir() / "weights" / VIT_TINY_FILE
    if not path.is_file():
        raise SystemExit(f"ViT-Ti weights not found at {path}")
    return create_model(VIT_TINY, weights=path).eval().to(device)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None keeps the default) and return the count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


@dataclass
class Timing:
    """Seconds of repeated runs of one callable, by two clocks.

    ``wall`` is elapsed time. ``cpu`` is the process's CPU time (all its threads): with one torch thread it is the
    work the call did, and it stays stable when other processes share the cores (wall time then also counts the
    time spent waiting for a core). With several threads it is their sum, not a latency.
    """

    wall: list[float]
    cpu: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        """The fastest wall time: on a shared machine noise only ever adds time, so this is the least disturbed."""
        return self.best_of("wall")

    @property
    def median(self) -> float:
        return self.median_of("wall")

    def best_of(self, clock: str) -> float:
        """The fastest run by ``clock`` (``wall`` or ``cpu``)."""
        return min(getattr(self, clock))

    def median_of(self, clock: str) -> float:
        return statistics.median(getattr(self, clock))

    def as_dict(self, per: int = 1, clock: str = "wall") -> dict[str, Any]:
        """Best and median by ``clock`` and every sample by both clocks, divided by ``per`` (e.g. the batch)."""
        return {"best_s": self.best_of(clock) / per, "median_s": self.median_of(clock) / per, "clock": clock,
                "wall_samples_s": [s / per for s in self.wall], "cpu_samples_s": [s / per for s in self.cpu]}


def timed_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float]:
    """Run ``fn`` once; return its (wall, cpu) seconds, queued GPU work included."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------------------------------ peak memory


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # the kernel reports kB
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Return freed heap pages to the OS, so the resident set is the live memory (glibc keeps freed chunks)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process; False where that is unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory_probe_works() -> bool:
    """Whether :func:`peak_memory_mib` can measure on this CPU machine (Linux with a resettable VmHWM)."""
    return _proc_status_mib("VmHWM") is not None and _reset_rss_peak()


def peak_memory_mib(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float | None:
    """Peak memory in MiB that one call of ``fn`` adds on top of what is live before it (None if unmeasurable).

    CUDA: ``torch.cuda.max_memory_allocated`` over the call, minus the allocation before it. CPU: the process's
    resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) during the call, minus the
    resident set just before it, after freed heap pages were handed back with ``malloc_trim``. The CPU figure
    counts every page the call touches: tensors, autograd buffers, oneDNN scratch space and thread stacks alike.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_free_heap()
    if not _reset_rss_peak():
        return None
    before = _proc_status_mib("VmRSS")
    fn()
    peak = _proc_status_mib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0.0, peak - before)


def measure(calls: dict[str, Callable[[], Any]], repeat: int, warmup: dict[str, int] | int = 1,
            device: torch.device | str = "cpu",
            wrap: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, memory: bool = True,
            ) -> dict[str, tuple[Timing, float | None]]:
    """Time several callables and record their peak memory (:func:`peak_memory_mib`, max over the rounds).

    Each callable first runs its ``warmup`` count of untimed calls (an int applies to all); then ``repeat`` rounds
    run every callable once each, interleaved, so that a change of load on the machine hits them alike. Every call
    runs inside ``wrap()`` (e.g. an autocast context). ``memory=False`` skips the memory probe (None is returned).
    """
    for name, fn in calls.items():
        for _ in range(warmup if isinstance(warmup, int) else warmup.get(name, 0)):
            with wrap():
                fn()
    timings = {name: Timing([], []) for name in calls}
    peaks: dict[str, float | None] = {name: None for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            seconds: list[tuple[float, float]] = []

            def run(fn: Callable[[], Any] = fn) -> None:
                with wrap():
                    fn()

            def call() -> None:
                seconds.append(timed_call(run, device))

            peak = None
            if memory:
                peak = peak_memory_mib(call, device)
            else:
                call()
            timings[name].wall.append(seconds[0][0])
            timings[name].cpu.append(seconds[0][1])
            if peak is not None:
                peaks[name] = peak if peaks[name] is None else max(peaks[name], peak)
    return {name: (timings[name], peaks[name]) for name in calls}


def time_calls(calls: dict[str, Callable[[], Any]], repeat: int = 3, warmup: int = 1,
               device: torch.device | str = "cpu") -> dict[str, Timing]:
    """:func:`measure` without the memory figures: interleaved timings of several callables."""
    return {name: timing for name, (timing, _) in measure(calls, repeat, warmup, device, memory=False).items()}


# ------------------------------------------------------------------------------------------------ output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed as they come (format them before)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: versions, CPU/GPU, threads, load average, commit, date."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        env["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON atomically (numpy values converted, NaN written as null)."""
    path = Path(path)
    text = json.dumps(_jsonable(payload), indent=2) + "\n"
    write_bytes_atomic(path, text.encode())
    path.chmod(0o644)  # the atomic writer's temporary file is private (0600); results are for everyone
    return path


def batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
