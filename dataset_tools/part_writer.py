"""One output store of a conversion: its writers and running totals.

A conversion writes one store (the whole source) or two (its train and val
parts, ``--val-fraction``). :class:`PartWriter` takes that store's prepared
samples in source order and appends them to the FFCV ``.beton``, the
low-res ``.beton`` and the webdataset shards, while keeping the manifest's
totals (statistics, fingerprint, pixel digests, source positions, skipped
files). :meth:`PartWriter.checkpoint` and ``PartWriter(resume=...)`` carry
all of it across a killed run (``dataset_tools/resume.py``): the hashes
cannot be saved, so each checkpoint keeps the per-sample bytes they consumed
since the previous one and a resumed run feeds them again, in order.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from dataset_tools.stores import manifest as mf
from dataset_tools.stores.writers import ResumeMismatch

if TYPE_CHECKING:
    from dataset_tools.convert_options import ConvertOptions
    from dataset_tools.records import Prepared
    from dataset_tools.resume import PartCheckpoint

DIGEST = 32  # bytes of one sample's pixel digest
FP_ENTRY = 40  # bytes of one sample's fingerprint entry


class PartWriter:
    """The writers of one output store, fed one prepared sample at a time."""

    def __init__(self, root: Path, split: str, opts: "ConvertOptions", capacity: int,
                 low_side: Optional[int], num_classes: int, listing_skipped: list,
                 resume: Optional["PartCheckpoint"] = None):
        from dataset_tools.stores.writers import BetonResume, BetonWriter, ShardWriter, \
            page_size_for
        from ffcv.fields import RGBImageField

        self.beton = self.lowres = self.shards = None
        self.low_side = low_side
        self.stats = mf.DatasetStats(num_classes)
        self.fp, self.digest, self.low_digest = mf.Fingerprint(), mf.PixelDigest(), mf.PixelDigest()
        self.skipped: list = list(listing_skipped)
        self.kept: list[int] = []  # source positions actually stored, in order
        # per-sample bytes since the last checkpoint (what the hashes consumed)
        self._fp_new, self._pix_new, self._low_new = bytearray(), bytearray(), bytearray()
        self._kept_saved = 0

        def writer_state(name: str) -> Optional[BetonResume]:
            if resume is None:
                return None
            if resume.meta.get(name) is None:
                raise ResumeMismatch(f"the checkpoint has no {name} state")
            return BetonResume.combine(resume.meta[name], resume.tail[f"{name}_page"].tobytes(),
                                       resume.arrays.get(f"{name}_rows", []),
                                       resume.arrays.get(f"{name}_allocs", []))

        try:
            if resume is not None:
                self._replay(resume)
            if "ffcv" in opts.formats:
                field = RGBImageField(write_mode=opts.write_mode,
                                      max_resolution=opts.max_resolution,
                                      jpeg_quality=opts.jpeg_quality,
                                      compress_probability=opts.compress_probability)
                self.beton = BetonWriter(root / f"{split}.beton", field, capacity,
                                         page_size_for(opts.max_resolution),
                                         resume=writer_state("beton"))
            if low_side:
                self.lowres = BetonWriter(root / f"{split}_lowres.beton",
                                          RGBImageField(write_mode="raw"), capacity,
                                          page_size_for(low_side * 2),
                                          resume=writer_state("lowres"))
            if "dali" in opts.formats:
                shard_state = None if resume is None else resume.meta.get("shards")
                if resume is not None and shard_state is None:
                    raise ResumeMismatch("the checkpoint has no webdataset shard state")
                self.shards = ShardWriter(root, f"{split}_wds", opts.samples_per_shard,
                                          resume=shard_state)
        except BaseException:
            self.abort()
            raise

    @property
    def count(self) -> int:
        return self.stats.count

    def add(self, pos: int, res: "Prepared") -> None:
        """Append one prepared sample (source position ``pos``)."""
        from dataset_tools.stores.writers import RAW_MODE, ImageRecord

        idx = self.stats.count
        if self.beton:
            self.beton.add(res.ffcv, res.label, idx, res.name)
            self.digest.update(res.ffcv_digest)
            self._pix_new += res.ffcv_digest
        if self.lowres:
            h, w = res.lowres.shape[:2]
            self.lowres.add(ImageRecord(RAW_MODE, h, w, res.lowres.reshape(-1)), res.label, idx,
                            res.name)
            self.low_digest.update(res.lowres_digest)
            self._low_new += res.lowres_digest
        if self.shards:
            self.shards.add(idx, res.wds_ext, res.wds_bytes, res.label, res.sha256)
        self.stats.update(res.label, res.height, res.width, res.sums, res.sumsq)
        entry = mf.Fingerprint.entry(res.sha256, res.label)
        self.fp.update_entries(entry)
        self._fp_new += entry
        self.kept.append(pos)

    def skip(self, file: str, reason: str) -> None:
        self.skipped.append((file, reason))

    # ------------------------------------------------------------------ resume
    def checkpoint(self) -> tuple[dict, dict, dict]:
        """Flush the writers -> (this chunk's arrays, tail arrays, JSON state)."""
        arrays = {"kept": np.array(self.kept[self._kept_saved:], np.int64),
                  "fp": np.frombuffer(bytes(self._fp_new), np.uint8),
                  "pix": np.frombuffer(bytes(self._pix_new), np.uint8),
                  "lowpix": np.frombuffer(bytes(self._low_new), np.uint8)}
        tail = {}
        meta = {"stats": self.stats.to_dict(), "skipped": [list(s) for s in self.skipped],
                "beton": None, "lowres": None, "shards": None}
        for name, w in (("beton", self.beton), ("lowres", self.lowres)):
            if w is not None:
                st = w.checkpoint()
                arrays[f"{name}_rows"], arrays[f"{name}_allocs"] = st.rows, st.allocs
                tail[f"{name}_page"] = np.frombuffer(st.page_data, np.uint8)
                meta[name] = st.scalars()
        if self.shards is not None:
            meta["shards"] = self.shards.checkpoint()
        self._fp_new, self._pix_new, self._low_new = bytearray(), bytearray(), bytearray()
        self._kept_saved = len(self.kept)
        return arrays, tail, meta

    def _replay(self, r: "PartCheckpoint") -> None:
        """Totals at the checkpoint: the statistics as saved, the hashes fed
        the chunks' per-sample bytes again in order."""
        self.stats = mf.DatasetStats.from_dict(r.meta["stats"])
        self.skipped = [tuple(s) for s in r.meta["skipped"]]
        for a in r.arrays.get("kept", []):
            self.kept.extend(int(v) for v in a)
        fp = b"".join(a.tobytes() for a in r.arrays.get("fp", []))
        self.fp.update_entries(fp)
        pix = b"".join(a.tobytes() for a in r.arrays.get("pix", []))
        low = b"".join(a.tobytes() for a in r.arrays.get("lowpix", []))
        self.digest.update(pix)
        self.low_digest.update(low)
        n = self.stats.count
        if len(self.kept) != n or len(fp) != n * FP_ENTRY or len(pix) not in (0, n * DIGEST) \
                or len(low) not in (0, n * DIGEST):
            raise ResumeMismatch(f"the checkpoint's per-sample records do not add up to its "
                                 f"{n} samples")
        self._kept_saved = n

    # ------------------------------------------------------------------ end
    def close(self) -> dict:
        """Finish every file -> the manifest's ``stores`` section."""
        stores = {}
        if self.beton:
            self.beton.close()
            stores["ffcv"] = {"path": self.beton.path.name, "num_samples": self.beton.count,
                              "sha256": mf.file_sha256(self.beton.path),
                              "pixel_sha256": self.digest.hexdigest()}
        if self.lowres:
            self.lowres.close()
            stores["ffcv_lowres"] = {"path": self.lowres.path.name,
                                     "num_samples": self.lowres.count,
                                     "sha256": mf.file_sha256(self.lowres.path),
                                     "resolution": self.low_side,
                                     "pixel_sha256": self.low_digest.hexdigest()}
        if self.shards:
            stores["dali"] = {"image_ext": self.shards.image_ext, "shards": self.shards.close()}
        return stores

    def abort(self) -> None:
        for w in (self.beton, self.lowres, self.shards):
            if w is not None:
                try:
                    w.abort()
                except Exception:  # already failing; the caller discards or resumes the files
                    pass
