"""The loader contract shared by all backends, and the factory.

``create_loader(cfg)`` returns an iterable of :class:`~pipelines.batch.Batch`
whatever the backend (``reference`` | ``ffcv`` | ``dali``); the trainer only
sees this. Backends differ in how they read, decode, crop and resize; they
share the epoch/view bookkeeping and the final on-device batch assembly
(:func:`finish_batch`), so their outputs agree.
"""
from __future__ import annotations

import abc
import importlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from dataset_tools.stores.layout import Store, StoreError, open_store
from pipelines.batch import Batch
from pipelines.views import ViewConfig, epoch_view_ids, view_params

BACKENDS = {
    "reference": "pipelines.reference.loader:ReferenceLoader",
    "ffcv": "pipelines.ffcv.loader:FFCVLoader",
    "dali": "pipelines.dali.loader:DALILoader",
    "memory": "pipelines.memory.loader:MemoryLoader",
}


@dataclass
class LoaderConfig:
    backend: str = "reference"  # reference | ffcv | dali | memory
    store: str = ""  # a converted split (OUT_DIR of dataset_tools/convert.py)
    lowres: bool = False  # read the low-res companion store (student view only)
    batch_size: int = 256
    num_workers: int = 2  # worker processes / threads of the backend
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = True
    student_resolution: int = 32
    teacher_resolution: int = 0  # > 0: also yield the teacher view, same crop, this size
    train: bool = True  # False: view 0 (whole image), no flip
    fixed_view: Optional[int] = None  # every sample uses this view id (teacher-cache filling)
    num_views: int = 0  # K replayable views per sample; 0 = fresh crop every epoch
    # the view defaults are ViewConfig's (declared once, in pipelines/views.py)
    scale: tuple[float, float] = ViewConfig.scale
    ratio: tuple[float, float] = ViewConfig.ratio
    flip: bool = ViewConfig.flip
    channels_last: bool = False
    reduced_decode: bool = True  # decode JPEGs at a reduced DCT scale when much larger than needed
    expected_fingerprint: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def view_config(self) -> ViewConfig:
        return ViewConfig(seed=self.seed, num_views=self.num_views, scale=tuple(self.scale),
                          ratio=tuple(self.ratio), flip=self.flip and self.train)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def check_lowres_fits(store: Store, cfg: LoaderConfig) -> None:
    """Refuse a run that would upscale crops of the low-res companion store.

    The converter sizes that store for one student: shorter side
    ``S = ceil(R * sqrt(a / s))`` (``dataset_tools.records.lowres_side``) so
    that a crop of area fraction ``>= s`` and aspect ``<= a`` of it still has
    ``>= R`` pixels a side. A run reading it (``lowres=True``) with a larger
    student resolution, a smaller ``scale`` lower bound or a wider ``ratio``
    range would crop fewer than R pixels and upscale them: the student would
    train on blurrier pixels than the full-resolution path gives, silently.
    Checked here, where every backend's config meets its store. Eval views
    (``train=False``, ``fixed_view=0``) are the whole image: ``S >= R``."""
    from dataset_tools.convert_options import ConvertOptions
    from dataset_tools.records import lowres_side

    if not store.has("ffcv_lowres"):
        return  # the backend names the missing store and its fix
    side = int(store.manifest["stores"]["ffcv_lowres"]["resolution"])
    whole = not cfg.train or cfg.fixed_view == 0
    scale = 1.0 if whole else float(cfg.scale[0])
    aspect = 1.0 if whole else max(float(cfg.ratio[1]), 1.0 / float(cfg.ratio[0]))
    need = lowres_side(cfg.student_resolution, scale, aspect)
    if side >= need:
        return
    built = store.manifest.get("options", {})
    smallest = side * math.sqrt(scale / aspect)
    view = ("whole-image views" if whole else f"crop scale lower bound {scale:g} (data.scale) and "
            f"aspect up to {aspect:.4g} (data.ratio)")
    flags = f"--student-resolution {cfg.student_resolution}"
    if not whole and scale != ConvertOptions.min_crop_scale:
        flags += f" --min-crop-scale {scale!r}"
    if not whole and aspect != ConvertOptions.max_aspect_ratio:
        flags += f" --max-aspect-ratio {aspect!r}"
    fixes = [f"reconvert with {flags} (a low-res side of {need} px)"]
    if not whole and lowres_side(cfg.student_resolution, 1.0, aspect) <= side:
        lo = math.ceil(aspect * (cfg.student_resolution / side) ** 2 * 1000) / 1000
        while lowres_side(cfg.student_resolution, lo, aspect) > side:  # float rounding
            lo += 0.001
        fixes.append(f"raise data.scale's lower bound to at least {lo:g}")
    fixes.append("set data.lowres=false to crop the full-resolution store")
    raise StoreError(
        f"{store.root}: its low-res store {store.path('ffcv_lowres').name} has shorter side "
        f"{side} px (built for a {built.get('student_resolution')} px student, min crop scale "
        f"{built.get('min_crop_scale')}), but this run's student resolution "
        f"{cfg.student_resolution} px with {view} crops as little as {smallest:.1f} px of it "
        f"and would upscale that to {cfg.student_resolution} px; " + ", or ".join(fixes))


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialized, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BaseLoader(abc.ABC):
    """Common state of every backend: store, device, epoch, sharding, views."""

    def __init__(self, cfg: LoaderConfig, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        if cfg.lowres and cfg.teacher_resolution:
            raise ValueError("lowres=True reads the low-res store, which cannot provide the "
                             "full-resolution teacher view; set teacher_resolution=0 or lowres=False")
        self.cfg = cfg
        self.store: Store = open_store(cfg.store, cfg.expected_fingerprint)
        if cfg.lowres:
            check_lowres_fits(self.store, cfg)
        self.device = cfg.resolve_device()
        r, w = dist_info()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.views = cfg.view_config()
        self.epoch = 0
        mean = torch.tensor(self.store.mean, dtype=torch.float32) * 255
        std = torch.tensor(self.store.std, dtype=torch.float32) * 255
        self._mean = mean.view(1, 3, 1, 1).to(self.device)
        self._std = std.view(1, 3, 1, 1).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shuffling order and (random mode) the crops."""
        self.epoch = int(epoch)

    def view_ids_for(self, indices: np.ndarray) -> np.ndarray:
        """View id of each sample in the current epoch."""
        if self.cfg.fixed_view is not None:
            return np.full(len(indices), self.cfg.fixed_view, dtype=np.int64)
        if not self.cfg.train:
            return np.zeros(len(indices), dtype=np.int64)
        return epoch_view_ids(self.views, indices, self.epoch)

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees per epoch (padded like DistributedSampler)."""
        n = self.store.num_samples
        if self.world_size == 1:
            return n
        return -(-n // self.world_size)

    def __len__(self) -> int:
        n, b = self.samples_per_rank, self.cfg.batch_size
        return n // b if self.cfg.drop_last else -(-n // b)

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    def close(self) -> None:
        """Release threads/processes; safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def finish_batch(self, student: torch.Tensor, labels, indices, view_ids,
                     teacher: Optional[torch.Tensor] = None,
                     params: Optional[tuple[np.ndarray, np.ndarray]] = None) -> Batch:
        """Uint8 images (NCHW or NHWC, any device) -> normalized float Batch on
        the training device, with the view parameters of each sample
        (``params``: the ``view_params(indices, view_ids)`` a backend already
        computed for these samples)."""
        idx_np = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)
        vid_np = np.asarray(view_ids.cpu() if torch.is_tensor(view_ids) else view_ids, dtype=np.int64)
        boxes, flips = view_params(self.views, idx_np, vid_np) if params is None else params
        dev = self.device
        return Batch(
            student=self._normalize(student),
            teacher=None if teacher is None else self._normalize(teacher),
            labels=torch.as_tensor(labels).to(dev, torch.long, non_blocking=True).view(-1),
            indices=torch.from_numpy(idx_np).to(dev, non_blocking=True),
            boxes=torch.from_numpy(boxes).to(dev, non_blocking=True),
            flips=torch.from_numpy(flips).to(dev, non_blocking=True),
            view_ids=torch.from_numpy(vid_np).to(dev, non_blocking=True),
        )

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected a 4-d image batch, got shape {tuple(images.shape)}")
        if images.shape[1] != 3 and images.shape[-1] == 3:  # NHWC -> NCHW view
            images = images.permute(0, 3, 1, 2)
        x = images.to(self.device, non_blocking=True)
        # in place where .float() made a new tensor (never into a backend's own buffer)
        x = x.float().sub_(self._mean) if x.dtype != torch.float32 else x - self._mean
        x = x.div_(self._std)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def sharded_order(num_samples: int, rank: int, world_size: int, shuffle: bool, seed: int,
                  epoch: int) -> np.ndarray:
    """What ``DistributedSampler(range(num_samples), world_size, rank, shuffle,
    seed, drop_last=False)`` yields after ``set_epoch(epoch)``, as int64: the
    same ``torch.randperm`` seeded with ``seed + epoch``, repeated cyclically
    up to a multiple of ``world_size``, every ``world_size``-th from ``rank``
    (tested against the sampler). Iterating the sampler in Python costs ~0.3 ms
    per 3k samples, a visible share of a ~15 ms low-res epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        perm = torch.randperm(num_samples, generator=generator).numpy()
    else:
        perm = np.arange(num_samples)
    total = -(-num_samples // world_size) * world_size
    return np.resize(perm, total)[rank::world_size].astype(np.int64)


def create_loader(cfg: LoaderConfig, rank: Optional[int] = None,
                  world_size: Optional[int] = None) -> BaseLoader:
    """Build the configured backend (imported lazily: FFCV/DALI are heavy)."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {cfg.backend!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[cfg.backend].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, rank=rank, world_size=world_size)
