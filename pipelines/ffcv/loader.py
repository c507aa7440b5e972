"""FFCV backend: ``.beton`` -> view-contract crops -> normalized :class:`Batch`.

Reading and decoding are FFCV's: memory-mapped ``.beton`` (OS page cache), a
compiled numba decode loop over the batch (``num_workers`` threads), JPEG
decode by libturbojpeg on the CPU, ``INTER_AREA`` resize. The crop of
every sample comes from :mod:`pipelines.views` inside that loop
(:class:`~pipelines.ffcv.decoder.ViewCropDecoder`), so boxes are replayable and
identical to the other backends' boxes.

Views. Student and teacher come from the *same* pixel box of the same decoded
image, each resized from that full-resolution crop (not the student from the
teacher): one decoder writes both into one packed row, so the JPEG is decoded
once and one ``ToDevice`` copy (CUDA only, ``non_blocking``) moves both. The
``Batch``'s ``view_ids``/``boxes``/``flips`` are recomputed in Python from the
``.beton``'s ``index`` field with the same functions; on CPU every batch is
checked against what the decoder recorded (source index, view id, decode
status), on CUDA that check is skipped to avoid a device sync.

Differences from the reference backend (PIL decode + torchvision antialiased
bilinear resize): FFCV decodes with libturbojpeg's fast IDCT and resizes with
``INTER_AREA``; on the same pixels and box the views differ by ~3 levels on
average (tests bound it). The reference order of operations is kept: crop,
resize, then flip.

Reduced decode. FFCV 1.0.2 never scales its JPEG decode, but its ``imdecode``
passes a scaling factor to libturbojpeg, which decodes at 1/2, 1/4 or 1/8 in
the IDCT. With ``reduced_decode``, a JPEG whose crop is >= 2d x the largest
output (largest d of 8, 4, 2; the reference backend's rule) is decoded at 1/d
and the same normalized box is rounded on that smaller image. On 224 px
imagenette this saves little decode time (entropy decoding dominates) but
shrinks the crop to resize (measurements: docs/design/loaders.md). Raw samples are
read in place. The low-res store (``lowres=True``: raw pixels, shorter side
sized so every crop still has the student resolution) is the fast path: no
decode, a small resize (~5 us of CPU per image in the kernel, all included).

Order and sharding follow ``torch.utils.data.DistributedSampler`` (which is
what FFCV's ``distributed=True`` uses): the permutation is seeded by
``seed + epoch``; with ``world_size > 1`` the order is padded by repeating its
head to a multiple of ``world_size`` and rank ``r`` takes every
``world_size``-th sample from ``r``, so each sample is seen once per epoch
across ranks (plus the few padding repeats). Unlike FFCV's own distributed
mode, rank/world size may be given explicitly (no process group needed).
``drop_last`` then drops this rank's last partial batch. When the file does not
fit in half the available RAM, FFCV's process cache and ``QUASI_RANDOM`` order
(page-local shuffling, made reproducible per epoch; single rank only) are used
instead of the OS cache; ``os_cache=`` overrides the choice.

Threads and memory. FFCV runs each epoch in an ``EpochIterator`` thread and
allocates its batch buffers per epoch; a consumer that breaks out early leaves
that thread blocked on its queue. Here one FFCV ``Loader`` lives as long as
this object, its buffers are allocated once, and one producer thread
(:mod:`pipelines.ffcv.producer`) decodes epoch after epoch, at most
``batches_ahead`` batches ahead of the consumer, into the next epoch too.
It is stopped and joined on an early break, an ``__iter__`` at an epoch it
did not guess, ``close`` and garbage collection. Each FFCV Loader compiles
its pipeline, and numba never frees compiled code (~8 MB per Loader), so a
closed or collected loader hands its FFCV Loader to
:mod:`pipelines.ffcv.pool`, and the next loader with the same settings
reuses it: recreating the loader every epoch does not grow memory
(tested). FFCV sets torch's and numba's thread count to ``num_workers``.

Speed on CPU: the decode kernel also normalizes (``finish_batch``'s float32
arithmetic, applied as the resize writes each value; tested bitwise against
the uint8 path) and flips while writing each view into a new float32 batch
array, so the training thread gets finished tensors; the resize is a numba
``INTER_AREA`` in exact integer arithmetic (:mod:`pipelines.kernels.area_resize`,
~3x faster than OpenCV's call on small crops), whose horizontal pass runs as
4-lane vector code for the low-res crops (:mod:`pipelines.kernels.area_rows`);
labels and indices come from the file's metadata in Python rather than from
compiled FFCV pipelines; the decode kernel is numba-compiled once and cached
on disk, so a new loader costs ~1 s of compilation instead of ~10 s.
"""
from __future__ import annotations

import weakref
from typing import Iterator, Optional

import numba
import numpy as np
import psutil
import torch

from dataset_tools.ffcv_import import TorchThreadsKept, set_decode_threads
from ffcv.fields import IntField, RGBImageField
from ffcv.loader import Loader
from ffcv.traversal_order.base import TraversalOrder
from ffcv.traversal_order.quasi_random import QuasiRandom
from ffcv.transforms import ToDevice, ToTensor

from dataset_tools.stores.layout import MANIFEST_NAME, StoreError
from pipelines.ffcv import pool as ffcv_pool
from pipelines.kernels.area_resize import normalization_rows
from pipelines.batch import Batch
from pipelines.ffcv.decoder import (T_INDEX, T_STATUS, T_VIEW, EpochCell, ViewCropDecoder,
                                split_normalized, split_packed)
from pipelines.ffcv.producer import EpochProducer
from pipelines.loader import BaseLoader, LoaderConfig, sharded_order
from pipelines.views import epoch_view_ids

FIELDS = {"image": RGBImageField, "label": IntField, "index": IntField}


class _ShardedOrder(TraversalOrder):
    """DistributedSampler order with an explicit rank/world size.

    FFCV's ``Loader(order=...)`` accepts a ``TraversalOrder`` *instance* and
    calls it with the loader, hence ``__call__``."""

    def __init__(self, rank: int, world_size: int, shuffle: bool, seed: int):
        self.rank, self.world_size, self.shuffle, self.order_seed = rank, world_size, shuffle, seed

    def __call__(self, loader) -> "_ShardedOrder":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices[sharded_order(len(self.indices), self.rank, self.world_size,
                                          self.shuffle, self.order_seed, epoch)]


class _QuasiRandomOrder(QuasiRandom):
    """FFCV's QUASI_RANDOM with an order that depends only on (seed, epoch):
    FFCV's shuffles its page table in place, so its order for an epoch
    depends on the epochs drawn before."""

    def __init__(self):  # bound to the loader by __call__, as _ShardedOrder
        pass

    def __call__(self, loader) -> "_QuasiRandomOrder":
        super().__init__(loader)
        self._pristine = self.page_to_samples_array.copy()
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        self.page_to_samples_array[:] = self._pristine
        return super().sample_order(epoch)


def _memoize_allocations(loader: Loader) -> None:
    """FFCV allocates batch buffers for every epoch thread (pinned when CUDA
    is present), and a producer starts whenever an epoch was not decoded
    ahead; allocate them once. Safe because a producer is always joined
    before the next one starts."""
    graph, original, cache = loader.graph, loader.graph.allocate_memory, {}

    def allocate_memory(batch_size, slots):
        if (batch_size, slots) not in cache:
            cache[(batch_size, slots)] = original(batch_size, slots)
        return cache[(batch_size, slots)]

    graph.allocate_memory = allocate_memory


class _Lease:
    """The producer thread running on a pooled FFCV Loader. Owned by one
    FFCVLoader; its finalizer calls :meth:`release` (no reference back), so
    the Loader returns to the pool only once no thread uses its buffers."""

    def __init__(self):
        self.active: Optional[EpochProducer] = None

    def stop(self) -> None:
        producer, self.active = self.active, None
        if producer is not None:
            producer.stop()

    def release(self, key, entry) -> None:
        self.stop()
        ffcv_pool.give(key, entry)


class FFCVLoader(BaseLoader):
    """The FFCV implementation of the loader contract (see module docstring).

    ``os_cache``: ``None`` = OS page cache when the file fits in half the
    available RAM, else FFCV's process cache. ``batches_ahead``: batches
    decoded in advance by the producer thread. ``next_epoch_ahead`` (default:
    for training loaders, ``cfg.train``): after an epoch's last batch the
    producer goes on with the next epoch's first batches
    (:mod:`pipelines.ffcv.producer`) and keeps them, ``batches_ahead`` at
    most, until the next ``__iter__``; the next epoch is guessed as this
    epoch + 1, or this epoch again when the loader was iterated twice at one
    epoch. A wrong guess costs the batches decoded. Eval loaders, iterated
    once between long training epochs, would only hold memory that way.
    ``normalize_in_decoder``: the
    decode kernel writes normalized float views (default on CPU); otherwise it
    writes uint8 and normalization follows on the training device (default
    on CUDA: a 4x smaller host->device copy).
    """

    def __init__(self, cfg: LoaderConfig, rank: Optional[int] = None,
                 world_size: Optional[int] = None, *, os_cache: Optional[bool] = None,
                 batches_ahead: int = 3, next_epoch_ahead: Optional[bool] = None,
                 normalize_in_decoder: Optional[bool] = None):
        super().__init__(cfg, rank, world_size)
        self._next_epoch_ahead = cfg.train if next_epoch_ahead is None else bool(next_epoch_ahead)
        self._last_epoch: Optional[int] = None
        if cfg.lowres and not self.store.has("ffcv_lowres"):
            raise StoreError(f"{self.store.root}: lowres=True but this store has no low-res "
                             f"companion; convert with --student-resolution N, or set "
                             f"lowres=False to read the full-resolution .beton")
        self.path = self.store.path("ffcv_lowres" if cfg.lowres else "ffcv")
        self.student_res = int(cfg.student_resolution)
        self.teacher_res = int(cfg.teacher_resolution)
        if self.student_res <= 0 or self.teacher_res < 0:
            raise ValueError(f"resolutions must be positive, got student={self.student_res}, "
                             f"teacher={self.teacher_res}")
        if normalize_in_decoder is None:
            normalize_in_decoder = self.device.type == "cpu"
        self._norm = None
        if normalize_in_decoder:  # the mean and std _normalize uses, as float32
            self._norm = normalization_rows(self._mean.float().cpu(), self._std.float().cpu())
        # An idle compiled FFCV Loader with the same settings, or a new one (see
        # pipelines.ffcv.pool: numba never frees a Loader's compiled code).
        stat = self.path.stat()
        key = (str(self.path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns,
               self.store.fingerprint, repr(cfg), self.rank, self.world_size, os_cache,
               batches_ahead, None if self._norm is None else self._norm.tobytes())
        entry = ffcv_pool.take(key)
        if entry is None:
            self._epoch_cell = EpochCell()
            entry = (self._build(os_cache, batches_ahead), self._epoch_cell)
        self._loader, self._epoch_cell = entry
        self._lease = _Lease()
        # back to the pool on close() or when this object is collected
        self._release = weakref.finalize(self, self._lease.release, key, entry)
        self._release.atexit = False

    # -- construction -------------------------------------------------------

    def _build(self, os_cache: Optional[bool], batches_ahead: int) -> Loader:
        cfg = self.cfg
        if os_cache is None:
            os_cache = self.path.stat().st_size < psutil.virtual_memory().available // 2
        if self.world_size == 1 and cfg.shuffle and not os_cache:
            order = _QuasiRandomOrder()
        else:
            order = _ShardedOrder(self.rank, self.world_size, cfg.shuffle, cfg.seed)
        view_id = cfg.fixed_view if cfg.fixed_view is not None else (-1 if cfg.train else 0)
        decoder = ViewCropDecoder(self.student_res, self.teacher_res, self.views, view_id,
                                  self._epoch_cell, cfg.reduced_decode and not cfg.lowres,
                                  norm=self._norm, chw=not cfg.channels_last)
        image_ops = [decoder, ToTensor()]
        if self.device.type == "cuda":
            if self._norm is not None:
                raise ValueError("normalize_in_decoder=True is for CPU training; on CUDA the "
                                 "uint8 views are copied and normalized on the device")
            image_ops.append(ToDevice(self.device, non_blocking=True))
        # Labels and indices are read from the file's metadata in Python (see
        # __iter__): no compiled pipelines for them, which saves ~1 s per Loader.
        pipelines = {"image": image_ops, "label": None, "index": None}
        workers = max(1, min(int(cfg.num_workers), numba.config.NUMBA_NUM_THREADS))
        try:
            with TorchThreadsKept():  # FFCV's Loader sets torch's threads to its worker count
                loader = Loader(str(self.path), batch_size=cfg.batch_size, num_workers=workers,
                                os_cache=os_cache, order=order, seed=cfg.seed,
                                pipelines=pipelines, drop_last=cfg.drop_last,
                                batches_ahead=batches_ahead)
        except (AssertionError, ValueError, TypeError, IndexError, OSError) as e:
            raise StoreError(f"{self.path}: not a readable FFCV file ({e!r}); re-run "
                             f"dataset_tools/convert.py for {self.store.root}") from e
        self._check_fields(loader)
        _memoize_allocations(loader)
        return loader

    def _check_fields(self, loader: Loader) -> None:
        handlers = loader.reader.handlers
        for name, kind in FIELDS.items():
            if not isinstance(handlers.get(name), kind):
                raise StoreError(f"{self.path}: expected field '{name}' ({kind.__name__}), "
                                 f"found fields {sorted(handlers)}; re-run dataset_tools/"
                                 f"convert.py for {self.store.root}")
        if int(loader.reader.num_samples) != self.store.num_samples:
            raise StoreError(f"{self.path}: {loader.reader.num_samples} samples but "
                             f"{self.store.root / MANIFEST_NAME} lists {self.store.num_samples}; "
                             f"the store is mixed up, re-run dataset_tools/convert.py")

    # -- iteration ----------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:
            raise RuntimeError("this FFCVLoader is closed")
        epoch, loader = self.epoch, self._loader
        producer = self._lease.active
        if producer is None or producer.next_epoch != epoch:  # not decoded ahead
            self._lease.stop()
            step = (0 if epoch == self._last_epoch else 1) if self._next_epoch_ahead else None
            set_decode_threads(loader.num_workers)
            producer = self._lease.active = EpochProducer(loader, self._epoch_cell, epoch, step)
        self._last_epoch = epoch
        meta = loader.reader.metadata
        labels = meta[f"f{loader.field_name_to_f_ix['label']}"]
        index_field = meta[f"f{loader.field_name_to_f_ix['index']}"]
        complete = False
        try:
            for chunk, (packed,) in producer.epoch(epoch):
                yield self._assemble(packed, labels[chunk], index_field[chunk], epoch)
            complete = True
        finally:
            # broken out of or failed mid-epoch: stop this iterator's producer
            # (not a newer iterator's)
            if not complete and self._lease.active is producer:
                self._lease.stop()

    def _view_ids(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        """``view_ids_for`` with the epoch this iteration started with."""
        if self.cfg.fixed_view is None and self.cfg.train:
            return epoch_view_ids(self.views, indices, epoch)
        return self.view_ids_for(indices)

    def _assemble(self, packed: torch.Tensor, labels: np.ndarray, idx: np.ndarray,
                  epoch: int) -> Batch:
        idx, lab = idx.astype(np.int64), labels.astype(np.int64)
        vids = self._view_ids(idx, epoch)
        if self._norm is not None:  # normalized by the decoder, a new array per batch
            student, teacher, trailer = split_normalized(
                packed, len(idx), self.student_res, self.teacher_res, not self.cfg.channels_last)
            self._check_trailer(trailer.numpy(), idx, vids)
        else:
            student, teacher, trailer = split_packed(packed, self.student_res, self.teacher_res)
            if packed.device.type == "cpu":  # on CUDA, reading the trailer would sync
                self._check_trailer(trailer().numpy(), idx, vids)
        return self.finish_batch(student, lab, idx, vids, teacher)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point() and images.device == self.device:
            return images  # normalized by the decoder, in the configured format
        return super()._normalize(images)

    def _check_trailer(self, trailer: np.ndarray, idx: np.ndarray, vids: np.ndarray) -> None:
        bad = np.flatnonzero(trailer[:, T_STATUS] != 0)
        if bad.size:
            raise StoreError(f"{self.path}: libturbojpeg failed to decode sample(s) "
                             f"{trailer[bad, T_INDEX].tolist()}; re-run dataset_tools/convert.py")
        if not np.array_equal(trailer[:, T_INDEX], idx):
            raise StoreError(f"{self.path}: the 'index' field disagrees with the sample "
                             f"positions; the file is not a converted store, re-convert it")
        if not np.array_equal(trailer[:, T_VIEW], vids):  # a bug here, not bad data
            raise RuntimeError("FFCV decoder and Python disagree on view ids")

    def close(self) -> None:
        """Stop the producer thread and hand the FFCV Loader back to the pool."""
        self._release()
        self._loader = None
