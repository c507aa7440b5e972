"""DALI backend: webdataset shards -> ROI JPEG decode -> resize -> flip, on GPU or CPU.

One pipeline definition serves both devices; only a device string changes:
with CUDA the decoder runs as ``device='mixed'`` (nvJPEG, and the hardware
JPEG decoder where the GPU has one) and resize/flip/normalize follow on the
GPU; without CUDA the same graph is built with ``device_id=None`` and
``device='cpu'`` (libjpeg-turbo / libpng in DALI's CPU thread pool).

Why ``fn.external_source`` and not ``fn.readers.webdataset``
-------------------------------------------------------------
Crops must come from the view contract (:mod:`pipelines.views`), the same
boxes and flips as every other backend, so cached teacher logits match. The
webdataset reader shuffles with its own RNG and buffer, so Python would not
know which sample arrives next, and computing the splitmix64 view hash inside
the graph would need uint64 arithmetic DALI does not offer. So Python feeds
each batch: the encoded bytes (zero-copy views of the memory-mapped tars, at
the offsets listed in DALI's own ``.idx`` files), the normalized boxes and
flips from :func:`pipelines.views.view_params`, labels and sample indices.

Sampling and sharding are ours for the same reason: the epoch order is
``torch.utils.data.DistributedSampler`` (permutation seeded with
``seed + epoch``; for ``world_size > 1`` padded by repeating the first
samples up to ``world_size * samples_per_rank`` and dealt round-robin), i.e.
the reader's ``shard_id/num_shards`` is replaced by the sampler's
``rank/num_replicas``. Every sample appears exactly once per epoch across
ranks, plus the documented padding; the reader's own sharding would split by
contiguous file ranges and shuffle inside a buffer, which cannot reproduce a
global order shared with the other backends.

The external source runs in batch mode in the main thread, not as a parallel
(``parallel=True``) source: building a batch is ~256 zero-copy slices plus
numba calls (~0.6 ms for 256 images, against ~90 ms of decoding), and a
parallel-source prototype of this graph (one worker process) measured ~12%
more CPU per image on 2 cores (the worker's shared-memory copy of every JPEG)
for no gain in images/s. DALI still prefetches ``prefetch_queue_depth``
batches while the trainer works.

Crop rounding
-------------
Crops are :func:`pipelines.views.box_to_pixels` (round half up, clamped) of
the float32 boxes reported in ``Batch.boxes``, on each image's real size, so
they agree with ``box_to_pixels(*batch.boxes[i], H, W)`` to the pixel. When
the manifest's ``image_size`` says every stored image has one size (the
converter measures the stored pixels; e.g. imagenette-224, CIFAR), Python
computes the pixel boxes with ``box_to_pixels`` itself (a numba loop, a few
microseconds a batch) and feeds integer anchors. Otherwise the graph reads each size from
the encoded header (``fn.peek_image_shape``) and applies the same formula in
float64 DALI arithmetic (identical IEEE operations; ~8% more CPU per image on
imagenette -> 32 px, hence the fast path). The decoder then decodes only that
region (``fn.decoders.image_slice``: ROI decoding; libjpeg-turbo stops after
the crop's last row and skips the IDCT outside it).

Reduced-resolution decode
-------------------------
DALI 2.4's decoders (and nvImageCodec under them) expose no DCT-domain
scaling: no ``scale``/``scale_denom`` argument on ``fn.decoders.image*`` or in
``nvimgcodec.DecodeParams`` (checked against the operator schemas), so
``cfg.reduced_decode`` has no effect here. What exists: ROI decoding (used);
``use_fast_idct`` (libjpeg-turbo's fast integer IDCT) measured ~3% faster on
imagenette-224 full decodes but moves pixels by ~1 level on average (max 5)
away from PIL/torchvision, so it is not used; ``hw_decoder_load`` for the
A100/H100 hardware JPEG decoder (DALI's default kept). The GPU decoder uses
``jpeg_fancy_upsampling=True`` (libjpeg's chroma upsampling, as the CPU path
and PIL). EXIF orientation is ignored (``adjust_orientation=False``) so the
decoded pixel grid is the stored one, as PIL's ``Image.open`` gives it.

Output
------
Resize (antialiased linear: equal to torchvision's antialiased bilinear in the
interior to +-1 level; the outermost pixel ring differs because DALI extends
the crop's edge pixels where torchvision renormalizes the truncated filter),
then ``fn.crop_mirror_normalize``: flip, ``(x - mean) / std`` and the CHW
(HWC for ``channels_last``) layout in one operator, in DALI's thread pool
rather than on the training thread, handed to torch zero-copy through
DLPack. It multiplies by ``1/std``, so values may differ from
:meth:`BaseLoader.finish_batch`'s division by float32 rounding (the pixels
round-trip exactly; tested). Separate ``fn.flip``, arithmetic and
``fn.transpose`` operators gave bitwise equality but cost 18-25 % of the
throughput on CIFAR's 32 px PNGs (10.4-11.4k against 12.3-13.6k img/s, A/B
on 2 cores), where per-operator, per-sample overhead outweighs decoding.

Errors
------
Store problems raise :class:`StoreError` naming the file/sample and the fix.
Damage after conversion: each image's signature (JPEG SOI / PNG magic) is
checked before DALI sees it, because DALI 2.4 segfaults the process on data it
cannot identify. A decode error inside DALI (e.g. a truncated image) becomes a
StoreError naming the sample; DALI pipelines do not recover from operator
errors, so that loader then refuses to continue. Known limit: a JPEG whose
frame header is damaged (e.g. zero width/height) can still crash DALI 2.4's
decoder nondeterministically; ``python dataset_tools/convert.py verify DIR``
checks every sample against its stored sha256.
"""
from __future__ import annotations

import collections
import functools
import mmap
import os
import re
import weakref
from pathlib import Path
from typing import Iterator, Optional

import numba
import numpy as np
import torch
from torch.utils.data import DistributedSampler

from dataset_tools.store import MANIFEST_NAME, StoreError
from pipelines.batch import Batch
from pipelines.dali_import import import_dali
from pipelines.loader import BaseLoader, LoaderConfig
from pipelines.views import ViewConfig, box_to_pixels, view_params

IMAGE_EXTS = ("jpg", "jpeg", "png")


# --------------------------------------------------------------------------- store access
@functools.lru_cache(maxsize=64)
def _parse_index(idx_path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, ...]:
    """One wds2idx file -> (keys, img_off, img_len, cls_off, cls_len), int64.

    Cached by (path, mtime, size): loaders recreated every epoch parse once."""
    del mtime_ns, size  # cache key only
    with open(idx_path) as f:
        header = f.readline().split()
        lines = f.read().splitlines()
    if len(header) != 2 or not header[0].startswith("v1"):
        raise StoreError(f"{idx_path}: not a DALI webdataset index (header {header!r}); "
                         f"re-run dataset_tools/convert.py --formats dali")
    rows = np.zeros((len(lines), 5), dtype=np.int64)
    for r, line in enumerate(lines):
        tok = line.split()
        found = 0
        try:
            for j in range(0, len(tok) - 3, 4):  # groups of: ext offset size name
                ext, off, ln, name = tok[j], int(tok[j + 1]), int(tok[j + 2]), tok[j + 3]
                if ext in IMAGE_EXTS:
                    rows[r, 0], rows[r, 1], rows[r, 2] = int(name.split(".", 1)[0]), off, ln
                    found |= 1
                elif ext == "cls":
                    rows[r, 3], rows[r, 4] = off, ln
                    found |= 2
        except ValueError:
            found = -1
        if found != 3:
            raise StoreError(f"{idx_path}: sample line {r + 1} is malformed or lacks an image or "
                             f"a .cls member; re-run dataset_tools/convert.py --formats dali")
    return tuple(np.ascontiguousarray(rows[:, c]) for c in range(5))


class _ShardTable:
    """Where each sample's image and label live: shard number and byte ranges,
    indexed by sample index (the webdataset key)."""

    def __init__(self, shards: list[tuple[Path, Path]], num_samples: int, root: Path):
        n = num_samples
        self.root = root
        self.shard = np.full(n, -1, dtype=np.int32)
        self.img_off = np.zeros(n, dtype=np.int64)
        self.img_len = np.zeros(n, dtype=np.int64)
        self.cls_off = np.zeros(n, dtype=np.int64)
        self.cls_len = np.zeros(n, dtype=np.int64)
        self.tars = [tar for tar, _ in shards]
        for s, (tar, idx) in enumerate(shards):
            st = os.stat(idx)
            keys, io, il, co, cl = _parse_index(str(idx), st.st_mtime_ns, st.st_size)
            if keys.size and (keys.min() < 0 or keys.max() >= n):
                raise StoreError(f"{idx}: sample keys outside 0..{n - 1} (manifest num_samples); "
                                 f"the shards do not belong to {root / MANIFEST_NAME}")
            if (self.shard[keys] >= 0).any():
                raise StoreError(f"{idx}: sample keys repeated across shards; "
                                 f"re-run the conversion")
            tar_size = os.path.getsize(tar)
            if keys.size and (np.maximum(io + il, co + cl).max() > tar_size or (io < 0).any()):
                raise StoreError(f"{idx}: lists members beyond the end of {tar} (a truncated or "
                                 f"replaced shard?); re-run dataset_tools/convert.py")
            self.shard[keys] = s
            self.img_off[keys], self.img_len[keys] = io, il
            self.cls_off[keys], self.cls_len[keys] = co, cl
        missing = np.flatnonzero(self.shard < 0)
        if missing.size:
            raise StoreError(f"{root}: {missing.size} of {n} samples (first key {missing[0]:08d}) "
                             f"are in no DALI shard index; re-run dataset_tools/convert.py")


def uniform_image_size(manifest: dict) -> Optional[tuple[int, int]]:
    """``(H, W)`` when the manifest says every stored image has that size."""
    size = manifest.get("image_size") or {}
    h, w = (size.get("min_h"), size.get("max_h")), (size.get("min_w"), size.get("max_w"))
    if h[0] is None or w[0] is None or h[0] != h[1] or w[0] != w[1] or h[0] < 1 or w[0] < 1:
        return None
    return int(h[0]), int(w[0])


class _BatchSource:
    """The ``fn.external_source`` callback: one planned batch per call.

    Holds no reference to the loader or the pipeline (no reference cycle, so a
    dropped loader releases DALI's threads at once)."""

    def __init__(self, table: _ShardTable, views: ViewConfig, num_classes: int,
                 image_size: Optional[tuple[int, int]]):
        self.table, self.views, self.num_classes = table, views, num_classes
        self.image_size = image_size  # (H, W) when every stored image has it
        self._mmaps = []
        for tar in table.tars:
            with open(tar, "rb") as f:
                self._mmaps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        # plain ndarrays (np.memmap's subclass slicing costs ~10x more per sample)
        self.maps = [np.frombuffer(m, dtype=np.uint8) for m in self._mmaps]
        self.start_epoch(np.zeros(0, np.int64), np.zeros(0, np.int64), 1)

    def start_epoch(self, order: np.ndarray, view_ids: np.ndarray, batch_size: int) -> None:
        self.order, self.view_ids, self.batch_size = order, view_ids, batch_size
        self.next_start = 0
        # (sample indices, batch) handed to DALI and not yet returned: DALI
        # reads the batch in place (no_copy), so it must stay alive until then
        self.fed = collections.deque()

    def stop(self) -> None:
        self.next_start = len(self.order)

    def __call__(self):
        lo = self.next_start
        if lo >= len(self.order):
            raise StopIteration
        hi = min(lo + self.batch_size, len(self.order))
        self.next_start = hi
        idx = self.order[lo:hi]
        batch = self._batch(idx, self.view_ids[lo:hi])
        self.fed.append((idx, batch))
        return batch

    def _batch(self, idx: np.ndarray, vid: np.ndarray) -> tuple:
        boxes, flips = view_params(self.views, idx, vid)
        t, maps = self.table, self.maps
        sh, io, il, co, cl = (t.shard[idx], t.img_off[idx], t.img_len[idx],
                              t.cls_off[idx], t.cls_len[idx])
        self._check_signatures(idx, sh, io, il)
        # Per-sample slicing is unavoidable: external_source takes a list of
        # variable-length arrays; each slice is a zero-copy view of the mmap.
        encoded = [maps[s][o:o + n] for s, o, n in zip(sh.tolist(), io.tolist(), il.tolist())]
        mms = self._mmaps
        labels = np.array([int(mms[s][o:o + n]) for s, o, n in
                           zip(sh.tolist(), co.tolist(), cl.tolist())], dtype=np.int64)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            bad = idx[(labels < 0) | (labels >= self.num_classes)][0]
            raise StoreError(f"{self.table.tars[t.shard[bad]]}: sample {bad:08d} has a label "
                             f"outside 0..{self.num_classes - 1}; re-run the conversion")
        if self.image_size is not None:  # crops in pixels, here (see pixel_boxes)
            anchors, shapes = pixel_boxes(boxes, *self.image_size)
            return encoded, anchors, shapes, flips.astype(np.int32), idx, vid, labels
        # float32 boxes (as reported in Batch.boxes), widened for the in-graph rounding
        starts = np.ascontiguousarray(boxes[:, :2], dtype=np.float64)
        extents = np.ascontiguousarray(boxes[:, 2:], dtype=np.float64)
        return encoded, starts, extents, flips.astype(np.int32), idx, vid, labels

    def _check_signatures(self, idx, shard, offset, size) -> None:
        """Every image must start like a JPEG or a PNG: DALI 2.4's decoder
        segfaults the process (instead of raising) on data it cannot identify,
        e.g. a zeroed or overwritten header, so such damage is caught here."""
        head = np.zeros((len(idx), 4), np.uint8)
        ok = size >= 8
        for s in np.unique(shard):
            sel = (shard == s) & ok
            head[sel] = self.maps[s][offset[sel, None] + np.arange(4)]
        jpeg = (head[:, 0] == 0xFF) & (head[:, 1] == 0xD8) & (head[:, 2] == 0xFF)
        png = (head == np.frombuffer(b"\x89PNG", np.uint8)).all(axis=1)
        bad = np.flatnonzero(~(jpeg | png))
        if bad.size:
            k = int(idx[bad[0]])
            raise StoreError(f"{self.table.tars[shard[bad[0]]]}: sample {k:08d} is not a JPEG or "
                             f"PNG (damaged shard?); check the store with 'python "
                             f"dataset_tools/convert.py verify {self.table.root}' and re-run "
                             f"the conversion if it fails")

    def close(self) -> None:
        self.maps = []
        for m in self._mmaps:
            try:
                m.close()
            except BufferError:  # a batch still holds a view: unmapped when it is freed
                pass
        self._mmaps = []


@numba.njit(cache=True)
def _pixel_boxes_kernel(boxes, height, width, anchors, shapes):
    for i in range(boxes.shape[0]):
        top, left, ch, cw = box_to_pixels(float(boxes[i, 0]), float(boxes[i, 1]),
                                          float(boxes[i, 2]), float(boxes[i, 3]), height, width)
        anchors[i, 0], anchors[i, 1], shapes[i, 0], shapes[i, 1] = top, left, ch, cw


def pixel_boxes(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`box_to_pixels` over a batch of boxes on ``height x width``
    images: int32 ``(top, left)`` anchors and ``(h, w)`` shapes."""
    anchors = np.empty((len(boxes), 2), np.int32)
    shapes = np.empty((len(boxes), 2), np.int32)
    _pixel_boxes_kernel(np.ascontiguousarray(boxes), int(height), int(width), anchors, shapes)
    return anchors, shapes


# --------------------------------------------------------------------------- the graph
def pixel_box_nodes(encoded, starts, extents):
    """DALI graph nodes ``(anchor, shape)`` (int32, ``(y, x)`` / ``(h, w)``) of
    each sample's crop: :func:`pipelines.views.box_to_pixels` on the encoded
    image's real size, in float64 DALI arithmetic on 2-vectors (half the ops
    of a per-coordinate transcription; see module docstring).

    ``starts``/``extents``: float64 ``(y0, x0)`` / ``(h, w)`` per sample."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    hw = fn.peek_image_shape(encoded, adjust_orientation=False)[0:2]  # (H, W)
    top_left = dmath.min(dmath.floor(starts * hw + 0.5), hw - 1)
    size = dmath.max(1, dmath.min(dmath.floor(extents * hw + 0.5), hw - top_left))
    return fn.cast(top_left, dtype=types.INT32), fn.cast(size, dtype=types.INT32)


def _view_graph(source, decode_device: str, student_res: int, teacher_res: int,
                mean: np.ndarray, std: np.ndarray, channels_last: bool, boxes_in_pixels: bool):
    """Decode the crop once; resize it to the student (and teacher) size; flip;
    normalize; lay out as CHW (or HWC for channels_last)."""
    from nvidia.dali import fn, types

    box_type = types.INT32 if boxes_in_pixels else types.FLOAT64
    encoded, box_a, box_b, flips, indices, view_ids, labels = fn.external_source(
        source=source, num_outputs=7, batch=True, no_copy=True,  # JPEGs read in the mmap
        dtype=[types.UINT8, box_type, box_type, types.INT32, types.INT64, types.INT64,
               types.INT64])
    # pixel anchor/shape from Python (one image size) or from each image's header
    anchor, shape = (box_a, box_b) if boxes_in_pixels else pixel_box_nodes(encoded, box_a, box_b)
    crop = fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", device=decode_device,
                                   output_type=types.RGB, adjust_orientation=False,
                                   jpeg_fancy_upsampling=True)
    mean, std = np.asarray(mean, np.float32).tolist(), np.asarray(std, np.float32).tolist()
    layout = "HWC" if channels_last else "CHW"

    def view(res):
        # antialiased bilinear, like torchvision's resize(antialias=True); uint8 out
        img = fn.resize(crop, size=[res, res], interp_type=types.INTERP_LINEAR, antialias=True)
        # flip, (x - mean) / std and the layout in one operator (see the module docstring)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout=layout,
                                        mirror=flips, mean=mean, std=std)

    outs = [view(student_res), labels, indices, view_ids]
    if teacher_res > 0:
        outs.append(view(teacher_res))
    return tuple(outs)


# --------------------------------------------------------------------------- the loader
class DALILoader(BaseLoader):
    """See the module docstring. ``num_workers`` = DALI CPU threads (>= 1)."""

    prefetch_queue_depth = 2
    pipeline_options: dict = {}  # extra nvidia.dali.Pipeline arguments (benchmarks)

    def __init__(self, cfg: LoaderConfig, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__(cfg, rank=rank, world_size=world_size)
        if cfg.lowres:
            raise StoreError(f"{self.store.root}: the low-res companion store exists only as an "
                             f"FFCV file; use backend='ffcv' for lowres=True, or lowres=False "
                             f"(the dali backend resizes from the full-resolution shards)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1}")
        self._source = _BatchSource(
            _ShardTable(self.store.dali_shards(), self.store.num_samples, self.store.root),
            self.views, self.store.num_classes, uniform_image_size(self.store.manifest))
        self._pipe = None
        self._failure: Optional[StoreError] = None  # a decode error ends this loader
        # The generator currently driving the pipeline, weakly: it references the
        # loader, and a cycle would keep an abandoned loader (and DALI's threads)
        # alive until the garbage collector runs.
        self._active = None

    # -- epoch plan
    def epoch_order(self) -> np.ndarray:
        """Sample indices this rank visits this epoch, in order (padded, see docstring)."""
        sampler = DistributedSampler(range(self.store.num_samples), num_replicas=self.world_size,
                                     rank=self.rank, shuffle=self.cfg.shuffle, seed=self.cfg.seed)
        sampler.set_epoch(self.epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64, count=self.samples_per_rank)
        if self.cfg.drop_last:
            order = order[:len(self) * self.cfg.batch_size]
        return order

    # -- pipeline
    def _build_pipeline(self):
        import_dali()  # before any other DALI import: see pipelines/dali_import.py
        from nvidia.dali import pipeline_def

        cuda = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if cuda else None
        graph = pipeline_def(_view_graph, batch_size=self.cfg.batch_size,
                             num_threads=max(1, self.cfg.num_workers), device_id=device_id,
                             seed=self.cfg.seed & 0x7FFFFFFF,
                             prefetch_queue_depth=self.prefetch_queue_depth,
                             **self.pipeline_options)
        pipe = graph(self._source, "mixed" if cuda else "cpu", self.cfg.student_resolution,
                     self.cfg.teacher_resolution,
                     self._mean.view(3).cpu().numpy(), self._std.view(3).cpu().numpy(),
                     self.cfg.channels_last, self._source.image_size is not None)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        if self._source is None:
            raise RuntimeError("this DALILoader is closed; create a new one")
        if self._failure is not None:  # see _run_epoch: DALI does not recover
            raise self._failure
        self._stop_active()
        if self._pipe is None:
            self._pipe = self._build_pipeline()
        order = self.epoch_order()
        self._source.start_epoch(order, self.view_ids_for(order), self.cfg.batch_size)
        gen = self._run_epoch(self._pipe, -(-len(order) // self.cfg.batch_size))
        self._active = weakref.ref(gen)
        return gen

    def _run_epoch(self, pipe, num_batches: int) -> Iterator[Batch]:
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            for _ in range(num_batches):
                pipe.schedule_run()
                # DALI keeps the feed order; `fed` stays alive until outputs() returned
                indices, fed = self._source.fed.popleft()
                try:
                    out = pipe.outputs(stream)
                except RuntimeError as e:
                    self._failure = self._batch_error(indices, e)
                    raise self._failure from e
                student, labels, indices, view_ids = (torch.from_dlpack(o.as_tensor())
                                                      for o in out[:4])
                teacher = torch.from_dlpack(out[4].as_tensor()) if len(out) > 4 else None
                yield self.finish_batch(student, labels, indices, view_ids, teacher)
        except GeneratorExit:  # abandoned early (break, close, a new epoch)
            self._drain(pipe)
            raise
        except BaseException:
            # A DALI pipeline does not recover from an operator error (and DALI
            # 2.4 was seen to crash on the next one): drop it.
            self._source.stop()
            if self._pipe is pipe:
                self._pipe = None
            raise
        else:
            self._drain(pipe)

    def _batch_error(self, indices: np.ndarray, err: Exception) -> StoreError:
        """Name the sample DALI could not decode (its message gives the
        position in the batch) and the fix."""
        msg = str(err)
        m = re.search(r"Failed to decode sample #(\d+)", msg)
        if m and int(m.group(1)) < len(indices):
            what = f"sample {int(indices[int(m.group(1))]):08d}"
        else:
            what = "a batch with samples " + ", ".join(f"{i:08d}" for i in indices[:8]) + (
                " ..." if len(indices) > 8 else "")
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        # DALI's message: "... encountered:" then the operator's own error
        after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln.endswith("encountered:")]
        detail = after[0] if after else (lines[-1] if lines else type(err).__name__)
        return StoreError(f"{self.store.root}: DALI failed on {what} ({detail}); check the store "
                          f"with 'python dataset_tools/convert.py verify {self.store.root}' and "
                          f"re-run the conversion if it fails. This loader cannot continue.")

    def _drain(self, pipe) -> None:
        """End the epoch early or on time: no more input, discard prefetched
        batches, rearm the pipeline (so the next epoch prefetches again)."""
        self._source.stop()
        pipe.schedule_run()  # the source now raises StopIteration -> end of epoch
        while not pipe.empty():
            pipe.outputs()
        pipe.reset()
        self._source.fed.clear()

    def _stop_active(self) -> None:
        gen = self._active() if self._active is not None else None
        if gen is not None:
            gen.close()  # runs _run_epoch's finally (no-op if finished or never started)
        self._active = None

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The graph already normalized (bitwise as BaseLoader does, in DALI's
        thread pool instead of torch's): only move and lay out."""
        if not images.is_floating_point():
            return super()._normalize(images)
        if images.shape[1] != 3 and images.shape[-1] == 3:  # HWC (channels_last) -> NCHW view
            images = images.permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)

    def close(self) -> None:
        self._stop_active()
        self._pipe = None  # the last reference: DALI joins its threads and frees buffers
        if getattr(self, "_source", None) is not None:
            self._source.close()
            self._source = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass
