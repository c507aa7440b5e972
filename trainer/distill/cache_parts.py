"""What every teacher-cache format shares: the key that says what its
targets were derived from, its error type, and the resumable fill.

Filling is resumable: each finished batch is written atomically as its own
part file under ``<path>.parts/``; a rerun after ``kill -9`` skips finished
parts, and the format's assembly reads the parts (then renames the cache into
place), so its contents equal an uninterrupted fill. Parts written for another
key or another layout (class count, feature dim, spatial maps, process count,
format) are discarded.

Under torchrun (``world_size > 1``) each rank computes the parts of its own
DistributedSampler shard of every view (named by rank, so no two ranks ever
write the same file); rank 0 alone prepares the part folder, assembles the
cache after a barrier and deletes the parts, while the others wait at the
final barrier. A sample in two shards (the sampler's padding) is written by
both ranks; assembly keeps the higher rank's row, from the same image. Every
format fills through :func:`fill_parts`, so this holds for each.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np

from dataset_tools.atomic import atomic_write_bytes
from dataset_tools.errors import CqkdError

# compute() returns logits [b, C]; (logits, features [b, D]) when feature_dim > 0;
# (logits, features or None, maps [b, channels, grid, grid]) when the cache stores spatial maps
Computed = Union[np.ndarray, tuple]


class CacheError(CqkdError, RuntimeError):
    pass


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes what the teacher saw or produced: its weights,
    the data, the view contract, the resolution, and how the pixels were made
    and the teacher run (backend decode path, reduced JPEG decode, memory
    format, device type, autocast dtype). A cache filled one way is never
    used silently with another."""

    teacher_hash: str
    data_fingerprint: str
    views: dict  # ViewConfig.to_dict()
    teacher_resolution: int
    decode: dict = field(default_factory=dict)  # backend, reduced_decode, channels_last
    compute: dict = field(default_factory=dict)  # device type, autocast dtype

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def differences(self, other: "CacheKey") -> list[str]:
        a, b = json.loads(self.to_json()), json.loads(other.to_json())
        return [f"{k}: cache has {a.get(k)!r}, expected {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]


def _part_path(parts: Path, view: int, batch: int, rank: int = 0, world_size: int = 1) -> Path:
    shard = f"-r{rank:04d}" if world_size > 1 else ""
    return parts / f"v{view:04d}{shard}-b{batch:07d}.npz"


def view_parts(parts: Path, view: int) -> list[Path]:
    """The part files of ``view``, every rank's, in assembly order (a higher
    rank's row of a padded sample overwrites a lower one's)."""
    return sorted(parts.glob(f"v{view:04d}-*.npz"))


def _checked(name: str, value, shape: tuple[int, ...], hint: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != shape:
        raise CacheError(f"teacher returned {name} of shape {arr.shape}, expected {shape}: {hint}")
    if not np.isfinite(arr).all():
        raise CacheError(f"teacher returned non-finite {name}; check the teacher checkpoint and "
                         f"the autocast dtype")
    return arr


def to_cache_dtype(arr: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, float]:
    """``arr`` in the cache dtype and the max abs error of that rounding."""
    if dtype == "float32":
        return arr, 0.0
    stored = arr.astype(np.float16)
    if not np.isfinite(stored).all():
        raise CacheError(f"teacher {name} exceed the float16 range (max |x| = "
                         f"{float(np.abs(arr).max()):.4g}); fill the cache with dtype float32")
    return stored, float(np.abs(stored.astype(np.float32) - arr).max(initial=0.0))


def computed_arrays(out: Computed, num_rows: int, num_classes: int, feature_dim: int,
                    spatial_shape: tuple[int, ...] = ()) -> dict:
    """``compute()``'s result checked: ``{"logits": [b, C]}`` plus
    ``"features": [b, D]`` when ``feature_dim > 0`` and ``"spatial": [b, *spatial_shape]``
    (the area-pooled feature map ``(channels, grid, grid)``) when it is given,
    float32 and finite."""
    if spatial_shape:
        if not (isinstance(out, tuple) and len(out) == 3):
            raise CacheError("with spatial maps, compute() must return (logits [b, C], features [b, D] "
                             "or None, maps [b, channels, grid, grid])")
        arrays = computed_arrays(out[0] if not feature_dim else out[:2], num_rows, num_classes, feature_dim)
        arrays["spatial"] = _checked("spatial maps", out[2], (num_rows, *spatial_shape),
                                     "wrong channel count or grid?")
        return arrays
    if feature_dim > 0:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CacheError("with feature_dim > 0, compute() must return "
                             "(logits [b, C], features [b, D])")
        return {"logits": _checked("logits", out[0], (num_rows, num_classes), "wrong class count?"),
                "features": _checked("features", out[1], (num_rows, feature_dim), "wrong feature_dim?")}
    if isinstance(out, tuple):
        raise CacheError("compute() returned a tuple; pass feature_dim=D to "
                         "fill_cache to store teacher features")
    return {"logits": _checked("logits", out, (num_rows, num_classes), "wrong class count?")}


def fill_parts(path, key: CacheKey, layout: dict, num_views: int,
               view_batches: Callable[[int], Iterable[tuple[np.ndarray, Callable[[], Computed]]]],
               part_arrays: Callable[[np.ndarray, Computed], dict],
               progress: Optional[Callable[[int], None]] = None, rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] = lambda: None) -> Path:
    """Write (or resume writing) one atomic part file per batch under
    ``<path>.parts/`` and return that folder; every cache format fills
    through this. ``part_arrays(indices, compute())`` turns a batch into the
    arrays its part stores. Parts of another key or ``layout`` (or process
    count) are discarded. Under torchrun ``view_batches`` yields this rank's
    shard and ``barrier`` waits for every rank (module docstring); on return
    every rank's parts are on disk."""
    parts = Path(str(path) + ".parts")
    key_file, layout_file = parts / "key.json", parts / "layout.json"
    layout_json = json.dumps({**layout, "world_size": world_size} if world_size > 1 else layout,
                             sort_keys=True)
    if rank == 0:
        if parts.is_dir() and (not key_file.is_file() or key_file.read_text() != key.to_json()
                               or not layout_file.is_file() or layout_file.read_text() != layout_json):
            shutil.rmtree(parts)  # parts of another teacher/data/view config or layout: start over
        parts.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            atomic_write_bytes(key_file, lambda f: f.write(key.to_json().encode()))
        if not layout_file.is_file():
            atomic_write_bytes(layout_file, lambda f: f.write(layout_json.encode()))
    barrier()  # the part folder is ready (and fresh) before any rank writes into it
    for v in range(num_views):
        for b, (indices, compute) in enumerate(view_batches(v)):
            part = _part_path(parts, v, b, rank, world_size)
            if not part.is_file():
                idx = np.asarray(indices, dtype=np.int64)
                arrays = part_arrays(idx, compute())
                atomic_write_bytes(part, lambda f, idx=idx, arrays=arrays: np.savez(f, indices=idx, **arrays))
            if progress:
                progress(len(indices))
    barrier()  # every rank's parts are on disk
    return parts
