"""The teacher-target cache: raw logits, and optionally the pooled penultimate
embedding, per (sample, view) in HDF5.

Filled once from full-resolution views (view 0 = whole image, views
1..K-1 = the replayable crops of :mod:`pipelines.views`), so distillation
reads teacher targets instead of running the teacher. Raw logits are stored
(the temperature is applied at loss time). With ``feature_dim > 0`` the
teacher's pooled penultimate features (``forward_features``' embedding) are
stored beside them, because that is what the relational / contrastive losses
(RKD, CRD) compare in online mode; a cache without them cannot stand in for
the teacher there, and :meth:`LogitCache.require_features` says so instead of
letting the logits pass for an embedding. Both arrays are stored in the cache
dtype, and the measured float16 rounding error of each is recorded.

A cache records what its targets were derived from: the teacher weights hash,
the dataset manifest fingerprint and the view configuration (:class:`CacheKey`).
Opening a cache with a different key is an error, never a silently stale
target. Format 2 adds the optional ``features`` dataset; format 1 files
(logits only) still open, as caches without features.

Filling is resumable: each finished batch is written atomically as its own
part file under ``<path>.parts/``; a rerun after ``kill -9`` skips finished
parts and the final HDF5 is assembled from the parts (then renamed into
place), so its contents equal an uninterrupted fill. HDF5 itself is not
crash-safe, which is why partial progress does not live in it. Parts written
for another key or another layout (class count, feature dim, process count)
are discarded.

Under torchrun (``world_size > 1``) each rank computes the parts of its own
DistributedSampler shard of every view (named by rank, so no two ranks ever
write the same file); rank 0 alone prepares the part folder, assembles the
cache after a barrier and deletes the parts, while the others wait at the
final barrier. A sample in two shards (the sampler's padding) is written by
both ranks; assembly keeps the higher rank's row, from the same image. Every
format fills through :func:`fill_parts`, so this holds for each.

This dense format is the fast path for small datasets (CIFAR: tens of MB).
Past what fits in memory, :mod:`trainer.distill.topk_cache` stores the top-k
logits plus a tail summary, memory-mapped; :func:`ensure_dense_fits` refuses
to load (or fill) a dense cache that cannot fit, naming its size and that fix.
"""
from __future__ import annotations

import json
import os
import shutil
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import h5py
import numpy as np
import psutil
import torch

from dataset_tools.atomic import atomic_write_bytes
from dataset_tools.errors import CqkdError
from trainer.distill.cache_sizes import gb, topk_nbytes

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # 1: logits only

# compute() returns logits [b, C], or (logits [b, C], features [b, D]) when feature_dim > 0
Computed = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]


class CacheError(CqkdError, RuntimeError):
    pass


class CacheTooLargeError(CacheError):
    """A dense cache that cannot fit in memory (valid, but not loadable here)."""


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


# A dense cache is held whole in memory; it may take at most this share of the
# memory available when it is filled or opened, leaving the rest to the model,
# the optimizer and the loader workers.
DENSE_MEMORY_FRACTION = 0.5


def available_memory(device) -> tuple[int, int, str]:
    """``(available bytes, total bytes, name)`` of the host RAM or a CUDA device's memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return free, total, f"GPU memory on {dev}"
    vm = psutil.virtual_memory()
    return vm.available, vm.total, "RAM"


def ensure_dense_fits(path, logits_shape: tuple, itemsize: int, feature_dim: int, device,
                      action: str = "be loaded") -> None:
    """Raise :class:`CacheTooLargeError` naming the size and the fix when the dense
    cache ``[N, K, C]`` (+ features ``[N, K, D]``) would take more than
    :data:`DENSE_MEMORY_FRACTION` of the available host memory (always: it is
    read or assembled there) or of ``device``'s memory (when it is CUDA)."""
    n, k, c = (int(x) for x in logits_shape)
    need = n * k * (c + feature_dim) * itemsize
    places = ["cpu"] + ([device] if torch.device(device).type == "cuda" else [])
    for place in places:
        avail, total, name = available_memory(place)
        if need <= DENSE_MEMORY_FRACTION * avail:
            continue
        feats = f" (logits {gb(n * k * c * itemsize)} + features {gb(n * k * feature_dim * itemsize)})" \
            if feature_dim else ""
        dtype = "float16" if itemsize == 2 else "float32"
        raise CacheTooLargeError(
            f"{path}: dense cache is {gb(need)}{feats} for {n:,} samples x {k} views x {c} classes, "
            f"but this machine has {gb(avail)} of {name} available (of {gb(total)}); a dense cache is "
            f"held whole in memory and may take at most {DENSE_MEMORY_FRACTION:.0%} of it, so it "
            f"cannot {action} here. Use the compact format instead: python -m trainer cache "
            f"--config ... distill.cache_format=topk (top-32 logits + a tail summary: "
            f"{gb(topk_nbytes(n, k, min(32, max(1, c - 1)), dtype))}, memory-mapped and read per batch)")


class LogitCache:
    """A filled cache held in memory (on the training device when it fits)
    so lookups are one batched gather with no host synchronization."""

    def __init__(self, path: Path, key: CacheKey, logits: torch.Tensor, fp16_max_abs_error: float,
                 features: Optional[torch.Tensor] = None, features_fp16_max_abs_error: float = 0.0):
        self.path, self.key = path, key
        self.logits = logits  # [N, K, C]
        self.fp16_max_abs_error = fp16_max_abs_error
        self.features = features  # [N, K, D] or None
        self.features_fp16_max_abs_error = features_fp16_max_abs_error

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    @property
    def num_views(self) -> int:
        return self.logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]

    @property
    def feature_dim(self) -> int:
        return 0 if self.features is None else self.features.shape[2]

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
                version = int(f.attrs.get("format_version", -1))
                if version not in READABLE_FORMAT_VERSIONS:
                    raise CacheError(f"{path}: cache format {f.attrs.get('format_version')}, "
                                     f"expected one of {READABLE_FORMAT_VERSIONS}; refill it")
                key = CacheKey(**json.loads(f.attrs["key"]))
                has_features = version >= 2 and int(f.attrs.get("feature_dim", 0)) > 0
                ensure_dense_fits(path, f["logits"].shape, f["logits"].dtype.itemsize,
                                  f["features"].shape[-1] if has_features else 0, device)
                logits = torch.from_numpy(f["logits"][...])
                err = float(f.attrs["fp16_max_abs_error"])
                features, ferr = None, 0.0
                if has_features:
                    features = torch.from_numpy(f["features"][...])
                    ferr = float(f.attrs["features_fp16_max_abs_error"])
                    if features.shape[:2] != logits.shape[:2] or \
                            features.shape[2] != int(f.attrs["feature_dim"]):
                        raise CacheError(f"{path}: features {tuple(features.shape)} do not match "
                                         f"logits {tuple(logits.shape)} / feature_dim "
                                         f"{int(f.attrs['feature_dim'])}; delete it and refill")
        except OSError as e:
            raise CacheError(f"{path}: unreadable HDF5 cache ({e}); delete it and refill") from e
        if expected is not None and key != expected:
            diff = "; ".join(key.differences(expected))
            raise CacheError(f"{path}: logit cache is stale or for other data ({diff}); refill "
                             f"it with 'python -m trainer cache' or point to the matching cache")
        return cls(path, key, logits.to(device), err,
                   None if features is None else features.to(device), ferr)

    def to(self, device) -> "LogitCache":
        self.logits = self.logits.to(device)
        if self.features is not None:
            self.features = self.features.to(device)
        return self

    def require_features(self) -> "LogitCache":
        """Raise :class:`CacheError` unless the cache stores teacher embeddings."""
        if self.features is None:
            raise CacheError(f"{self.path}: logit cache has no teacher features (filled by an older "
                             f"version or without features), but RKD/CRD with cached targets need "
                             f"the teacher's penultimate embedding; delete {self.path} and re-run "
                             f"'python -m trainer cache --config ...' to refill it with features")
        return self

    def lookup(self, indices: torch.Tensor, view_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Float32 logits ``[B, C]`` of the given (sample, view) pairs. Dense
        rows are the teacher's logits, exact at every ``temperature`` (the
        argument exists for the compact format, whose rows depend on it)."""
        dev = self.logits.device
        return self.logits[indices.to(dev, non_blocking=True), view_ids.to(dev, non_blocking=True)].float()

    def lookup_features(self, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Float32 teacher embeddings ``[B, D]`` of the given (sample, view) pairs."""
        feats = self.require_features().features
        dev = feats.device
        return feats[indices.to(dev, non_blocking=True), view_ids.to(dev, non_blocking=True)].float()


def _part_path(parts: Path, view: int, batch: int, rank: int = 0, world_size: int = 1) -> Path:
    shard = f"-r{rank:04d}" if world_size > 1 else ""
    return parts / f"v{view:04d}{shard}-b{batch:07d}.npz"


def view_parts(parts: Path, view: int) -> list[Path]:
    """The part files of ``view``, every rank's, in assembly order (a higher
    rank's row of a padded sample overwrites a lower one's)."""
    return sorted(parts.glob(f"v{view:04d}-*.npz"))


def _checked(name: str, value, shape: tuple[int, int], hint: str) -> np.ndarray:
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


def computed_arrays(out: Computed, num_rows: int, num_classes: int, feature_dim: int) -> dict:
    """``compute()``'s result checked: ``{"logits": [b, C]}`` plus
    ``"features": [b, D]`` when ``feature_dim > 0``, float32 and finite."""
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


def fill_cache(path, key: CacheKey, num_samples: int, num_classes: int, num_views: int,
               view_batches: Callable[[int], Iterable[tuple[np.ndarray, Callable[[], Computed]]]],
               dtype: str = "float16", progress: Optional[Callable[[int], None]] = None,
               feature_dim: int = 0, rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] = lambda: None) -> Path:
    """Fill (or resume filling) the dense cache at ``path``.

    ``view_batches(v)`` yields, for view ``v``, ``(indices, compute)`` per batch
    in a deterministic order; ``compute()`` runs the teacher and returns float32
    logits ``[b, C]``, or with ``feature_dim > 0`` the tuple ``(logits [b, C],
    features [b, D])`` (the pooled penultimate embedding). It is only called for
    batches not already on disk. The whole cache is assembled in RAM, so
    :func:`ensure_dense_fits` checks the host first. Under torchrun see
    :func:`fill_parts`; rank 0 assembles while the others wait.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
    if feature_dim < 0:
        raise ValueError(f"feature_dim must be >= 0, got {feature_dim}")
    path = Path(path)
    itemsize = np.dtype(dtype).itemsize
    ensure_dense_fits(path, (num_samples, num_views, num_classes), itemsize, feature_dim, "cpu",
                      action="be assembled")
    parts = fill_parts(path, key, {"num_classes": num_classes, "feature_dim": feature_dim},
                       num_views, view_batches,
                       lambda idx, out: computed_arrays(out, len(idx), num_classes, feature_dim),
                       progress, rank, world_size, barrier)
    if rank != 0:
        barrier()  # rank 0 assembles
        return path

    # Assemble directly in the cache dtype (no float32 copy of the whole cache).
    np_dtype = np.float16 if dtype == "float16" else np.float32
    logits = np.zeros((num_samples, num_views, num_classes), dtype=np_dtype)
    features = np.zeros((num_samples, num_views, feature_dim), dtype=np_dtype) if feature_dim else None
    filled = np.zeros((num_samples, num_views), dtype=bool)
    err = {"logits": 0.0, "features": 0.0}
    for v in range(num_views):
        for part in view_parts(parts, v):
            with np.load(part, allow_pickle=False) as z:
                idx = z["indices"]
                for name, dest in (("logits", logits), ("features", features)):
                    if dest is None:
                        continue
                    stored, e = to_cache_dtype(z[name], dtype, name)
                    dest[idx, v] = stored
                    err[name] = max(err[name], e)
                filled[idx, v] = True
    if not filled.all():
        missing = int((~filled).sum())
        raise CacheError(f"{parts}: {missing} (sample, view) rows were never filled; the loader "
                         f"must visit every sample once per view, across the ranks under torchrun "
                         f"(drop_last=False)")

    def write(f):
        with h5py.File(f, "w") as h:
            h.create_dataset("logits", data=logits, chunks=(min(1024, num_samples), num_views, num_classes))
            if features is not None:
                h.create_dataset("features", data=features,
                                 chunks=(min(1024, num_samples), num_views, feature_dim))
            h.attrs["format_version"] = FORMAT_VERSION
            h.attrs["key"] = key.to_json()
            h.attrs["fp16_max_abs_error"] = err["logits"]
            h.attrs["feature_dim"] = feature_dim
            h.attrs["features_fp16_max_abs_error"] = err["features"]
            h.attrs["dtype"] = dtype

    atomic_write_bytes(path, write)
    shutil.rmtree(parts)
    barrier()
    return path


def cache_exists(path) -> bool:
    return Path(path).is_file()


def remove_cache(path) -> None:
    for p in (Path(path), Path(str(path) + ".parts")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            os.unlink(p)
