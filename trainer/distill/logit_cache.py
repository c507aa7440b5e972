"""The dense teacher-target cache: raw logits, and optionally the pooled
penultimate embedding and the area-pooled last feature map, per (sample,
view) in HDF5.

Filled once from full-resolution views (view 0 = whole image, views
1..K-1 = the replayable crops of :mod:`pipelines.views`), so distillation
reads teacher targets instead of running the teacher. Raw logits are stored
(the temperature is applied at loss time). With ``feature_dim > 0`` the
teacher's pooled penultimate features (``forward_features``' embedding) are
stored beside them, because that is what the relational / contrastive losses
(RKD, CRD) compare in online mode; a cache without them cannot stand in for
the teacher there, and :meth:`LogitCache.require_features` says so instead of
letting the logits pass for an embedding. With ``spatial_grid > 0`` the
teacher's last feature map (:meth:`trainer.models.base.DistillModel.features_map`),
area-pooled to ``grid x grid`` cells, is stored as ``spatial`` [N, K, channels,
grid, grid], so a CutMix target can be composed from the two source views'
maps (:mod:`trainer.distill.spatial`); :meth:`LogitCache.require_spatial`
refuses a cache without them. Every array is stored in the cache dtype, and
the measured float16 rounding error of each is recorded.

A cache records what its targets were derived from: the teacher weights hash,
the dataset manifest fingerprint and the view configuration
(:class:`~trainer.distill.cache_parts.CacheKey`). Opening a cache with a
different key is an error, never a silently stale target. What it stores is
its layout (file attributes ``feature_dim``, ``spatial_grid``,
``spatial_channels``; the part files' layout, so parts of another layout are
discarded). Format 3 adds the optional ``spatial`` dataset, format 2 the
optional ``features``; format 1 and 2 files still open, without them.

Filling goes through the resumable, torchrun-sharded part files of
:func:`trainer.distill.cache_parts.fill_parts`; the final HDF5 is assembled
from the parts by rank 0 (then renamed into place). HDF5 itself is not
crash-safe, which is why partial progress does not live in it.

This dense format is the fast path for small datasets (CIFAR: tens of MB).
Past what fits in memory, :mod:`trainer.distill.topk_cache` stores the top-k
logits plus a tail summary, memory-mapped; :func:`ensure_dense_fits` refuses
to load (or fill) a dense cache that cannot fit, naming its size and that fix.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import h5py
import numpy as np
import psutil
import torch

from dataset_tools.atomic import atomic_write_bytes
from trainer.distill.cache_parts import (CacheError, CacheKey, Computed, computed_arrays, fill_parts,
                                         to_cache_dtype, view_parts)
from trainer.distill.cache_sizes import gb, topk_nbytes

__all__ = ["CacheError", "CacheKey", "CacheTooLargeError", "LogitCache", "ensure_dense_fits", "fill_cache"]

FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)  # 1: logits only; 2: + features; 3: + spatial maps


class CacheTooLargeError(CacheError):
    """A dense cache that cannot fit in memory (valid, but not loadable here)."""


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
                      action: str = "be loaded", spatial_values: int = 0) -> None:
    """Raise :class:`CacheTooLargeError` naming the size and the fix when the dense
    cache ``[N, K, C]`` (+ features ``[N, K, D]``, + ``spatial_values`` map
    values per row) would take more than :data:`DENSE_MEMORY_FRACTION` of the
    available host memory (always: it is read or assembled there) or of
    ``device``'s memory (when it is CUDA)."""
    n, k, c = (int(x) for x in logits_shape)
    need = n * k * (c + feature_dim + spatial_values) * itemsize
    places = ["cpu"] + ([device] if torch.device(device).type == "cuda" else [])
    for place in places:
        avail, total, name = available_memory(place)
        if need <= DENSE_MEMORY_FRACTION * avail:
            continue
        extra = [f"features {gb(n * k * feature_dim * itemsize)}"] if feature_dim else []
        extra += [f"spatial maps {gb(n * k * spatial_values * itemsize)}"] if spatial_values else []
        sizes = f" (logits {gb(n * k * c * itemsize)} + {' + '.join(extra)})" if extra else ""
        dtype = "float16" if itemsize == 2 else "float32"
        no_maps = (" Or leave the spatial maps out: distill.cache_spatial=never (CutMix targets then "
                   "mix cached logits).") if spatial_values else ""
        raise CacheTooLargeError(
            f"{path}: dense cache is {gb(need)}{sizes} for {n:,} samples x {k} views x {c} classes, "
            f"but this machine has {gb(avail)} of {name} available (of {gb(total)}); a dense cache is "
            f"held whole in memory and may take at most {DENSE_MEMORY_FRACTION:.0%} of it, so it "
            f"cannot {action} here. Use the compact format instead: python -m trainer cache "
            f"--config ... distill.cache_format=topk (top-32 logits + a tail summary: "
            f"{gb(topk_nbytes(n, k, min(32, max(1, c - 1)), dtype))}, memory-mapped and read per "
            f"batch).{no_maps}")


def _rows(table: torch.Tensor, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
    """``table[indices, view_ids]`` as one ``index_select`` of the flattened
    (sample, view) rows: 1.5x faster than two-tensor advanced indexing on
    the CPU for the spatial maps, which are gathered every CutMix step. The
    view ids are below ``table.shape[1]`` by the cache key (its view contract
    holds ``num_views``); a sample index out of range still raises."""
    dev = table.device
    rows = indices.to(dev, non_blocking=True) * table.shape[1] + view_ids.to(dev, non_blocking=True)
    return table.flatten(0, 1).index_select(0, rows).float()


class LogitCache:
    """A filled cache held in memory (on the training device when it fits)
    so lookups are one batched gather with no host synchronization."""

    def __init__(self, path: Path, key: CacheKey, logits: torch.Tensor, fp16_max_abs_error: float,
                 features: Optional[torch.Tensor] = None, features_fp16_max_abs_error: float = 0.0,
                 spatial: Optional[torch.Tensor] = None, spatial_fp16_max_abs_error: float = 0.0):
        self.path, self.key = path, key
        self.logits = logits  # [N, K, C]
        self.fp16_max_abs_error = fp16_max_abs_error
        self.features = features  # [N, K, D] or None
        self.features_fp16_max_abs_error = features_fp16_max_abs_error
        self.spatial = spatial  # [N, K, channels, grid, grid] or None
        self.spatial_fp16_max_abs_error = spatial_fp16_max_abs_error

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

    @property
    def spatial_grid(self) -> int:
        """Cells per side of the stored maps; 0 when the cache has none."""
        return 0 if self.spatial is None else self.spatial.shape[-1]

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
                grid = int(f.attrs.get("spatial_grid", 0)) if version >= 3 else 0
                spatial_values = int(np.prod(f["spatial"].shape[2:])) if grid else 0
                ensure_dense_fits(path, f["logits"].shape, f["logits"].dtype.itemsize,
                                  f["features"].shape[-1] if has_features else 0, device,
                                  spatial_values=spatial_values)
                logits = torch.from_numpy(f["logits"][...])
                err = float(f.attrs["fp16_max_abs_error"])
                features, ferr, spatial, serr = None, 0.0, None, 0.0
                if has_features:
                    features = torch.from_numpy(f["features"][...])
                    ferr = float(f.attrs["features_fp16_max_abs_error"])
                    if features.shape[:2] != logits.shape[:2] or \
                            features.shape[2] != int(f.attrs["feature_dim"]):
                        raise CacheError(f"{path}: features {tuple(features.shape)} do not match "
                                         f"logits {tuple(logits.shape)} / feature_dim "
                                         f"{int(f.attrs['feature_dim'])}; delete it and refill")
                if grid:
                    spatial = torch.from_numpy(f["spatial"][...])
                    serr = float(f.attrs["spatial_fp16_max_abs_error"])
                    want = (*logits.shape[:2], int(f.attrs["spatial_channels"]), grid, grid)
                    if tuple(spatial.shape) != want:
                        raise CacheError(f"{path}: spatial maps {tuple(spatial.shape)}, expected {want} "
                                         f"from the logits and the spatial_channels / spatial_grid "
                                         f"attributes; delete it and refill")
        except OSError as e:
            raise CacheError(f"{path}: unreadable HDF5 cache ({e}); delete it and refill") from e
        if expected is not None and key != expected:
            diff = "; ".join(key.differences(expected))
            raise CacheError(f"{path}: logit cache is stale or for other data ({diff}); refill "
                             f"it with 'python -m trainer cache' or point to the matching cache")
        move = (lambda t: None if t is None else t.to(device))
        return cls(path, key, logits.to(device), err, move(features), ferr, move(spatial), serr)

    def to(self, device) -> "LogitCache":
        self.logits = self.logits.to(device)
        if self.features is not None:
            self.features = self.features.to(device)
        if self.spatial is not None:
            self.spatial = self.spatial.to(device)
        return self

    def require_features(self) -> "LogitCache":
        """Raise :class:`CacheError` unless the cache stores teacher embeddings."""
        if self.features is None:
            raise CacheError(f"{self.path}: logit cache has no teacher features (filled by an older "
                             f"version or without features), but RKD/CRD with cached targets need "
                             f"the teacher's penultimate embedding; delete {self.path} and re-run "
                             f"'python -m trainer cache --config ...' to refill it with features")
        return self

    def require_spatial(self) -> "LogitCache":
        """Raise :class:`CacheError` unless the cache stores spatial maps."""
        if self.spatial is None:
            raise CacheError(f"{self.path}: teacher cache has no spatial maps (filled by an older "
                             f"version, with distill.cache_spatial=never, or auto found them too large "
                             f"or the teacher without a feature map), but distill.cached_mix=spatial "
                             f"composes CutMix targets from them; delete {self.path} and re-run "
                             f"'python -m trainer cache --config ... distill.cache_spatial=always', or "
                             f"train with distill.cached_mix=auto (logits where there are no maps)")
        return self

    def lookup(self, indices: torch.Tensor, view_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Float32 logits ``[B, C]`` of the given (sample, view) pairs. Dense
        rows are the teacher's logits, exact at every ``temperature`` (the
        argument exists for the compact format, whose rows depend on it)."""
        return _rows(self.logits, indices, view_ids)

    def lookup_features(self, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Float32 teacher embeddings ``[B, D]`` of the given (sample, view) pairs."""
        return _rows(self.require_features().features, indices, view_ids)

    def lookup_spatial(self, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Float32 area-pooled teacher maps ``[B, channels, grid, grid]`` of the given pairs."""
        return _rows(self.require_spatial().spatial, indices, view_ids)


def fill_cache(path, key: CacheKey, num_samples: int, num_classes: int, num_views: int,
               view_batches: Callable[[int], Iterable[tuple[np.ndarray, Callable[[], Computed]]]],
               dtype: str = "float16", progress: Optional[Callable[[int], None]] = None,
               feature_dim: int = 0, rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] = lambda: None, spatial_channels: int = 0,
               spatial_grid: int = 0) -> Path:
    """Fill (or resume filling) the dense cache at ``path``.

    ``view_batches(v)`` yields, for view ``v``, ``(indices, compute)`` per batch
    in a deterministic order; ``compute()`` runs the teacher and returns float32
    logits ``[b, C]``, or with ``feature_dim > 0`` the tuple ``(logits [b, C],
    features [b, D])`` (the pooled penultimate embedding), or with
    ``spatial_grid > 0`` the triple ``(logits, features or None, maps [b,
    spatial_channels, grid, grid])`` (the last feature map, area-pooled). It is
    only called for batches not already on disk. The whole cache is assembled
    in RAM, so :func:`ensure_dense_fits` checks the host first. Under torchrun
    see :func:`~trainer.distill.cache_parts.fill_parts`; rank 0 assembles
    while the others wait.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
    if feature_dim < 0 or spatial_grid < 0 or spatial_channels < 0:
        raise ValueError(f"feature_dim, spatial_channels and spatial_grid must be >= 0, got "
                         f"{feature_dim}, {spatial_channels}, {spatial_grid}")
    if bool(spatial_grid) != bool(spatial_channels):
        raise ValueError(f"spatial maps need both spatial_channels and spatial_grid > 0, got "
                         f"{spatial_channels} and {spatial_grid}")
    path = Path(path)
    itemsize = np.dtype(dtype).itemsize
    spatial_shape = (spatial_channels, spatial_grid, spatial_grid) if spatial_grid else ()
    ensure_dense_fits(path, (num_samples, num_views, num_classes), itemsize, feature_dim, "cpu",
                      action="be assembled", spatial_values=int(np.prod(spatial_shape or (0,))))
    layout = {"num_classes": num_classes, "feature_dim": feature_dim}
    if spatial_grid:  # caches without maps keep the layout (and the parts) of format 2
        layout.update(spatial_channels=spatial_channels, spatial_grid=spatial_grid)
    parts = fill_parts(path, key, layout, num_views, view_batches,
                       lambda idx, out: computed_arrays(out, len(idx), num_classes, feature_dim,
                                                        spatial_shape),
                       progress, rank, world_size, barrier)
    if rank != 0:
        barrier()  # rank 0 assembles
        return path

    # Assemble directly in the cache dtype (no float32 copy of the whole cache).
    np_dtype = np.float16 if dtype == "float16" else np.float32
    arrays = {"logits": np.zeros((num_samples, num_views, num_classes), dtype=np_dtype)}
    if feature_dim:
        arrays["features"] = np.zeros((num_samples, num_views, feature_dim), dtype=np_dtype)
    if spatial_grid:
        arrays["spatial"] = np.zeros((num_samples, num_views, *spatial_shape), dtype=np_dtype)
    filled = np.zeros((num_samples, num_views), dtype=bool)
    err = dict.fromkeys(arrays, 0.0)
    for v in range(num_views):
        for part in view_parts(parts, v):
            with np.load(part, allow_pickle=False) as z:
                idx = z["indices"]
                for name, dest in arrays.items():
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
            for name, arr in arrays.items():
                h.create_dataset(name, data=arr, chunks=(min(1024, num_samples), num_views, *arr.shape[2:]))
            h.attrs["format_version"] = FORMAT_VERSION
            h.attrs["key"] = key.to_json()
            h.attrs["fp16_max_abs_error"] = err["logits"]
            h.attrs["feature_dim"] = feature_dim
            h.attrs["features_fp16_max_abs_error"] = err.get("features", 0.0)
            h.attrs["spatial_grid"] = spatial_grid
            h.attrs["spatial_channels"] = spatial_channels
            h.attrs["spatial_fp16_max_abs_error"] = err.get("spatial", 0.0)
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
