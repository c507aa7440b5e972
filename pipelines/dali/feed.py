"""The DALI backend's feed: store access and one planned batch per call.

:class:`BatchSource` is the ``fn.external_source`` callback of
:mod:`pipelines.dali.loader`: for each batch of sample indices (the epoch
order and view ids are the loader's) it reads the encoded images from the
memory-mapped webdataset tars at the offsets in DALI's own ``.idx`` files
(:class:`ShardTable`, from :mod:`dataset_tools.stores.webdataset`), checks
them and their labels, and computes the crops.

The bytes go in as one zero-padded ``(n, longest)`` array, copied by a numba
loop, when that costs at most ~2x their size and every image ends with its
format's end marker (JPEG EOI, PNG IEND), so the decoder stops before the
padding. Otherwise (uneven sizes, a truncated or trailing-data file, and the
GPU decoders, which have not been run on padded input) they go in as one
zero-copy view per sample. The padded array exists because DALI's Python
feed checks and wraps each sample of a list (~5 us each), a large share of
the main thread's time when the images are small (measurements:
docs/design/loaders.md).
"""
from __future__ import annotations

import collections
import mmap
from typing import Optional

import numba
import numpy as np

from dataset_tools.stores.layout import StoreError
from dataset_tools.stores.webdataset import ShardTable
from pipelines.views import ViewConfig, box_to_pixels, view_params


def uniform_image_size(manifest: dict) -> Optional[tuple[int, int]]:
    """``(H, W)`` when the manifest says every stored image has that size."""
    size = manifest.get("image_size") or {}
    h, w = (size.get("min_h"), size.get("max_h")), (size.get("min_w"), size.get("max_w"))
    if h[0] is None or w[0] is None or h[0] != h[1] or w[0] != w[1] or h[0] < 1 or w[0] < 1:
        return None
    return int(h[0]), int(w[0])


class BatchSource:
    """The ``fn.external_source`` callback: one planned batch per call.

    Holds no reference to the loader or the pipeline (no reference cycle, so a
    dropped loader releases DALI's threads at once)."""

    # the padded feed (see _batch) while rows * longest <= ratio * bytes + slack
    max_pad_ratio = 2.0
    pad_slack_bytes = 64 << 10

    def __init__(self, table: ShardTable, views: ViewConfig, num_classes: int,
                 image_size: Optional[tuple[int, int]], may_pad: bool, whole_boxes: bool):
        self.table, self.views, self.num_classes = table, views, num_classes
        self.image_size = image_size  # (H, W) when every stored image has it
        # crops as fed: float64 (n, 4) boxes for the scaled decoder
        # (whole_boxes); else pixels, computed here when every image has one
        # size, or float64 starts/extents rounded in the graph
        self.box_format = ("boxes" if whole_boxes else
                           "pixels" if image_size is not None else "split")
        self.may_pad = may_pad  # the padded feed (CPU decoding only, see _batch)
        self._mmaps = []
        for tar in table.tars:
            with open(tar, "rb") as f:
                self._mmaps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        # plain ndarrays (np.memmap's subclass slicing costs ~10x more per sample)
        self.maps = [np.frombuffer(m, dtype=np.uint8) for m in self._mmaps]
        self._typed_maps = numba.typed.List(self.maps)  # for _gather_kernel
        self.start_epoch(np.zeros(0, np.int64), np.zeros(0, np.int64), 1)

    def start_epoch(self, order: np.ndarray, view_ids: np.ndarray, batch_size: int) -> None:
        self.order, self.view_ids, self.batch_size = order, view_ids, batch_size
        self.next_start = 0
        # (sample indices, view ids, (labels, boxes, flips), graph inputs) of
        # the batches handed to DALI and not yet returned: DALI reads the
        # inputs in place (no_copy), so they must stay alive until then
        self.fed = collections.deque()

    def stop(self) -> None:
        self.next_start = len(self.order)

    def __call__(self):
        lo = self.next_start
        if lo >= len(self.order):
            raise StopIteration
        hi = min(lo + self.batch_size, len(self.order))
        self.next_start = hi
        idx, vid = self.order[lo:hi], self.view_ids[lo:hi]
        inputs, extra = self._batch(idx, vid)
        self.fed.append((idx, vid, extra, inputs))
        return inputs

    def _batch(self, idx: np.ndarray, vid: np.ndarray) -> tuple:
        """``(graph inputs, (labels, boxes, flips))`` for these samples."""
        boxes, flips = view_params(self.views, idx, vid)
        t = self.table
        sh, io, il = t.shard[idx], t.img_off[idx], t.img_len[idx]
        # The bytes travel as one zero-padded (n, longest) array when that
        # costs at most ~2x their size and every image is complete (see
        # _gather_kernel): DALI's Python feed checks and wraps every sample of
        # a list (~5 us each), a large share of the main thread's time on
        # small images (docs/design/loaders.md). Only for the CPU decoder:
        # nvJPEG and the hardware decoder have not been run on padded input
        # (no GPU here), so they get the exact bytes.
        longest = int(il.max()) if len(idx) else 0
        fits = self.may_pad and (
            len(idx) * longest <= self.max_pad_ratio * int(il.sum()) + self.pad_slack_bytes)
        packed = np.empty((len(idx), longest if fits else 0), np.uint8)
        labels = np.empty(len(idx), np.int64)
        is_jpeg = np.empty(len(idx), np.bool_)
        bad, copied = _gather_kernel(self._typed_maps, sh, io, il, t.cls_off[idx],
                                     t.cls_len[idx], packed, labels, is_jpeg)
        if bad >= 0:
            k = int(idx[bad])
            raise StoreError(f"{self.table.tars[sh[bad]]}: sample {k:08d} is not a JPEG or "
                             f"PNG (damaged shard?); check the store with 'python "
                             f"dataset_tools/convert.py verify {self.table.root}' and re-run "
                             f"the conversion if it fails")
        wrong = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if wrong.size:
            k = int(idx[wrong[0]])
            raise StoreError(f"{self.table.tars[sh[wrong[0]]]}: sample {k:08d} has a label that "
                             f"is not an integer in 0..{self.num_classes - 1}; re-run the "
                             f"conversion")
        if copied:
            encoded = packed
        else:  # zero-copy views of the mmap, one per sample
            maps = self.maps
            encoded = [maps[s][o:o + n] for s, o, n in zip(sh.tolist(), io.tolist(), il.tolist())]
        extra = (labels, boxes, flips)
        if self.box_format == "boxes":
            return (encoded, boxes.astype(np.float64), flips.astype(np.int32), is_jpeg), extra
        if self.box_format == "pixels":  # crops in pixels, here (see pixel_boxes)
            anchors, shapes = pixel_boxes(boxes, *self.image_size)
            return (encoded, anchors, shapes, flips.astype(np.int32)), extra
        # float32 boxes (as reported in Batch.boxes), widened for the in-graph rounding
        starts = np.ascontiguousarray(boxes[:, :2], dtype=np.float64)
        extents = np.ascontiguousarray(boxes[:, 2:], dtype=np.float64)
        return (encoded, starts, extents, flips.astype(np.int32)), extra

    def close(self) -> None:
        self.maps = []
        self._typed_maps = None
        for m in self._mmaps:
            try:
                m.close()
            except BufferError:  # a batch still holds a view: unmapped when it is freed
                pass
        self._mmaps = []


_PNG_END = np.frombuffer(b"IEND\xaeB`\x82", np.uint8)  # the IEND chunk's type and CRC


@numba.njit(nogil=True, cache=True)
def _gather_kernel(maps, shard, img_off, img_len, cls_off, cls_len, packed, labels, is_jpeg):
    """Checks, and copies when it is safe, one batch's samples.

    Per sample ``i``: its ``.cls`` member parsed into ``labels[i]`` (-1
    unless plain ASCII digits, as the converter writes them); whether its
    image is a JPEG into ``is_jpeg[i]``; its image must
    start like a JPEG or a PNG (DALI 2.4's decoder segfaults the process,
    instead of raising, on data it cannot identify, e.g. a zeroed or
    overwritten header). When every image also ends with its format's end
    marker (JPEG EOI, PNG IEND) and ``packed`` has columns, the images are
    copied into its rows, zero padded: a decoder stops at the end marker, so
    it never reads the padding. A truncated image has no end marker; it is
    then not copied, and DALI sees its exact bytes and reports it.

    Returns ``(first sample with a bad signature or -1, copied)``."""
    bad, complete = -1, True
    for i in range(shard.shape[0]):
        m = maps[shard[i]]
        o, n = img_off[i], img_len[i]
        jpeg = n >= 8 and m[o] == 0xFF and m[o + 1] == 0xD8 and m[o + 2] == 0xFF
        png = (n >= 8 and m[o] == 0x89 and m[o + 1] == 0x50 and m[o + 2] == 0x4E
               and m[o + 3] == 0x47)
        if bad < 0 and not (jpeg or png):
            bad = i
        if jpeg:
            complete = complete and m[o + n - 2] == 0xFF and m[o + n - 1] == 0xD9
        elif png:
            for k in range(8):
                complete = complete and m[o + n - 8 + k] == _PNG_END[k]
        value = -1 if cls_len[i] < 1 or cls_len[i] > 18 else 0
        for k in range(cls_off[i], cls_off[i] + cls_len[i]):
            digit = np.int64(m[k]) - 48
            if value < 0 or digit < 0 or digit > 9:
                value = -1
                break
            value = value * 10 + digit
        labels[i] = value
        is_jpeg[i] = jpeg
    copy = bad < 0 and complete and packed.shape[1] > 0
    if copy:
        for i in range(shard.shape[0]):
            # element loops: ~4x faster than numba's slice assignment here
            row, src = packed[i], maps[shard[i]][img_off[i]:img_off[i] + img_len[i]]
            for j in range(src.shape[0]):
                row[j] = src[j]
            for j in range(src.shape[0], row.shape[0]):
                row[j] = 0
    return bad, copy


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
