"""The webdataset shards of a converted store, read side (and their index).

Written by :class:`dataset_tools.stores.writers.ShardWriter`; read by the
reference backend (tar headers, :func:`index_shards`), the DALI feed (DALI's
``.idx`` files, :class:`ShardTable`) and ``verify`` (a streaming walk,
:func:`iter_tar_samples`). This is the one place that knows the format:

* a shard is a plain (USTAR) tar; a sample is a run of consecutive regular
  file members sharing a key, the member path up to the first dot of its
  base name (the webdataset / ``wds2idx`` rule, :func:`split_name`);
* keys are the zero-padded sample index (:func:`sample_key`, ``%08d``); the
  members are ``KEY.jpg`` or ``KEY.png`` (the image; ``jpeg`` is read too),
  ``KEY.cls`` (label, ASCII int), ``KEY.index`` (sample index, ASCII int)
  and ``KEY.sha256`` (hex sha256 of the source file);
* the index file next to each tar is DALI's own format, written by DALI's
  ``wds2idx`` (:func:`make_index`): a header line ``v1.x N``, then one line
  per sample of ``ext offset size name`` groups, one per member, where
  ``offset`` is the member's data offset in the tar.

Damage found while reading raises :class:`StoreError` naming the file and
the fix (re-run the conversion).
"""
from __future__ import annotations

import functools
import os
import tarfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dataset_tools.stores.layout import MANIFEST_NAME, Store, StoreError

IMAGE_EXTS = ("jpg", "jpeg", "png")  # image members, in the order a sample's one is picked
LABEL_EXT, INDEX_EXT, SHA256_EXT = "cls", "index", "sha256"
SMALL_EXTS = (LABEL_EXT, INDEX_EXT, SHA256_EXT)  # members whose bytes a tar scan reads


def sample_key(index: int) -> str:
    """The webdataset key of sample ``index``."""
    return f"{int(index):08d}"


def split_name(name: str) -> tuple[str, str]:
    """Member path -> ``(key, ext)``: the key runs up to the first dot of the
    base name (directories kept), the extension is the rest ('' if none)."""
    head, sep, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return head + sep + key, ext


def make_index(tar_path: Path, idx_path: Path) -> None:
    """Write ``tar_path``'s index file: DALI's own format, by DALI's ``wds2idx`` tool."""
    from wds2idx import IndexCreator

    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()


# --------------------------------------------------------------------------- tar headers
class UnreadableShard(StoreError):
    """``tarfile`` cannot read a shard; ``reason`` is its error."""

    def __init__(self, tar_path, reason):
        self.path, self.reason = Path(tar_path), reason
        super().__init__(f"{tar_path}: unreadable webdataset shard ({reason}); re-run the "
                         f"conversion")


@dataclass(frozen=True)
class TarSample:
    """One sample of a shard, as its tar headers give it."""

    key: str
    members: dict  # ext -> (data offset in the tar, size)
    data: dict  # ext -> bytes, for the members in SMALL_EXTS

    @property
    def image_ext(self) -> Optional[str]:
        """The image member's extension (the first of IMAGE_EXTS present), or None."""
        return next((e for e in IMAGE_EXTS if e in self.members), None)


def iter_tar_samples(tar_path) -> Iterator[TarSample]:
    """Stream a shard's samples in tar order from its headers, reading only
    the small members' bytes (image members are located, not read).
    Raises :class:`UnreadableShard` when ``tarfile`` fails, possibly after
    some samples. Close the generator (``contextlib.closing``) when stopping
    early, so the tar is closed at once."""
    key, members, data = None, {}, {}
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = split_name(m.name)
                if k != key and key is not None:
                    yield TarSample(key, members, data)
                    members, data = {}, {}
                key = k
                members[ext] = (m.offset_data, m.size)
                if ext in SMALL_EXTS:
                    data[ext] = tf.extractfile(m).read()
    except tarfile.TarError as e:
        raise UnreadableShard(tar_path, e) from e
    if key is not None:
        yield TarSample(key, members, data)


@dataclass
class ShardIndex:
    """Where each sample's image bytes lie in the webdataset tars (by sample
    index), from the tar headers; with each sample's label."""

    tars: list[str]
    shard: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n], byte offset of the image data in its tar
    size: np.ndarray  # int64 [n]
    is_jpeg: np.ndarray  # bool [n]
    labels: np.ndarray  # int64 [n]


def index_shards(store: Store) -> ShardIndex:
    """Scan the tar headers once (``tarfile`` gives each member's data offset)
    and read the small ``.cls`` / ``.index`` members; the sample index is the
    ``.index`` member's. Checked against the manifest so a damaged store
    fails here, not mid-epoch."""
    n = store.num_samples
    shard = np.full(n, -1, dtype=np.int32)
    offset = np.zeros(n, dtype=np.int64)
    size = np.zeros(n, dtype=np.int64)
    is_jpeg = np.zeros(n, dtype=np.bool_)
    labels = np.full(n, -1, dtype=np.int64)
    tars = []
    for s, (tar_path, _idx) in enumerate(store.dali_shards()):
        tars.append(str(tar_path))
        with closing(iter_tar_samples(tar_path)) as samples:
            for smp in samples:
                img_ext = smp.image_ext
                if img_ext is None or LABEL_EXT not in smp.data or INDEX_EXT not in smp.data:
                    raise StoreError(f"{tar_path}: sample {smp.key!r} lacks an image/.cls/.index "
                                     f"member (has {sorted(smp.members)}); re-run the conversion")
                try:
                    i = int(smp.data[INDEX_EXT])
                    label = int(smp.data[LABEL_EXT])
                except ValueError as e:
                    raise StoreError(f"{tar_path}: sample {smp.key!r} has a non-integer "
                                     f".index/.cls ({e}); re-run the conversion") from e
                if not 0 <= i < n or shard[i] != -1:
                    raise StoreError(f"{tar_path}: sample {smp.key!r} has index {i}, out of range "
                                     f"[0, {n}) or duplicated; re-run the conversion")
                shard[i], (offset[i], size[i]) = s, smp.members[img_ext]
                is_jpeg[i], labels[i] = img_ext != "png", label
    if (shard < 0).any():
        missing = np.flatnonzero(shard < 0)
        raise StoreError(f"{store.root}: the webdataset shards lack {missing.size} of {n} samples "
                         f"(first: {missing[:5].tolist()}); re-run the conversion")
    bad_label = labels.min() < 0 or labels.max() >= store.num_classes
    if bad_label or np.bincount(labels, minlength=store.num_classes).tolist() != list(
            store.manifest["class_counts"]):
        raise StoreError(f"{store.root}: labels in the webdataset shards do not match the "
                         f"manifest's class_counts; re-run the conversion")
    return ShardIndex(tars, shard, offset, size, is_jpeg, labels)


# --------------------------------------------------------------------------- index files
def read_index(idx_path) -> tuple[np.ndarray, ...]:
    """One index file -> ``(keys, img_off, img_len, cls_off, cls_len)``,
    read-only int64 arrays, one row per sample line; the key is the image
    member's name up to its first dot, as an integer. Parsed once per
    (path, mtime, size): loaders recreated every epoch do not parse again."""
    st = os.stat(idx_path)
    return _parse_index(str(idx_path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _parse_index(idx_path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, ...]:
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
                elif ext == LABEL_EXT:
                    rows[r, 3], rows[r, 4] = off, ln
                    found |= 2
        except ValueError:
            found = -1
        if found != 3:
            raise StoreError(f"{idx_path}: sample line {r + 1} is malformed or lacks an image or "
                             f"a .cls member; re-run dataset_tools/convert.py --formats dali")
    keys = rows[:, 0]
    uniq, counts = np.unique(keys, return_counts=True)
    if uniq.size != keys.size:
        raise StoreError(f"{idx_path}: sample key {int(uniq[counts > 1][0]):08d} listed more than "
                         f"once; re-run dataset_tools/convert.py --formats dali")
    out = tuple(np.ascontiguousarray(rows[:, c]) for c in range(5))
    for a in out:  # shared through the cache
        a.setflags(write=False)
    return out


class ShardTable:
    """Where each sample's image and label live: shard number and byte ranges,
    indexed by sample index (the webdataset key), from the index files."""

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
            keys, io, il, co, cl = read_index(idx)
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
