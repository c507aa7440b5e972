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
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
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
                 page_size: int = DEFAULT_PAGE_SIZE):
        self.path = Path(path)
        fields = {"image": image_field, "label": IntField(), "index": IntField()}
        self._writer = DatasetWriter(str(self.path), fields, page_size=page_size, num_workers=1)
        self._writer.num_samples = capacity
        self._writer.prepare()  # header placeholder, field descriptors, metadata buffer
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
    KEY.index, KEY.sha256 with KEY = ``%08d`` of the sample index."""

    def __init__(self, root: Path, subdir: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError("--samples-per-shard must be >= 1")
        self.root = Path(root)
        self.subdir = subdir
        (self.root / subdir).mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self.image_exts: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

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

    def _open(self) -> None:
        tar = self.root / self.subdir / f"shard-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close_shard(self) -> None:
        tar_path = Path(self._tar.name)
        self._tar.close()
        self._tar = None
        idx_path = tar_path.with_suffix(".idx")
        make_index(tar_path, idx_path)
        self.shards.append({
            "tar": f"{self.subdir}/{tar_path.name}",
            "index": f"{self.subdir}/{idx_path.name}",
            "num_samples": self._in_shard,
            "sha256": file_sha256(tar_path),
        })

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    @property
    def image_ext(self) -> str:
        """DALI ``ext`` spec for the image output: 'jpg', 'png' or 'jpg;png'."""
        return ";".join(sorted(self.image_exts)) or "jpg"
