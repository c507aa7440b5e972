"""Store writers: FFCV ``.beton`` (full-res and low-res) and webdataset shards.

Both writers consume samples one at a time, in sample order, from the main
process, so memory stays bounded and the bytes on disk do not depend on how
many decode workers ran.

Why not ``ffcv.writer.DatasetWriter.from_indexed_dataset``: with several
workers it lays pages out in completion order (non-deterministic bytes), and
with one worker it decodes and JPEG-encodes serially in a child process. We
reuse its pieces instead (``prepare``/``finalize`` for the header, field
descriptors, metadata and allocation table; ``MemoryAllocator`` for pages;
``handle_sample`` for the per-sample retry across page boundaries) and feed
them, in order, records that our worker pool already encoded.

Resuming (``dataset_tools/resume.py``): at a checkpoint each writer flushes
and fsyncs its files and reports what it added since the previous checkpoint
(``BetonWriter``: the metadata rows and page allocations; ``ShardWriter``:
nothing per sample) and the state to go on from (file length, the page being
filled, the open shard's length). A writer rebuilt from those truncates its
files to the recorded lengths and continues, so its bytes equal an
uninterrupted run's. Pages and tar members are only ever appended, and the
``.beton`` header and metadata region are rewritten whole at ``close``, so
the recorded prefix is all that the continuation depends on.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import dataset_tools.ffcv_import  # noqa: F401 (FFCV without its torch-threads side effect)
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample

from dataset_tools.errors import CqkdError
from dataset_tools.stores.ffcv_codec import JPG_MODE, RAW_MODE, ImageRecord
from dataset_tools.stores.manifest import file_sha256
from dataset_tools.stores.webdataset import make_index, sample_key

DEFAULT_PAGE_SIZE = 4 * MIN_PAGE_SIZE  # FFCV's default (8 MiB)
if (JPG_MODE, RAW_MODE) != (IMAGE_MODES["jpg"], IMAGE_MODES["raw"]):
    raise ImportError(f"this FFCV numbers its image modes {dict(IMAGE_MODES)}; "
                      f"dataset_tools/stores/ffcv_codec.py expects FFCV 1.0.2's (jpg 0, raw 1)")


class RecordTooLarge(CqkdError, ValueError):
    """An image record that cannot fit in one FFCV page."""


class ResumeMismatch(CqkdError):
    """Partial output on disk that does not match its checkpoint (shorter, or
    missing): the caller discards the partial work and starts over."""


class _PreparedImageEncoder:
    """Writes an :class:`ImageRecord` into an ``RGBImageField`` metadata row
    exactly as ``RGBImageField.encode`` does after its own resize/encode step
    (which our workers already ran, in parallel)."""

    @staticmethod
    def encode(destination, rec: ImageRecord, malloc) -> None:
        destination["mode"] = rec.mode
        destination["height"], destination["width"] = rec.height, rec.width
        destination["data_ptr"], storage = malloc(rec.payload.nbytes)
        storage[:] = rec.payload


class _LocalBuffer:
    """Stands in for the SharedMemory that DatasetWriter.finalize reads ``.buf`` from."""

    def __init__(self, size: int):
        self.buf = memoryview(bytearray(size))


def page_size_for(max_resolution: int | None) -> int:
    """FFCV stores each record inside one page: make pages big enough for a
    raw image at ``max_resolution`` (power of two, at least FFCV's default)."""
    need = 3 * max_resolution * max_resolution if max_resolution else 0
    size = DEFAULT_PAGE_SIZE
    while size < need:
        size *= 2
    return size


class BetonWriter:
    """Streams samples (image, label, index) into one FFCV ``.beton``.

    ``capacity`` is the most samples it may receive (the source's item
    count); when bad files are skipped the unused metadata rows stay zero,
    unread, because the header records the real count.
    """

    def __init__(self, path: Path, image_field: RGBImageField, capacity: int,
                 page_size: int = DEFAULT_PAGE_SIZE, resume: Optional["BetonResume"] = None):
        self.path = Path(path)
        fields = {"image": image_field, "label": IntField(), "index": IntField()}
        self._writer = DatasetWriter(str(self.path), fields, page_size=page_size, num_workers=1)
        self._writer.num_samples = capacity
        if resume is None:
            self._writer.prepare()  # header placeholder, field descriptors, metadata buffer
        else:
            # prepare() computes the layout and (re)writes the file's head, which
            # is already there: run it against /dev/null, then cut the file back
            # to its length at the checkpoint.
            self._writer.fname = os.devnull
            self._writer.prepare()
            self._writer.fname = str(self.path)
            _truncate(self.path, resume.file_size)
        # prepare() puts the metadata in POSIX shared memory for its worker
        # processes; we write in-process, so swap it for plain memory, which
        # cannot leak in /dev/shm when a run is killed.
        shm = self._writer.metadata_sm
        shm.close()
        shm.unlink()
        self._writer.metadata_sm = _LocalBuffer(capacity * self._writer.metadata_type.itemsize)
        self._metadata = np.frombuffer(self._writer.metadata_sm.buf,
                                       dtype=self._writer.metadata_type)
        self._names = self._writer.metadata_type.names
        self._encoders = {"image": _PreparedImageEncoder, "label": fields["label"],
                          "index": fields["index"]}
        self._alloc = MemoryAllocator(str(self.path), self._writer.data_region_start, page_size)
        self._alloc.__enter__()
        self.page_size = page_size
        self.capacity = capacity
        self.count = 0
        self._saved_count = self._saved_allocs = 0  # what the last checkpoint covered
        if resume is not None:
            self._restore(resume)

    def add(self, image: ImageRecord, label: int, index: int, name: str = "") -> None:
        if self.count >= self.capacity:
            raise RuntimeError(f"{self.path}: more samples than the declared {self.capacity}")
        if image.payload.nbytes > self.page_size:
            raise RecordTooLarge(
                f"{name or f'sample {index}'}: its {image.payload.nbytes}-byte image record is "
                f"larger than the FFCV page ({self.page_size} bytes); pass --max-resolution "
                f"(e.g. 512) or --write-mode jpg")
        handle_sample((image, int(label), int(index)), self.count, self._names,
                      self._metadata, self._alloc, self._encoders)
        self.count += 1

    def checkpoint(self) -> "BetonResume":
        """Flush and fsync; -> what was added since the last checkpoint and the
        state to continue from (the page being filled is kept in memory by
        FFCV's allocator and flushed only when full, so it travels here)."""
        a = self._alloc
        os.fsync(a.fp.fileno())
        rows = self._metadata[self._saved_count:self.count].tobytes()
        allocs = np.array(a.allocations[self._saved_allocs:], dtype=np.uint64).reshape(-1, 3)
        state = BetonResume(count=self.count, file_size=os.fstat(a.fp.fileno()).st_size,
                            page=int(a.my_page), page_offset=int(a.page_offset),
                            page_data=a.page_data[:a.page_offset].tobytes(),
                            rows=np.frombuffer(rows, np.uint8), allocs=allocs)
        self._saved_count, self._saved_allocs = self.count, len(a.allocations)
        return state

    def _restore(self, r: "BetonResume") -> None:
        rows = np.frombuffer(r.rows.tobytes(), dtype=self._writer.metadata_type)
        if len(rows) != r.count or r.count > self.capacity:
            raise ResumeMismatch(f"{self.path}: checkpoint holds {len(rows)} metadata rows for "
                                 f"{r.count} samples (capacity {self.capacity})")
        self._metadata[:r.count] = rows
        a = self._alloc
        a.allocations = [tuple(int(v) for v in row) for row in r.allocs]
        if r.page >= 0:  # a page is being filled: pages before it are on disk
            a.my_page, a.page_offset = r.page, r.page_offset
            a.page_data[:r.page_offset] = np.frombuffer(r.page_data, np.uint8)
            a.next_page_allocated.value, a.next_page_written.value = r.page + 1, r.page
        self.count = self._saved_count = r.count
        self._saved_allocs = len(a.allocations)

    def close(self) -> None:
        self._alloc.__exit__(None, None, None)  # flushes the last page
        self._writer.header["num_samples"] = self.count
        self._writer.finalize(self._alloc.allocations)  # metadata, alloc table, header
        self._free()

    def abort(self) -> None:
        try:
            self._alloc.__exit__(None, None, None)
        finally:
            self._free()

    def _free(self) -> None:
        self._metadata = None
        self._writer.metadata_sm = None


@dataclass
class BetonResume:
    """A :class:`BetonWriter` at a checkpoint. From :meth:`BetonWriter.checkpoint`,
    ``rows`` (metadata rows as bytes) and ``allocs`` (page allocations, [k, 3])
    hold only what was added since the previous checkpoint; :meth:`combine`
    joins a run of checkpoints into the whole state a writer is rebuilt from."""

    count: int              # samples written
    file_size: int          # bytes on disk (header, descriptors, full pages)
    page: int               # the page being filled (-1: none yet)
    page_offset: int        # bytes used in it
    page_data: bytes        # those bytes
    rows: np.ndarray
    allocs: np.ndarray

    SCALARS: ClassVar[tuple[str, ...]] = ("count", "file_size", "page", "page_offset")

    def scalars(self) -> dict:
        return {k: int(getattr(self, k)) for k in self.SCALARS}

    @classmethod
    def combine(cls, scalars: dict, page_data: bytes, rows: list[np.ndarray],
                allocs: list[np.ndarray]) -> "BetonResume":
        return cls(**{k: int(scalars[k]) for k in cls.SCALARS}, page_data=page_data,
                   rows=np.concatenate(rows) if rows else np.zeros(0, np.uint8),
                   allocs=np.concatenate(allocs) if allocs else np.zeros((0, 3), np.uint64))


def _truncate(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (what a checkpoint recorded)."""
    try:
        have = os.path.getsize(path)
    except OSError as e:
        raise ResumeMismatch(f"{path}: missing ({e.strerror})") from e
    if have < size:
        raise ResumeMismatch(f"{path}: {have} bytes, shorter than the {size} recorded")
    os.truncate(path, size)


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so the archive bytes depend on the content only.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes webdataset tar shards (``shard-%06d.tar``) plus their DALI index
    files under ``root/subdir``; members per sample: KEY.{jpg|png}, KEY.cls,
    KEY.index, KEY.sha256 with KEY = ``%08d`` of the sample index.

    ``resume``: a :meth:`checkpoint` state; shards it lists as closed are kept,
    the open one is cut back to its recorded length and later ones deleted."""

    def __init__(self, root: Path, subdir: str, samples_per_shard: int,
                 resume: Optional[dict] = None):
        if samples_per_shard < 1:
            raise ValueError("--samples-per-shard must be >= 1")
        self.root = Path(root)
        self.subdir = subdir
        (self.root / subdir).mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self.image_exts: set[str] = set()
        self._file = None  # the open shard's file; tarfile writes through it
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._synced = 0  # shards fsynced by a checkpoint
        if resume is not None:
            self._restore(resume)

    def _tar_path(self, number: int) -> Path:
        return self.root / self.subdir / f"shard-{number:06d}.tar"

    def add(self, index: int, ext: str, image: bytes, label: int, source_sha256: str) -> None:
        if self._tar is None:
            self._open()
        key = sample_key(index)
        for suffix, data in ((ext, image), ("cls", str(int(label)).encode()),
                             ("index", str(int(index)).encode()),
                             ("sha256", source_sha256.encode())):
            self._tar.addfile(_tar_member(f"{key}.{suffix}", len(data)), io.BytesIO(data))
        self.image_exts.add(ext)
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._close_shard()

    def _open(self, resume_at: Optional[int] = None) -> None:
        path = self._tar_path(len(self.shards))
        if resume_at is None:
            self._file = open(path, "wb")
            self._in_shard = 0
        else:
            self._file = open(path, "r+b")
            self._file.truncate(resume_at)
            self._file.seek(resume_at)
        # TarFile in "w" mode appends at the file object's position.
        self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _close_shard(self) -> None:
        tar_path = self._tar_path(len(self.shards))
        self._tar.close()  # end-of-archive blocks; leaves our file object open
        self._tar = None
        self._file.close()
        self._file = None
        idx_path = tar_path.with_suffix(".idx")
        make_index(tar_path, idx_path)
        self.shards.append({
            "tar": f"{self.subdir}/{tar_path.name}",
            "index": f"{self.subdir}/{idx_path.name}",
            "num_samples": self._in_shard,
            "sha256": file_sha256(tar_path),
        })

    def checkpoint(self) -> dict:
        """Flush and fsync -> the state :class:`ShardWriter` resumes from
        (JSON-able): closed shards, image kinds so far, the open shard's length."""
        offset = None
        if self._tar is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            offset = self._tar.offset
        for shard in self.shards[self._synced:]:  # closed since the last checkpoint
            for key in ("tar", "index"):
                with open(self.root / shard[key], "rb") as f:
                    os.fsync(f.fileno())
        self._synced = len(self.shards)
        return {"shards": [dict(s) for s in self.shards], "image_exts": sorted(self.image_exts),
                "open_offset": offset, "in_shard": self._in_shard if offset is not None else 0}

    def _restore(self, state: dict) -> None:
        self.shards = [dict(s) for s in state["shards"]]
        self.image_exts = set(state["image_exts"])
        self._synced = len(self.shards)
        for shard in self.shards:
            for key in ("tar", "index"):
                if not (self.root / shard[key]).is_file():
                    raise ResumeMismatch(f"{self.root / shard[key]}: missing")
        keep_open = state["open_offset"] is not None
        first_stale = len(self.shards) + (1 if keep_open else 0)
        for f in (self.root / self.subdir).iterdir():  # shards closed after the checkpoint
            m = re.fullmatch(r"shard-(\d{6})\.(tar|idx)", f.name)
            if m and (int(m[1]) >= first_stale or (keep_open and int(m[1]) == len(self.shards)
                                                   and m[2] == "idx")):
                f.unlink()
        if keep_open:
            _truncate(self._tar_path(len(self.shards)), state["open_offset"])
            self._open(resume_at=state["open_offset"])
            self._in_shard = int(state["in_shard"])

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def image_ext(self) -> str:
        """DALI ``ext`` spec for the image output: 'jpg', 'png' or 'jpg;png'."""
        return ";".join(sorted(self.image_exts)) or "jpg"
