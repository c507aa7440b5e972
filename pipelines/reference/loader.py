"""The reference backend: torchvision + torch DataLoader over the store's
webdataset shards.

It is the semantic oracle the fast backends (FFCV, DALI) are tested against
and the benchmark baseline, so it favours obviousness over speed: per sample
it reads the stored (original) image bytes, decodes the whole image (PIL), computes
the view's pixel box with :func:`pipelines.views.box_to_pixels` on the decoded
size and calls ``torchvision.transforms.v2.functional.resized_crop`` (bilinear,
antialiased) followed by ``hflip`` -- once for the student resolution and,
when ``teacher_resolution > 0``, once more for the teacher on the same box.

Reduced decode (``cfg.reduced_decode``): for a JPEG whose crop is at least 4x
the largest output size in both dimensions, PIL's ``Image.draft`` decodes at a
DCT scale of 1/2, 1/4 or 1/8 (the largest that keeps the crop >= 2x the
output, see :func:`reduced_scale`) and the normalized box is mapped onto the
reduced image. This is an
approximation of the full decode (the DCT scaling acts as a box prefilter);
``cfg.reduced_decode=False`` gives the exact oracle.

Low-res mode (``cfg.lowres=True``): the reference does not read the low-res
FFCV file; it emulates it by resizing the decoded image the way the converter
made the low-res store (shorter side to manifest ``stores.ffcv_lowres.resolution``,
see :func:`lowres_source`), then cropping, so the FFCV low-res path has an
oracle too. Requires a store converted with ``--student-resolution`` (the
same check as the FFCV backend), though the low-res file itself is not read.

Distributed sharding follows ``torch.utils.data.DistributedSampler`` with
``drop_last=False``: each epoch the (shuffled) index list is padded by
repeating its first ``ceil(n / world) * world - n`` entries, then rank ``r``
takes every ``world``-th entry starting at ``r``. So every sample is seen at
least once per epoch across ranks, and exactly the first few of the epoch's
order are seen twice. ``cfg.drop_last`` then drops each rank's last partial
batch.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import weakref
from typing import Iterator, Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from dataset_tools.stores.webdataset import ShardIndex, index_shards
from pipelines.batch import Batch
from pipelines.kernels.pil_image import decode, lowres_source, reduced_scale  # noqa: F401 (re-exported)
from pipelines.loader import BaseLoader, LoaderConfig
from pipelines.views import ViewConfig, box_to_pixels, view_params


# --------------------------------------------------------------------------- one view
def crop_resize(image: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """The oracle transform: uint8 CHW image, normalized box -> ``size``x``size`` view."""
    h, w = image.shape[-2:]
    top, left, ch, cw = box_to_pixels(float(box[0]), float(box[1]), float(box[2]), float(box[3]), h, w)
    out = TF.resized_crop(image, top, left, ch, cw, size=[size, size], antialias=True)
    return TF.horizontal_flip(out) if flip else out


class StoreViews(Dataset):
    """Map-style dataset over the shards. Items are ``(sample index, view id)``
    pairs, chosen in the main process, so workers need no epoch state."""

    def __init__(self, index: ShardIndex, views: ViewConfig, student_res: int, teacher_res: int = 0,
                 reduced_decode: bool = False, lowres_side: Optional[int] = None):
        self.index, self.views = index, views
        self.student_res, self.teacher_res = student_res, teacher_res
        self.reduced_decode, self.lowres_side = reduced_decode, lowres_side
        self._fds: dict[int, list[int]] = {}  # per process: fds must not be shared across fork

    def __len__(self) -> int:
        return len(self.index.labels)

    def read_bytes(self, i: int) -> bytes:
        fds = self._fds.get(os.getpid())
        if fds is None:
            fds = self._fds[os.getpid()] = [os.open(t, os.O_RDONLY) for t in self.index.tars]
        return os.pread(fds[self.index.shard[i]], int(self.index.size[i]), int(self.index.offset[i]))

    def __getitem__(self, item):
        i, vid = (item, 0) if np.isscalar(item) else item
        boxes, flips = view_params(self.views, np.array([i]), np.array([vid]))
        box, flip = boxes[0], bool(flips[0])
        out_size = max(self.student_res, self.teacher_res)
        reduce = self.reduced_decode and self.lowres_side is None
        img = decode(self.read_bytes(i), bool(self.index.is_jpeg[i]),
                     box if reduce else None, out_size)
        if self.lowres_side is not None:
            img = lowres_source(img, self.lowres_side)
        student = crop_resize(img, box, flip, self.student_res)
        teacher = crop_resize(img, box, flip, self.teacher_res) if self.teacher_res > 0 else None
        return student, teacher, int(self.index.labels[i]), int(i), int(vid)

    def close_files(self) -> None:
        """Close this process's shard files (reopened on the next read)."""
        for fd in self._fds.pop(os.getpid(), []):
            os.close(fd)

    def __del__(self):
        self.close_files()


def collate(samples):
    student, teacher, labels, indices, vids = zip(*samples)
    return (torch.stack(student), None if teacher[0] is None else torch.stack(teacher),
            torch.tensor(labels), torch.tensor(indices), torch.tensor(vids))


class _ViewBatches:
    """Batches of ``(index, view id)`` for the current epoch, on the main process."""

    def __init__(self, loader: "ReferenceLoader", batches: BatchSampler):
        # A weak reference: a cycle loader -> DataLoader -> this -> loader would
        # leave the workers to the cyclic GC, whose arbitrary finalization order
        # makes DataLoader's worker shutdown wait out its timeouts (~10 s).
        self.loader, self.batches = weakref.ref(loader), batches

    def __iter__(self):
        loader = self.loader()
        for batch in self.batches:
            vids = loader.view_ids_for(np.asarray(batch, dtype=np.int64))
            yield list(zip(batch, vids.tolist()))

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_):
    torch.set_num_threads(1)  # workers are the parallelism; avoid oversubscribing the cores


# --------------------------------------------------------------------------- loader
class ReferenceLoader(BaseLoader):
    """torchvision/DataLoader backend; see the module docstring for semantics."""

    def __init__(self, cfg: LoaderConfig, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__(cfg, rank=rank, world_size=world_size)
        lowres_side = None
        if cfg.lowres:
            self.store.path("ffcv_lowres")  # StoreError naming the fix when it was not written
            lowres_side = int(self.store.manifest["stores"]["ffcv_lowres"]["resolution"])
        self.shards = index_shards(self.store)
        # Compile/load the numba functions here, so forked workers inherit them
        # instead of each paying ~1 s per epoch.
        box_to_pixels(0.0, 0.0, 1.0, 1.0, 2, 2)
        view_params(self.views, np.zeros(1, np.int64), np.ones(1, np.int64))
        self.dataset = StoreViews(self.shards, self.views, cfg.student_resolution,
                                  cfg.teacher_resolution, cfg.reduced_decode, lowres_side)
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=cfg.shuffle, seed=cfg.seed, drop_last=False)
        batches = BatchSampler(self.sampler, cfg.batch_size, drop_last=cfg.drop_last)
        # Persistent workers: starting them costs ~0.3 s per epoch otherwise.
        # Fork where available: under torch.multiprocessing.spawn the default
        # start method is spawn, and spawned workers would re-import torch.
        # The workers only decode and resize on the CPU, so fork is safe even
        # after CUDA was initialized in this process.
        fork = "fork" if cfg.num_workers > 0 and "fork" in mp.get_all_start_methods() else None
        # Its own generator: each iter() of a DataLoader draws a worker base
        # seed, from torch's global RNG by default, which would shift the
        # training step's draws (CRD negatives) by every train and val epoch
        # started, so a resumed run would not replay the uninterrupted one.
        self._dl = DataLoader(self.dataset, batch_sampler=_ViewBatches(self, batches),
                              num_workers=cfg.num_workers, collate_fn=collate,
                              pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init,
                              multiprocessing_context=fork, persistent_workers=cfg.num_workers > 0,
                              generator=torch.Generator().manual_seed(cfg.seed))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        # Persistent workers: iter() reuses them; after an early break it
        # first discards what they had prefetched for the abandoned epoch.
        for student, teacher, labels, indices, vids in self._dl:
            yield self.finish_batch(student, labels, indices, vids, teacher)

    def close(self) -> None:
        # DataLoader has no public way to stop persistent workers short of
        # garbage collection; stop them now (the next epoch starts new ones).
        it = getattr(self._dl, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            self._dl._iterator = None
        self.dataset.close_files()

    def __del__(self):
        if "_dl" in self.__dict__:  # __init__ may have failed before creating it
            self.close()
