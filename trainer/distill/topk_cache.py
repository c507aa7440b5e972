"""The compact teacher cache for large datasets: per (sample, view) row the
top-k logits (cache dtype) with their class ids (uint16) and a float32
summary of the other m = C - k logits (the tail), memory-mapped from raw
``.npy`` files and read per batch; nothing is loaded whole into RAM or onto
the device. The dense ImageNet-1k cache (1,281,167 x 8 views x 1,000
classes) is 20.5 GB in float16; this format with k = 32 is 1.43 GB (140
bytes a row, :mod:`trainer.distill.cache_sizes`).

The temperature stays a loss-time choice: ``lookup(indices, views, T)``
returns logits ``z~ [B, C]`` whose ``softmax(z~ / T)`` is the reconstructed
teacher distribution at T, a proper distribution over all C classes:

* the top-k classes keep their logits, so their probabilities relative to
  each other are exact (up to the dtype) at every T;
* the tail's total mass at T, ``S_T = sum_tail exp(z_j / T)``, comes from
  three stored numbers: the tail's mean ``mu``, its log-sum-exp at T = 1
  ``F1`` and its max ``M``. ``f(b) = log sum_tail exp(b z_j)`` (b = 1/T) is
  convex with ``f(0) = log m``, ``f'(0) = mu``, ``f(1) = F1`` and ``f' <= M``,
  which bounds it (the chord, the tangents with slopes mu and M). For
  T >= 1 the estimate is the quadratic ``log m + b mu + c b^2`` with
  ``c = F1 - log m - mu`` (exact at T = 1, as T -> inf, and at every T for a
  Gaussian tail), clamped into the bounds; for T < 1, beyond the stored
  point, where the few largest tail logits dominate, it is the bounds'
  midpoint. :func:`tail_log_mass` returns the estimate with the bounds, so
  ``|log S^_T - log S_T| <= upper - lower`` for every row (at most half of
  it for T < 1). Below T = 1 the error grows, but the tail then holds little
  of the mass;
* that mass is spread evenly over the m tail classes (which of them hold
  more of it is not stored).

Error: with P the true tail mass at T, d = log(S^_T / S_T) and r the true
distribution within the tail,
``KL(dense || compact) = log(1 - P + P e^d) - P d + P (log m - H(r))``:
the mass error enters only at second order (about P (1 - P) d^2 / 2); the
even spread costs ``P * KL(r || uniform) <= P log m``, which grows with T as
the tail gains mass. Each fill records the mean and max KL at T = 1 and 4 over
its own rows (``meta.json``); ``benchmarks/cache_scale.py`` measures the
error at the ImageNet shape.

Teacher embeddings (RKD / CRD) are stored, only when asked for
(``distill.cache_features``), as a memory-mapped ``features.npy`` [K, N, D]
in the cache dtype (exact up to it), read per batch. At ImageNet scale a
2048-d float16 embedding per view is 42 GB on disk, so a fill states the
sizes up front and checks the free disk space first
(:func:`trainer.distill.teacher_cache.plan_fill`).

The cache is a directory: ``rows.npy`` [K, N] of records ``(values [k],
classes [k], tail [3])``, so a lookup reads one place per row;
``features.npy`` (optional); ``meta.json`` (format, key, sizes, measured
errors). It is assembled in a staging directory and swapped in whole
(:class:`dataset_tools.atomic.Staging`). Filling uses the dense cache's
resumable part files (:func:`trainer.distill.cache_parts.fill_parts`), each
already reduced to compact rows, so the parts are no larger than the cache.
"""
from __future__ import annotations

import json
import math
import mmap
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dataset_tools.atomic import Staging, fsync_path, write_json_atomic
from trainer.distill.cache_sizes import TAIL_FIELDS
from trainer.distill.cache_parts import (CacheError, CacheKey, Computed, computed_arrays, fill_parts, view_parts,
                                         to_cache_dtype)

FORMAT = "topk"
FORMAT_VERSION = 1
KL_TEMPERATURES = (1.0, 4.0)  # the reconstruction error each fill records
MAX_CLASSES = 2 ** 16  # class ids are uint16
_VALUE_DTYPES = {"float16": "<f2", "float32": "<f4"}


def record_dtype(topk: int, dtype: str) -> np.dtype:
    """One row of ``rows.npy``: ``values [k]`` (cache dtype), ``classes [k]``
    (uint16), ``tail [3]`` (float32: mean, log-sum-exp at T = 1, max)."""
    return np.dtype([("values", _VALUE_DTYPES[dtype], (topk,)), ("classes", "<u2", (topk,)),
                     ("tail", "<f4", (len(TAIL_FIELDS),))])


# ---------------------------------------------------------------- the rows
def summarize_rows(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits ``[b, C]`` -> the top-k logits (descending), their class
    ids and the tail summary ``[b, 3]`` (mean, log-sum-exp, max of the rest).
    Written for few passes over ``[b, C]``: a fill reduces every teacher batch."""
    z = logits.float()
    top, ids = torch.topk(z, topk + 1, dim=1)  # the (k+1)-th largest is the tail's max
    values, classes, tail_max = top[:, :topk], ids[:, :topk], top[:, topk]
    mean = (z.sum(1) - values.sum(1)) / (z.shape[1] - topk)
    e = (z - tail_max[:, None]).exp_().scatter_(1, classes, 0.0)
    lse = tail_max + e.sum(1).log()
    return values, classes, torch.stack([mean, lse, tail_max], 1)


def tail_log_mass(tail: torch.Tensor, num_tail: int, temperature: float):
    """``(estimate, lower, upper)`` of ``log sum_tail exp(z_j / T)`` per row
    from the summary ``tail [B, 3]`` (see the module doc); the true value
    lies in ``[lower, upper]`` for every row."""
    b = 1.0 / float(temperature)
    mu, f1, mx = tail.double().unbind(-1)
    f0 = math.log(num_tail)
    lower = torch.maximum(f0 + b * mu, b * mx)  # tangent at 0; the largest term alone
    if b <= 1:
        lower = torch.maximum(lower, f1 - (1 - b) * mx)  # tangent at 1, slope <= M
        upper = torch.minimum((1 - b) * f0 + b * f1, f0 + b * mx)  # chord
        quad = f0 + b * mu + (f1 - f0 - mu).clamp_min(0) * b * b
        est = torch.maximum(torch.minimum(quad, upper), lower)
    else:
        lower = torch.maximum(lower, f1 + (b - 1) * mu)  # tangent at 1, slope >= mu
        upper = torch.minimum(f1 + (b - 1) * mx, f0 + b * mx)
        est = torch.maximum((lower + upper) / 2, lower)  # extrapolating: the minimax choice
    return est.float(), lower.float(), upper.float()


def reconstruct_logits(values: torch.Tensor, classes: torch.Tensor, tail: torch.Tensor,
                       num_classes: int, temperature: float) -> torch.Tensor:
    """Logits ``[B, C]`` whose softmax at ``temperature`` is the reconstructed
    distribution: the top-k logits in place, every tail class at the logit
    that gives it an even share of the estimated tail mass at that T."""
    num_tail = num_classes - values.shape[1]
    est, _, _ = tail_log_mass(tail, num_tail, temperature)
    fill = float(temperature) * (est - math.log(num_tail))
    out = fill.unsqueeze(1).expand(-1, num_classes).contiguous()
    return out.scatter_(1, classes.long(), values.float())


def reconstruction_kl(logits: torch.Tensor, approx: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row ``KL(softmax(logits / T) || softmax(approx / T))``."""
    log_p = F.log_softmax(logits.float() / temperature, 1)
    log_q = F.log_softmax(approx.float() / temperature, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def fill_time_kl(logits: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, classes: torch.Tensor,
                 tail: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`reconstruction_kl` of the rows a fill stores (``kept``: the top-k
    logits in the cache dtype) without building the reconstruction: with
    ``LZ`` / ``LQ`` the log-normalisers of the dense and the compact logits at T,
    ``KL = sum_top p_i (z_i - kept_i) / T + sum_tail p_j z_j / T
    - P (est - log m) + LQ - LZ`` (P: the dense tail mass; est: the estimated
    tail log-mass). Half the passes over ``[b, C]`` of the direct way, which
    matters when the fill runs at the teacher's pace."""
    t, num_tail = float(temperature), logits.shape[1] - values.shape[1]
    top = values[:, 0].double() / t  # the row max
    y = (logits.float() / t).sub_(values[:, :1].float() / t)  # z / T - max
    e = y.exp()
    lz = top + e.sum(1).double().log()
    e.scatter_(1, classes, 0.0)
    tail_sum = e.sum(1).double()
    tail_y = torch.bmm(e.unsqueeze(1), y.unsqueeze(2)).view(-1).double()  # sum_tail e_j y_j
    p_tail = (top + tail_sum.log() - lz).exp()
    tail_z = tail_y / tail_sum.clamp_min(1e-300) + top  # the tail's mean of z / T under p
    est = tail_log_mass(tail, num_tail, t)[0].double()
    p_top = (values.double() / t - lz[:, None]).exp()
    shift = (p_top * (values.double() - kept.double()) / t).sum(1)
    lq = torch.logsumexp(torch.cat([kept.double() / t, est[:, None]], 1), 1)
    kl = shift + p_tail * (tail_z - est + math.log(num_tail)) + lq - lz
    return kl.clamp_min(0.0).float()


# ---------------------------------------------------------------- filling
def _part_arrays(idx, out: Computed, num_classes: int, feature_dim: int, topk: int, dtype: str) -> dict:
    arrays = computed_arrays(out, len(idx), num_classes, feature_dim)
    z = torch.from_numpy(arrays["logits"])
    values, classes, tail = summarize_rows(z, topk)
    stored, err = to_cache_dtype(values.numpy(), dtype, "logits")
    kept = torch.from_numpy(stored)  # what the cache will hold, so the rounding counts too
    kl = [fill_time_kl(z, values, kept, classes, tail, t) for t in KL_TEMPERATURES]
    part = {"values": stored, "classes": classes.numpy().astype(np.uint16), "tail": tail.numpy(),
            "values_err": np.float64(err), "kl_sum": np.array([k.double().sum().item() for k in kl]),
            "kl_max": np.array([k.max().item() for k in kl])}
    if feature_dim:
        part["features"], part["features_err"] = to_cache_dtype(arrays["features"], dtype, "features")
    return part


def fill_topk_cache(path, key: CacheKey, num_samples: int, num_classes: int, num_views: int,
                    view_batches: Callable[[int], Iterable[tuple[np.ndarray, Callable[[], Computed]]]],
                    topk: int = 32, dtype: str = "float16",
                    progress: Optional[Callable[[int], None]] = None, feature_dim: int = 0,
                    rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None) -> Path:
    """Fill (or resume filling) the top-k cache directory at ``path``; the
    ``view_batches`` contract is :func:`trainer.distill.logit_cache.fill_cache`'s
    (``compute()`` returns the teacher's full float32 logits), and so is
    torchrun's (each rank its shard's parts, rank 0 assembles)."""
    if dtype not in _VALUE_DTYPES:
        raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
    if not 1 <= topk < num_classes:
        raise CacheError(f"distill.cache_topk={topk} must be in [1, {num_classes - 1}] for "
                         f"{num_classes} classes; with fewer classes use distill.cache_format=dense")
    if num_classes > MAX_CLASSES:
        raise CacheError(f"the top-k cache stores class ids as uint16: at most {MAX_CLASSES} "
                         f"classes, got {num_classes}")
    path = Path(path)
    layout = {"format": FORMAT, "topk": topk, "dtype": dtype, "num_classes": num_classes,
              "feature_dim": feature_dim}
    parts = fill_parts(path, key, layout, num_views, view_batches,
                       lambda idx, out: _part_arrays(idx, out, num_classes, feature_dim, topk, dtype),
                       progress, rank, world_size, barrier)
    if rank == 0:
        _assemble(path, parts, key, num_samples, num_views, layout)
        shutil.rmtree(parts)
    barrier()  # rank 0 assembled
    return path


def _assemble(path: Path, parts: Path, key: CacheKey, num_samples: int, num_views: int, layout: dict):
    topk, dtype, feature_dim = layout["topk"], layout["dtype"], layout["feature_dim"]
    rec = record_dtype(topk, dtype)
    with Staging(path) as st:
        rows = np.lib.format.open_memmap(st.path / "rows.npy", mode="w+", dtype=rec,
                                         shape=(num_views, num_samples))
        feats = np.lib.format.open_memmap(st.path / "features.npy", mode="w+", dtype=_VALUE_DTYPES[dtype],
                                          shape=(num_views, num_samples, feature_dim)) if feature_dim else None
        filled = np.zeros((num_views, num_samples), dtype=bool)
        err = {"values": 0.0, "features": 0.0}
        kl_sum, kl_max = np.zeros(len(KL_TEMPERATURES)), np.zeros(len(KL_TEMPERATURES))
        for v in range(num_views):
            for part in view_parts(parts, v):
                with np.load(part, allow_pickle=False) as z:
                    idx = z["indices"]
                    block = np.empty(len(idx), dtype=rec)
                    for name in ("values", "classes", "tail"):
                        block[name] = z[name]
                    rows[v, idx] = block
                    if feats is not None:
                        feats[v, idx] = z["features"]
                        err["features"] = max(err["features"], float(z["features_err"]))
                    err["values"] = max(err["values"], float(z["values_err"]))
                    kl_sum += z["kl_sum"]
                    kl_max = np.maximum(kl_max, z["kl_max"])
                    filled[v, idx] = True
        if not filled.all():
            raise CacheError(f"{parts}: {int((~filled).sum())} (sample, view) rows were never filled; "
                             f"the loader must visit every sample once per view (drop_last=False, "
                             f"no sharding)")
        for arr in (rows, feats):
            if arr is not None:
                arr.flush()
        del rows, feats
        for name in ("rows.npy", "features.npy"):
            if (st.path / name).exists():
                fsync_path(st.path / name)
        n_rows = num_samples * num_views
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": json.loads(key.to_json()),
                "num_samples": num_samples, "num_views": num_views, **layout,
                "tail_summary": list(TAIL_FIELDS), "fp16_max_abs_error": err["values"],
                "features_fp16_max_abs_error": err["features"],
                "reconstruction_kl": {f"T{t:g}": {"mean": kl_sum[i] / n_rows, "max": kl_max[i]}
                                      for i, t in enumerate(KL_TEMPERATURES)}}
        write_json_atomic(st.path / "meta.json", meta)
        st.commit()


# ---------------------------------------------------------------- reading
def _advise_random(arr) -> None:
    """Random rows: no read-ahead of neighbouring pages nobody asked for."""
    mm = getattr(arr, "_mmap", None)  # numpy's memmap keeps its mmap here
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass


def _gather(arr: np.ndarray, view_ids: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``arr[view_ids, indices]`` from a memory map [K, N, ...], read in file
    order (sorted) and returned in the batch's order."""
    k, n = arr.shape[:2]
    flat = view_ids.astype(np.int64) * n + indices.astype(np.int64)
    if flat.size and (indices.min() < 0 or indices.max() >= n or view_ids.min() < 0 or view_ids.max() >= k):
        raise IndexError(f"cache rows out of range: samples must be in [0, {n}), views in [0, {k})")
    order = np.argsort(flat, kind="stable")
    got = arr.reshape(k * n, *arr.shape[2:])[flat[order]]
    out = np.empty_like(got)
    out[order] = got
    return out


class TopKCache:
    """A filled top-k cache, memory-mapped; lookups return float32 tensors on ``device``."""

    def __init__(self, path: Path, key: CacheKey, meta: dict, rows: np.ndarray,
                 features: Optional[np.ndarray], device="cpu"):
        self.path, self.key, self.meta = path, key, meta
        self.rows, self.features = rows, features
        self.device = torch.device(device)
        self.topk = int(meta["topk"])
        self.fp16_max_abs_error = float(meta["fp16_max_abs_error"])
        self.features_fp16_max_abs_error = float(meta["features_fp16_max_abs_error"])

    num_samples = property(lambda self: int(self.meta["num_samples"]))
    num_views = property(lambda self: int(self.meta["num_views"]))
    num_classes = property(lambda self: int(self.meta["num_classes"]))
    feature_dim = property(lambda self: int(self.meta["feature_dim"]))
    spatial_grid = 0  # this format stores no spatial maps (trainer.distill.teacher_cache.stores_spatial)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + (0 if self.features is None else self.features.nbytes)

    @classmethod
    def open(cls, path, expected: Optional[CacheKey] = None, device="cpu") -> "TopKCache":
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            hint = " (an unfinished fill: rerun 'python -m trainer cache' to resume)" if \
                Path(str(path) + ".parts").is_dir() else ""
            raise CacheError(f"{path}: top-k teacher cache not found{hint}; fill it with "
                             f"'python -m trainer cache --config ... distill.cache_format=topk'")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{meta_file}: unreadable ({e}); delete {path} and refill") from e
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{meta_file}: format {meta.get('format')!r} version "
                             f"{meta.get('format_version')!r}, expected {FORMAT!r} version "
                             f"{FORMAT_VERSION}; delete {path} and refill")
        key = CacheKey(**meta["key"])
        if expected is not None and key != expected:
            diff = "; ".join(key.differences(expected))
            raise CacheError(f"{path}: teacher cache is stale or for other data ({diff}); refill "
                             f"it with 'python -m trainer cache' or point to the matching cache")
        k, n = int(meta["num_views"]), int(meta["num_samples"])
        rows = np.load(path / "rows.npy", mmap_mode="r", allow_pickle=False)
        if rows.shape != (k, n) or rows.dtype != record_dtype(int(meta["topk"]), meta["dtype"]):
            raise CacheError(f"{path}/rows.npy: {rows.shape} {rows.dtype} does not match meta.json "
                             f"({k} views x {n} samples, top-{meta['topk']} {meta['dtype']}); "
                             f"delete {path} and refill")
        features = None
        if int(meta["feature_dim"]) > 0:
            features = np.load(path / "features.npy", mmap_mode="r", allow_pickle=False)
            if features.shape != (k, n, int(meta["feature_dim"])):
                raise CacheError(f"{path}/features.npy: shape {features.shape}, expected "
                                 f"{(k, n, int(meta['feature_dim']))}; delete {path} and refill")
        for arr in (rows, features):
            if arr is not None:
                _advise_random(arr)
        return cls(path, key, meta, rows, features, device)

    def to(self, device) -> "TopKCache":
        self.device = torch.device(device)  # the rows stay on disk; lookups land here
        return self

    def require_features(self) -> "TopKCache":
        """Raise :class:`CacheError` unless the cache stores teacher embeddings."""
        if self.features is None:
            raise CacheError(f"{self.path}: top-k teacher cache was filled without teacher "
                             f"features, but RKD/CRD with cached targets need the teacher's "
                             f"penultimate embedding; delete {self.path} and re-run 'python -m "
                             f"trainer cache --config ... distill.cache_features=always' (or use "
                             f"distill.targets=online)")
        return self

    def require_spatial(self) -> "TopKCache":
        """Always raises: the top-k format stores no spatial maps."""
        raise CacheError(f"{self.path}: a top-k teacher cache stores no spatial maps (at its scale "
                         f"they would dwarf the logits), but distill.cached_mix=spatial composes CutMix "
                         f"targets from them; train with distill.cached_mix=auto or logits, or use a "
                         f"dense cache (distill.cache_format=dense) if it fits")

    def rows_at(self, indices: torch.Tensor, view_ids: torch.Tensor):
        """``(values [B, k] float32, classes [B, k] int64, tail [B, 3] float32)`` on the CPU."""
        got = _gather(self.rows, view_ids.cpu().numpy(), indices.cpu().numpy())
        return (torch.from_numpy(got["values"].astype(np.float32)),
                torch.from_numpy(got["classes"].astype(np.int64)), torch.from_numpy(got["tail"]))

    def lookup(self, indices: torch.Tensor, view_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Float32 logits ``[B, C]`` whose softmax at ``temperature`` is the
        reconstructed teacher distribution at that temperature."""
        values, classes, tail = (t.to(self.device, non_blocking=True) for t in self.rows_at(indices, view_ids))
        return reconstruct_logits(values, classes, tail, self.num_classes, temperature)

    def lookup_features(self, indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Float32 teacher embeddings ``[B, D]`` of the given (sample, view) pairs."""
        feats = self.require_features().features
        got = _gather(feats, view_ids.cpu().numpy(), indices.cpu().numpy())
        return torch.from_numpy(got.astype(np.float32)).to(self.device, non_blocking=True)
