"""The teacher-logit cache: raw logits per (sample, view) in HDF5.

Filled once from full-resolution views (view 0 = whole image, views
1..K-1 = the replayable crops of :mod:`pipelines.views`), so distillation
reads teacher targets instead of running the teacher. Raw logits are stored
(the temperature is applied at loss time) together with what they were
derived from: the teacher weights hash, the dataset manifest fingerprint and
the view configuration. Opening a cache with a different key is an error,
never a silently stale target.

Filling is resumable: each finished batch is written atomically as its own
part file under ``<path>.parts/``; a rerun after ``kill -9`` skips finished
parts and the final HDF5 is assembled from the parts (then renamed into
place), so its contents equal an uninterrupted fill. HDF5 itself is not
crash-safe, which is why partial progress does not live in it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import h5py
import numpy as np
import torch

from dataset_tools.atomic import atomic_write_bytes

FORMAT_VERSION = 1


class CacheError(RuntimeError):
    pass


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached logits depend on."""

    teacher_hash: str
    data_fingerprint: str
    views: dict  # ViewConfig.to_dict()
    teacher_resolution: int

    def to_json(self) -> str:
        return json.dumps({"teacher_hash": self.teacher_hash, "data_fingerprint": self.data_fingerprint,
                           "views": self.views, "teacher_resolution": self.teacher_resolution},
                          sort_keys=True)

    def differences(self, other: "CacheKey") -> list[str]:
        a, b = json.loads(self.to_json()), json.loads(other.to_json())
        return [f"{k}: cache has {a[k]!r}, expected {b[k]!r}" for k in a if a[k] != b[k]]


class LogitCache:
    """A filled cache held in memory (on the training device when it fits)
    so lookups are one batched gather with no host synchronization."""

    def __init__(self, path: Path, key: CacheKey, logits: torch.Tensor, fp16_max_abs_error: float):
        self.path, self.key = path, key
        self.logits = logits  # [N, K, C]
        self.fp16_max_abs_error = fp16_max_abs_error

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    @property
    def num_views(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    @classmethod
    def open(cls, path, expected: Optional[CacheKey] = None, device="cpu") -> "LogitCache":
        path = Path(path)
        if not path.is_file():
            hint = " (an unfinished fill: rerun 'python -m trainer cache' to resume)" if \
                Path(str(path) + ".parts").is_dir() else ""
            raise CacheError(f"{path}: logit cache not found{hint}; fill it with "
                             f"'python -m trainer cache --config ...'")
        try:
            with h5py.File(path, "r") as f:
                if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                    raise CacheError(f"{path}: cache format {f.attrs.get('format_version')}, "
                                     f"expected {FORMAT_VERSION}; refill it")
                key = CacheKey(**json.loads(f.attrs["key"]))
                logits = torch.from_numpy(f["logits"][...])
                err = float(f.attrs["fp16_max_abs_error"])
        except OSError as e:
            raise CacheError(f"{path}: unreadable HDF5 cache ({e}); delete it and refill") from e
        if expected is not None and key != expected:
            diff = "; ".join(key.differences(expected))
            raise CacheError(f"{path}: logit cache is stale or for other data ({diff}); refill "
                             f"it with 'python -m trainer cache' or point to the matching cache")
        return cls(path, key, logits.to(device), err)

    def to(self, device) -> "LogitCache":
        self.logits = self.logits.to(device)
        return self

    def lookup(self, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, C]`` of the given (sample, view) pairs."""
        dev = self.logits.device
        return self.logits[indices.to(dev, non_blocking=True), view_ids.to(dev, non_blocking=True)].float()


def _part_path(parts: Path, view: int, batch: int) -> Path:
    return parts / f"v{view:04d}-b{batch:07d}.npz"


def fill_cache(path, key: CacheKey, num_samples: int, num_classes: int, num_views: int,
               view_batches: Callable[[int], Iterable[tuple[np.ndarray, Callable[[], np.ndarray]]]],
               dtype: str = "float16", progress: Optional[Callable[[int], None]] = None) -> Path:
    """Fill (or resume filling) the cache at ``path``.

    ``view_batches(v)`` yields, for view ``v``, ``(indices, compute)`` per batch
    in a deterministic order; ``compute()`` runs the teacher and returns float32
    logits ``[B, C]``. It is only called for batches not already on disk.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
    path = Path(path)
    parts = Path(str(path) + ".parts")
    key_file = parts / "key.json"
    if parts.is_dir() and (not key_file.is_file() or key_file.read_text() != key.to_json()):
        shutil.rmtree(parts)  # parts of another teacher/data/view config: start over
    parts.mkdir(parents=True, exist_ok=True)
    if not key_file.is_file():
        atomic_write_bytes(key_file, lambda f: f.write(key.to_json().encode()))

    for v in range(num_views):
        for b, (indices, compute) in enumerate(view_batches(v)):
            part = _part_path(parts, v, b)
            if not part.is_file():
                logits = np.asarray(compute(), dtype=np.float32)
                idx = np.asarray(indices, dtype=np.int64)
                if logits.shape != (len(idx), num_classes):
                    raise CacheError(f"teacher returned logits of shape {logits.shape}, expected "
                                     f"({len(idx)}, {num_classes}): wrong class count?")
                atomic_write_bytes(part, lambda f: np.savez(f, indices=idx, logits=logits))
            if progress:
                progress(len(indices))

    full = np.full((num_samples, num_views, num_classes), np.nan, dtype=np.float32)
    for v in range(num_views):
        for part in sorted(parts.glob(f"v{v:04d}-b*.npz")):
            with np.load(part, allow_pickle=False) as z:
                full[z["indices"], v] = z["logits"]
    if np.isnan(full).any():
        missing = int(np.isnan(full).any(axis=2).sum())
        raise CacheError(f"{parts}: {missing} (sample, view) rows were never filled; the loader "
                         f"must visit every sample once per view (drop_last=False, no sharding)")
    stored = full.astype(np.float16) if dtype == "float16" else full
    fp16_err = float(np.abs(stored.astype(np.float32) - full).max())

    def write(f):
        with h5py.File(f, "w") as h:
            h.create_dataset("logits", data=stored, chunks=(min(1024, num_samples), num_views, num_classes))
            h.attrs["format_version"] = FORMAT_VERSION
            h.attrs["key"] = key.to_json()
            h.attrs["fp16_max_abs_error"] = fp16_err
            h.attrs["dtype"] = dtype

    atomic_write_bytes(path, write)
    shutil.rmtree(parts)
    return path


def cache_exists(path) -> bool:
    return Path(path).is_file()


def remove_cache(path) -> None:
    for p in (Path(path), Path(str(path) + ".parts")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            os.unlink(p)
