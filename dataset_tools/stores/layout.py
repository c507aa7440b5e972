"""The converted store: its layout on disk and its manifest (read side).

Written by ``dataset_tools/convert.py``; read by every backend in
``pipelines/`` and by the teacher-logit cache. One OUT_DIR holds one split::

    OUT_DIR/
      manifest.json                  # written last; its presence means complete
      {split}.beton                  # FFCV: image (RGBImageField), label, index (IntField)
      {split}_lowres.beton           # optional, raw pixels at a reduced size
      {split}_wds/shard-000000.tar   # webdataset shards for DALI
      {split}_wds/shard-000000.idx   # DALI index files (wds2idx format)

Webdataset sample keys are the zero-padded sample index (``%08d``); members
are ``KEY.jpg`` or ``KEY.png`` (image), ``KEY.cls`` (label, ASCII int),
``KEY.index`` (sample index, ASCII int) and ``KEY.sha256`` (hex digest of the
source file's bytes, for ``verify`` to recompute the fingerprint). The image
member is the source file itself when it is a baseline RGB JPEG or a plain
8-bit RGB PNG within ``max_resolution``; otherwise it is re-encoded: JPEG
(``jpeg_quality``) for records FFCV stores as JPEG, else lossless PNG.

Manifest (``format_version`` 1), the keys every reader may rely on::

    format_version, tool {name, version}, split, source {kind, path, description},
    num_samples, num_classes, classes {name: index}, class_counts [count per index],
    mean [r, g, b], std [r, g, b]   (0..1 scale, over the stored full-res pixels,
                                     before any JPEG compression),
    image_size {min_h, max_h, min_w, max_w, mean_h, mean_w},
    fingerprint "sha256:<hex>"   (over source bytes and labels, in sample order:
                                  sha256 of, per sample, the 32-byte sha256 of the
                                  source file then the label as int64 little-endian),
    options {write_mode, max_resolution, jpeg_quality, student_resolution,
             min_crop_scale, max_aspect_ratio, compress_probability, lowres_side,
             formats, samples_per_shard, max_pixels, source_kind, hdf5_images,
             hdf5_labels, cifar_split, on_error},
    stores {                         (each present only when written)
      ffcv:        {path, num_samples, sha256, pixel_sha256},
      ffcv_lowres: {path, num_samples, sha256, resolution, pixel_sha256}   (optional),
      dali:        {image_ext, shards: [{tar, index, num_samples, sha256}]},
    },
    skipped [{file, reason}],
    holdout {role, val_fraction, seed, source, source_positions}   (optional, see below)

``holdout``: present only in the two stores of a ``convert.py --val-fraction F``
run (``dataset_tools/split.py``), absent in a store converted whole (whose
manifest is unchanged from before the option existed; ``Store.role`` reads
it as ``"whole"``). ``role``: ``"train"`` or ``"val"``; ``val_fraction``: F;
``seed``: ``--val-seed``; ``source``: SRC as given on the command line;
``source_positions``: sorted indices into the source listing
(``open_source(SRC).items``) of the samples this store holds, so sample ``i``
is source item ``source_positions[i]``. The two parts of one run are disjoint
and, with no file rejected, together the whole listing; they share
``classes`` (a class keeps its index even with few or no images in a part).
``split`` stays the split *name* used in the file names (``val`` for the val
part of a ``train`` split, else ``NAME-val``).

``sha256``: of the whole file. ``pixel_sha256``: sha256 over, per sample, the
sha256 of (height, width as uint32 LE, then the H x W x 3 uint8 pixels FFCV's
decoder returns). ``resolution``: the low-res shorter side S (images already
smaller keep their size). ``image_ext``: DALI ``ext`` for the image output,
``"jpg"``, ``"png"`` or ``"jpg;png"`` when both occur.

No timestamps: a rerun produces byte-identical files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dataset_tools.errors import CqkdError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class StoreError(CqkdError, RuntimeError):
    """A store is missing, incomplete or not the one expected."""


@dataclass(frozen=True)
class Store:
    """A converted split, located by its directory."""

    root: Path
    manifest: dict

    @property
    def split(self) -> str:
        return self.manifest["split"]

    @property
    def holdout(self) -> Optional[dict]:
        """The train/val split record (see the module doc); None for a whole store."""
        return self.manifest.get("holdout")

    @property
    def role(self) -> str:
        """``"train"`` / ``"val"`` for a part of a --val-fraction split, else ``"whole"``."""
        return (self.holdout or {}).get("role", "whole")

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["std"])

    def has(self, kind: str) -> bool:
        return kind in self.manifest.get("stores", {})

    def path(self, kind: str) -> Path:
        """Path of the FFCV file for ``ffcv`` / ``ffcv_lowres``."""
        self._require(kind)
        p = self.root / self.manifest["stores"][kind]["path"]
        if not p.is_file():
            raise StoreError(f"{p}: listed in {self.root / MANIFEST_NAME} but missing; "
                             f"re-run dataset_tools/convert.py for this split")
        return p

    def dali_shards(self) -> list[tuple[Path, Path]]:
        """``(tar, index)`` paths of the webdataset shards."""
        self._require("dali")
        out = []
        for sh in self.manifest["stores"]["dali"]["shards"]:
            tar, idx = self.root / sh["tar"], self.root / sh["index"]
            for p in (tar, idx):
                if not p.is_file():
                    raise StoreError(f"{p}: listed in {self.root / MANIFEST_NAME} but missing; "
                                     f"re-run dataset_tools/convert.py for this split")
            out.append((tar, idx))
        return out

    def _require(self, kind: str) -> None:
        if not self.has(kind):
            have = ", ".join(sorted(self.manifest.get("stores", {}))) or "none"
            hint = ("--student-resolution N" if kind == "ffcv_lowres"
                    else f"--formats {kind.split('_')[0]}")
            raise StoreError(f"{self.root}: this store has no '{kind}' data (it has: {have}); "
                             f"convert again with {hint}")


def open_store(root: os.PathLike | str, expected_fingerprint: Optional[str] = None) -> Store:
    """Open a converted split, checking it is complete and (optionally) the
    one expected. Raises :class:`StoreError` with the path and the fix."""
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise StoreError(f"{root}: no such store directory; convert the data first with "
                         f"'python dataset_tools/convert.py SRC {root}'")
    if not mpath.is_file():
        raise StoreError(f"{mpath}: missing, so the store is incomplete (an interrupted "
                         f"conversion?); re-run 'python dataset_tools/convert.py SRC {root}'")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{mpath}: unreadable manifest ({e}); re-run the conversion") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{mpath}: format_version {manifest.get('format_version')!r}, this "
                         f"version reads {FORMAT_VERSION}; re-run the conversion")
    if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
        raise StoreError(f"{mpath}: fingerprint {manifest['fingerprint']} differs from the "
                         f"expected {expected_fingerprint}: the data changed since the "
                         f"checkpoint/cache was made; point to the original store or rebuild "
                         f"what was derived from it")
    return Store(root=root, manifest=manifest)
