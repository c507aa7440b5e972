"""Manifest pieces: fingerprint, pixel digests, statistics, the manifest dict.

Everything here is computed from exact integers or hashes accumulated in
sample order, so the manifest is byte-identical across runs and worker counts.
The schema is documented in ``dataset_tools/stores/layout.py``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from dataset_tools.stores.layout import FORMAT_VERSION

TOOL_NAME = "cqkd-convert"
TOOL_VERSION = "1.0.0"


class Fingerprint:
    """sha256 over, per sample in order: the 32-byte sha256 of the source
    file's bytes followed by the label as little-endian int64."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, source_sha256_hex: str, label: int) -> None:
        self._h.update(self.entry(source_sha256_hex, label))

    @staticmethod
    def entry(source_sha256_hex: str, label: int) -> bytes:
        """The 40 bytes one sample adds (a resumed conversion replays them)."""
        return bytes.fromhex(source_sha256_hex) + int(label).to_bytes(8, "little", signed=True)

    def update_entries(self, entries: bytes) -> None:
        """Add samples' :meth:`entry` bytes, concatenated in sample order."""
        self._h.update(entries)

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def sample_pixel_digest(rgb: np.ndarray) -> bytes:
    """sha256 of one image: height and width (uint32 LE) then the HxWx3 bytes."""
    h, w = rgb.shape[:2]
    d = hashlib.sha256(int(h).to_bytes(4, "little") + int(w).to_bytes(4, "little"))
    d.update(np.ascontiguousarray(rgb, dtype=np.uint8).data)
    return d.digest()


class PixelDigest:
    """``pixel_sha256`` of a store: sha256 over the per-sample digests in order.
    Workers hash samples in parallel; the store digest only chains 32 bytes
    per sample."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, sample_digest: bytes) -> None:
        self._h.update(sample_digest)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


_LEVELS = np.arange(256, dtype=np.int64)


def channel_sums(rgb: np.ndarray) -> tuple[list[int], list[int]]:
    """Exact per-channel sum and sum of squares (Python ints), so the
    aggregate is independent of how samples are chunked. Computed from
    per-channel histograms (OpenCV's calcHist, ~40x faster than widening the
    pixels to int64); its float32 bin counts are exact below 2**24 pixels."""
    if rgb.shape[0] * rgb.shape[1] < 1 << 24:
        hist = np.stack([cv2.calcHist([rgb], [c], None, [256], [0, 256]).ravel()
                         for c in range(3)]).astype(np.int64)
    else:
        hist = np.stack([np.bincount(rgb[..., c].ravel(), minlength=256) for c in range(3)])
    return [int(v) for v in hist @ _LEVELS], [int(v) for v in hist @ (_LEVELS * _LEVELS)]


@dataclass
class DatasetStats:
    """Running statistics over the stored full-resolution samples."""

    num_classes: int
    class_counts: list[int] = field(default_factory=list)
    pixels: int = 0
    sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    sumsq: list[int] = field(default_factory=lambda: [0, 0, 0])
    min_h: int = 0
    max_h: int = 0
    min_w: int = 0
    max_w: int = 0
    total_h: int = 0
    total_w: int = 0
    count: int = 0

    def __post_init__(self) -> None:
        self.class_counts = [0] * self.num_classes

    def to_dict(self) -> dict:
        """Exact (integers only), for a conversion's checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetStats":
        stats = cls(d["num_classes"])
        for k, v in d.items():
            setattr(stats, k, v)
        return stats

    def update(self, label: int, h: int, w: int, sums: list[int], sumsq: list[int]) -> None:
        self.class_counts[label] += 1
        first = self.count == 0
        self.min_h = h if first else min(self.min_h, h)
        self.min_w = w if first else min(self.min_w, w)
        self.max_h, self.max_w = max(self.max_h, h), max(self.max_w, w)
        self.total_h += h
        self.total_w += w
        self.count += 1
        self.pixels += h * w
        for c in range(3):
            self.sums[c] += sums[c]
            self.sumsq[c] += sumsq[c]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std on the 0..1 scale."""
        n = self.pixels
        if n == 0:
            return [0.0] * 3, [0.0] * 3
        mean = [s / n / 255.0 for s in self.sums]
        # var = (n*sumsq - sum^2) / n^2, computed in exact integers first.
        std = [math.sqrt(max(n * q - s * s, 0)) / n / 255.0 for s, q in zip(self.sums, self.sumsq)]
        return [round(m, 8) for m in mean], [round(s, 8) for s in std]

    def image_size(self) -> dict:
        c = max(self.count, 1)
        return {"min_h": self.min_h, "max_h": self.max_h, "min_w": self.min_w,
                "max_w": self.max_w, "mean_h": round(self.total_h / c, 4),
                "mean_w": round(self.total_w / c, 4)}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(*, split: str, source: dict, classes: list[str], stats: DatasetStats,
                   fingerprint: str, options: dict, stores: dict,
                   skipped: list[tuple[str, str]], holdout: Optional[dict] = None) -> dict:
    """The manifest dict (schema: ``dataset_tools/stores/layout.py``). ``holdout``:
    the train/val split record of a ``--val-fraction`` conversion; None (a
    store converted whole) leaves the key out."""
    mean, std = stats.mean_std()
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "split": split,
        "source": source,
        "num_samples": stats.count,
        "num_classes": len(classes),
        "classes": {name: i for i, name in enumerate(classes)},
        "class_counts": stats.class_counts,
        "mean": mean,
        "std": std,
        "image_size": stats.image_size(),
        "fingerprint": fingerprint,
        "options": options,
        "stores": stores,
        "skipped": [{"file": f, "reason": r} for f, r in skipped],
    }
    if holdout is not None:
        manifest["holdout"] = {**holdout,
                               "source_positions": [int(i) for i in holdout["source_positions"]]}
    return manifest


_POSITIONS_TOKEN = '"@@source_positions@@"'


def dumps(manifest: dict) -> str:
    """Indented JSON plus a newline; ``holdout.source_positions`` (one int per
    sample) goes on one line instead of one line per int."""
    holdout = manifest.get("holdout")
    if not isinstance(holdout, dict) or "source_positions" not in holdout:
        return json.dumps(manifest, indent=2) + "\n"
    marked = {**holdout, "source_positions": json.loads(_POSITIONS_TOKEN)}
    text = json.dumps({**manifest, "holdout": marked}, indent=2)
    if text.count(_POSITIONS_TOKEN) != 1:  # the token also occurs elsewhere: plain layout
        return json.dumps(manifest, indent=2) + "\n"
    return text.replace(_POSITIONS_TOKEN, json.dumps(holdout["source_positions"])) + "\n"


def summary(manifest: dict) -> str:
    """A few lines for the end of a conversion / verify."""
    counts = manifest["class_counts"]
    size = manifest["image_size"]
    lines = [
        f"split '{manifest['split']}': {manifest['num_samples']} samples, "
        f"{manifest['num_classes']} classes (per class {min(counts, default=0)}..{max(counts, default=0)})",
        f"  source: {manifest['source']['description']}",
        f"  image size: h {size['min_h']}..{size['max_h']}, w {size['min_w']}..{size['max_w']}",
        "  mean " + ", ".join(f"{v:.4f}" for v in manifest["mean"])
        + "  std " + ", ".join(f"{v:.4f}" for v in manifest["std"]),
        f"  fingerprint {manifest['fingerprint']}",
    ]
    if "holdout" in manifest:
        h = manifest["holdout"]
        lines.append(f"  holdout: {h['role']} part of {h['source']} (val fraction "
                     f"{h['val_fraction']}, seed {h['seed']}, {len(h['source_positions'])} "
                     f"source positions)")
    stores = manifest["stores"]
    if "ffcv" in stores:
        lines.append(f"  ffcv: {stores['ffcv']['path']} ({manifest['options']['write_mode']})")
    if "ffcv_lowres" in stores:
        lo = stores["ffcv_lowres"]
        lines.append(f"  ffcv_lowres: {lo['path']} (shorter side <= {lo['resolution']}, raw)")
    if "dali" in stores:
        shards = stores["dali"]["shards"]
        lines.append(f"  dali: {len(shards)} webdataset shard(s) in "
                     f"{Path(shards[0]['tar']).parent if shards else '-'} (.{stores['dali']['image_ext']})")
    if manifest["skipped"]:
        lines.append(f"  skipped {len(manifest['skipped'])} bad file(s), listed in manifest.json")
    return "\n".join(lines)
