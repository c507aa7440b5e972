"""Helpers shared by the loader tests: building stores, collecting an epoch,
undoing the normalization, and telling whether a backend is installed."""
from __future__ import annotations

import importlib
import shutil
from typing import Optional

import torch

from dataset_tools.convert import main as convert_main
from dataset_tools.stores.layout import open_store
from pipelines.loader import BACKENDS, LoaderConfig

BATCH_FIELDS = ("student", "teacher", "labels", "indices", "boxes", "flips", "view_ids")


def convert_store(src, out, formats: str, *extra):
    """``dataset_tools/convert.py src out --formats formats *extra`` (one
    worker, split 'train'); returns ``out``."""
    rc = convert_main([str(src), str(out), "--split-name", "train", "--formats", formats,
                       "--workers", "1", "--no-progress", *extra])
    assert rc == 0
    return out


def copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


def ffcv_cfg(store, **kw) -> LoaderConfig:
    """The FFCV tests' loader config: CPU, 2 threads, batch 16, no reduced decode."""
    base = dict(backend="ffcv", store=str(store), batch_size=16, num_workers=2, device="cpu",
                drop_last=False, seed=3, student_resolution=32, reduced_decode=False)
    base.update(kw)
    return LoaderConfig(**base)


def dali_cfg(store, **kw) -> LoaderConfig:
    """The DALI tests' loader config: CPU, 2 threads, batch 16, DALI's own
    decoder graph unless ``reduced_decode=True`` is passed (the scaled JPEG
    decoder, tested against its own oracle)."""
    base = dict(backend="dali", store=str(store), batch_size=16, num_workers=2, device="cpu",
                drop_last=False, reduced_decode=False)
    base.update(kw)
    return LoaderConfig(**base)


def collect_epoch(loader, epoch: int = 0, max_batches: Optional[int] = None) -> dict:
    """One epoch's Batch fields concatenated (absent fields left out), plus
    ``sizes``: the batch lengths."""
    loader.set_epoch(epoch)
    out = {k: [] for k in BATCH_FIELDS}
    for bi, b in enumerate(loader):
        if max_batches is not None and bi >= max_batches:
            break
        for k in out:
            v = getattr(b, k)
            if v is not None:
                out[k].append(v)
    res = {k: torch.cat(v) for k, v in out.items() if v}
    res["sizes"] = [len(x) for x in out["labels"]]
    return res


def to_uint8(x: torch.Tensor, store) -> torch.Tensor:
    """Undo the loader's normalization -> uint8 NCHW levels (exact: the
    error is far below half a level, and every level lies in 0..255)."""
    s = open_store(store)
    mean = torch.tensor(s.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(s.std, dtype=torch.float32).view(1, 3, 1, 1) * 255
    u = (x * std + mean).round()
    assert u.min() >= 0 and u.max() <= 255, (u.min(), u.max())
    return u.to(torch.uint8)


def backend_import_error(backend: str) -> Optional[str]:
    """Why ``backend``'s module does not import here (FFCV or DALI not
    installed: a real absence the caller skips on), or None."""
    try:
        importlib.import_module(BACKENDS[backend].split(":")[0])
        return None
    except ImportError as e:
        return f"{backend} backend not importable: {e}"
