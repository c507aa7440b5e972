"""Shared benchmark helpers: machine description, peak memory, summaries."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

_REPO = Path(__file__).resolve().parent.parent
_LIBS = ("torch", "torchvision", "numpy", "pillow", "ffcv", "nvidia-dali-cuda130", "numba",
         "opencv-python")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _gpu() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return None


def machine_info() -> dict:
    """What the numbers were measured on (CPU, cores, memory, GPU, versions, commit)."""
    versions = {}
    for lib in _LIBS:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "cpu": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpu(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
    }


class PeakRSS:
    """Peak resident memory of this process plus all its descendants, polled
    by a background thread (``resource.getrusage`` only sees children that
    have exited, and only one at a time). The sum counts pages shared between
    forked workers once per process, so it is an upper bound for them.

    Use as a context manager; ``peak_mb`` is valid inside and after.

    Listing the descendants scans every process of the machine (~1.2 ms, with
    the GIL held), so it is done every ``refresh_s``; each ``interval_s`` poll
    only reads the listed processes' RSS: listing at every poll would slow
    the fastest loaders it measures (docs/design/benchmarks.md)."""

    def __init__(self, interval_s: float = 0.05, refresh_s: float = 1.0):
        self.interval_s, self.refresh_s, self.peak_bytes = interval_s, refresh_s, 0
        self._proc = psutil.Process()
        self._procs: list = [self._proc]
        self._listed_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, relist: bool = True) -> int:
        now = time.monotonic()
        if relist or now - self._listed_at >= self.refresh_s:
            self._procs = [self._proc, *self._proc.children(recursive=True)]
            self._listed_at = now
        total = 0
        for p in self._procs:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # a worker that exited after the listing
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample(relist=False)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def __enter__(self) -> "PeakRSS":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def summarize(values) -> dict:
    """Median and spread of repeated measurements (``spread`` = (max - min) / median)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no measurements to summarize")
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "n": len(values),
            "spread": (max(values) - min(values)) / med if med else float("nan")}
