"""The in-memory backend: the whole split decoded once and held on the
training device; every view cropped, flipped and resized there as batched
tensor algebra.

For datasets that fit (CIFAR-100 train at 32 px is 150 MB of uint8; a 64 px
ImageNet fits one 80 GB GPU) this is what the fastest CIFAR trainers do: no
decoding, no worker processes and no per-sample Python after the first
epoch, so the training loop runs at the speed of the model, also on two CPU
cores where loader workers would take the model's cores.

Semantics are the reference backend's, to the uint8 level: the same store
files (the webdataset shards' image bytes, decoded with PIL in full, the
low-res store emulated from them with ``lowres=True``), the same view
contract (:mod:`pipelines.views`), the same epoch order (DistributedSampler's
permutation via :func:`pipelines.loader.sharded_order`) and torchvision's
antialiased bilinear resize written as two matrix products
(:mod:`pipelines.kernels.resized_crop`, at most one level off per pixel).
JPEGs are always decoded in full (``reduced_decode`` does not apply: the
decode happens once).

Decoded splits are kept per process (:func:`resident_split`), so the many
loaders of one job (train, val, the sweep's students, the demo's seeds) decode
each store once. A split that would take more than ``max_bytes`` (default: a
quarter of the machine's available memory, or of the GPU's) is refused with
the fix (``data.backend=ffcv`` or ``dali``).

Replayable views (``num_views = K > 0``, the eval view, a fixed view) are the
same pixels every epoch, so they are resized once into a view bank
(:func:`view_bank`, uint8, kept per process like the split) and each batch
is a gather plus the normalization: the per-batch resize would otherwise be
~8 % of a 16 px student's step on two CPU cores. A bank that would not fit
the same budget (next to the split) is not built and the views are resized
per batch instead; random mode (``K = 0``) always resizes per batch.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from dataset_tools.stores.layout import Store, StoreError
from dataset_tools.stores.webdataset import index_shards
from pipelines.batch import Batch
from pipelines.kernels.pil_image import decode, lowres_source
from pipelines.kernels.resized_crop import pixel_boxes, resized_crop_batch
from pipelines.loader import BaseLoader, LoaderConfig, sharded_order
from pipelines.views import view_params

_RESIDENT: "OrderedDict[tuple, ResidentSplit]" = OrderedDict()
_MAX_RESIDENT = 6  # splits kept per process (train, val, test of two recipes)
_BANKS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_MAX_BANKS = 8  # view banks kept per process (student and teacher views of the splits above)
_BANK_CHUNK = 1024  # samples resized at a time while a bank is built


@dataclass
class ResidentSplit:
    """A decoded split: uint8 ``[n, 3, H, W]`` zero-padded to the largest
    image, each image's own size, and the labels, all on one device."""

    images: torch.Tensor
    heights: np.ndarray  # int64 [n]
    widths: np.ndarray
    labels: torch.Tensor  # long [n], on the images' device

    @property
    def nbytes(self) -> int:
        return self.images.numel()


def available_bytes(device: torch.device) -> int:
    """Free memory where the split would live (GPU or host RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def resident_split(store: Store, lowres_side: Optional[int], device: torch.device,
                   max_bytes: Optional[int] = None, workers: int = 2) -> ResidentSplit:
    """The store's images decoded once per process and placed on ``device``
    (see module docstring); raises :class:`StoreError` when they would not fit."""
    key = (str(store.root), store.fingerprint, lowres_side, str(device))
    if key in _RESIDENT:
        _RESIDENT.move_to_end(key)
        return _RESIDENT[key]
    shards = index_shards(store)
    n = store.num_samples
    limit = available_bytes(device) // 4 if max_bytes is None else int(max_bytes)

    fds = [os.open(t, os.O_RDONLY) for t in shards.tars]
    try:
        def load(i: int) -> torch.Tensor:
            data = os.pread(fds[shards.shard[i]], int(shards.size[i]), int(shards.offset[i]))
            img = decode(data, bool(shards.is_jpeg[i]))
            return img if lowres_side is None else lowres_source(img, lowres_side)

        first = load(0) if n else torch.zeros(3, 1, 1, dtype=torch.uint8)
        estimate = n * first.numel()
        if estimate > limit:
            raise StoreError(_too_big(store, estimate, limit, device))
        # PIL releases the GIL while decoding: a few threads overlap the decodes
        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = [first] + list(pool.map(load, range(1, n), chunksize=256))
    finally:
        for fd in fds:
            os.close(fd)
    heights = np.array([im.shape[1] for im in decoded], dtype=np.int64)
    widths = np.array([im.shape[2] for im in decoded], dtype=np.int64)
    hmax, wmax = (int(heights.max()), int(widths.max())) if n else (1, 1)
    if n * 3 * hmax * wmax > limit:
        raise StoreError(_too_big(store, n * 3 * hmax * wmax, limit, device))
    if (heights == hmax).all() and (widths == wmax).all():
        images = torch.stack(decoded) if n else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    else:  # zero-padded; the resize weights never read beyond an image's own size
        images = torch.zeros(n, 3, hmax, wmax, dtype=torch.uint8)
        for i, im in enumerate(decoded):
            images[i, :, :im.shape[1], :im.shape[2]] = im
    split = ResidentSplit(images.to(device), heights, widths,
                          torch.from_numpy(shards.labels).to(device))
    _RESIDENT[key] = split
    while len(_RESIDENT) > _MAX_RESIDENT:
        _RESIDENT.popitem(last=False)
    return split


def view_bank(split: ResidentSplit, key: tuple, views, view_ids: tuple[int, ...], size: int,
              max_bytes: int) -> Optional[torch.Tensor]:
    """uint8 ``[len(view_ids) * n, 3, size, size]``: view ``view_ids[j]`` of
    sample ``i`` at row ``j * n + i`` (a batch is one ``index_select`` of
    rows, faster than advanced indexing on the CPU), resized once (see module
    docstring); None when it would not fit ``max_bytes``. Kept per process
    under ``key`` (the split, the view contract, the size). The rows stay
    channels-first even for channels-last training: normalizing there and
    then converting is faster on the CPU than broadcasting over a
    channels-last batch."""
    if key in _BANKS:
        _BANKS.move_to_end(key)
        return _BANKS[key]
    n = split.images.shape[0]
    if len(view_ids) * n * 3 * size * size > max_bytes:
        return None
    dev = split.images.device
    bank = torch.empty(len(view_ids) * n, 3, size, size, dtype=torch.uint8, device=dev)
    for j, vid in enumerate(view_ids):
        for a in range(0, n, _BANK_CHUNK):
            idx = np.arange(a, min(a + _BANK_CHUNK, n), dtype=np.int64)
            boxes, flips = view_params(views, idx, np.full(len(idx), vid, dtype=np.int64))
            pix = torch.from_numpy(pixel_boxes(boxes, split.heights[idx], split.widths[idx])).to(dev)
            lo = j * n + a
            bank[lo:lo + len(idx)] = resized_crop_batch(split.images[a:a + len(idx)], pix,
                                                        torch.from_numpy(flips).to(dev), size).to(torch.uint8)
    _BANKS[key] = bank
    while len(_BANKS) > _MAX_BANKS:
        _BANKS.popitem(last=False)
    return bank


def _too_big(store: Store, need: int, limit: int, device: torch.device) -> str:
    return (f"{store.root}: the memory backend would hold {need / 2**30:.2f} GiB of decoded images on "
            f"{device}, more than its budget of {limit / 2**30:.2f} GiB (a quarter of the free "
            f"memory); set data.backend=ffcv or data.backend=dali, which stream from disk")


class MemoryLoader(BaseLoader):
    """The in-memory backend; see the module docstring."""

    def __init__(self, cfg: LoaderConfig, rank: Optional[int] = None,
                 world_size: Optional[int] = None, max_bytes: Optional[int] = None):
        super().__init__(cfg, rank=rank, world_size=world_size)
        lowres_side = None
        if cfg.lowres:
            self.store.path("ffcv_lowres")  # StoreError naming the fix when it was not written
            lowres_side = int(self.store.manifest["stores"]["ffcv_lowres"]["resolution"])
        self.split = resident_split(self.store, lowres_side, self.device, max_bytes=max_bytes,
                                    workers=max(1, cfg.num_workers))
        budget = (available_bytes(self.device) // 4 if max_bytes is None else int(max_bytes)) \
            - self.split.nbytes
        self.bank_views = self._replayable_view_ids()
        self.banks = {}  # output size -> view bank, or None (resized per batch)
        for size in {cfg.student_resolution, cfg.teacher_resolution} - {0}:
            key = (str(self.store.root), self.store.fingerprint, lowres_side, str(self.device),
                   json.dumps(self.views.to_dict(), sort_keys=True), self.bank_views, size)
            self.banks[size] = None if not self.bank_views else view_bank(
                self.split, key, self.views, self.bank_views, size, budget)

    def _replayable_view_ids(self) -> tuple[int, ...]:
        """The view ids this loader can yield, when they are a fixed set (else ())."""
        cfg = self.cfg
        if cfg.fixed_view is not None:
            return (int(cfg.fixed_view),)
        if not cfg.train:
            return (0,)
        return tuple(range(cfg.num_views))  # replay mode; () in random mode

    def _views_of(self, size: int, idx, vids, pix, flips) -> torch.Tensor:
        """``[b, 3, size, size]`` levels of these samples' views: float32
        resized now, or uint8 rows of the view bank."""
        bank = self.banks[size]
        if bank is None:
            return resized_crop_batch(self.split.images.index_select(0, idx), pix, flips, size)
        slot = vids if self.bank_views[0] == 0 else vids - self.bank_views[0]
        return bank.index_select(0, slot * self.split.images.shape[0] + idx)

    def _epoch_plan(self) -> dict:
        """This rank's order, view ids, boxes, flips and pixel boxes for the
        epoch, computed at once on the host and moved to the device in one go."""
        cfg, s = self.cfg, self.split
        order = sharded_order(self.store.num_samples, self.rank, self.world_size, cfg.shuffle,
                              cfg.seed, self.epoch)
        vids = self.view_ids_for(order)
        boxes, flips = view_params(self.views, order, vids)
        pix = pixel_boxes(boxes, s.heights[order], s.widths[order])
        dev = self.device
        return {"indices": torch.from_numpy(order).to(dev, non_blocking=True),
                "view_ids": torch.from_numpy(vids).to(dev, non_blocking=True),
                "boxes": torch.from_numpy(boxes).to(dev, non_blocking=True),
                "flips": torch.from_numpy(flips).to(dev, non_blocking=True),
                "pixels": torch.from_numpy(pix).to(dev, non_blocking=True)}

    def __iter__(self) -> Iterator[Batch]:
        plan, s, cfg = self._epoch_plan(), self.split, self.cfg
        bs = cfg.batch_size
        for b in range(len(self)):
            sl = slice(b * bs, (b + 1) * bs)
            idx, pix, flips, vids = plan["indices"][sl], plan["pixels"][sl], plan["flips"][sl], plan["view_ids"][sl]
            student = self._views_of(cfg.student_resolution, idx, vids, pix, flips)
            teacher = self._views_of(cfg.teacher_resolution, idx, vids, pix, flips) \
                if cfg.teacher_resolution > 0 else None
            yield Batch(student=self._normalize(student),
                        teacher=None if teacher is None else self._normalize(teacher),
                        labels=s.labels.index_select(0, idx), indices=idx, boxes=plan["boxes"][sl],
                        flips=flips, view_ids=plan["view_ids"][sl])
