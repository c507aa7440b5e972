"""Re-check a converted split against its manifest.

    python dataset_tools/convert.py verify OUT_DIR

Reads every store back the way the training loaders do (FFCV files through
``ffcv.loader.Loader`` on CPU, the webdataset shards by reading the tars) and
checks, against ``manifest.json``: file sha256s, sample counts, class counts,
labels (the same in every store), sample indices, the fingerprint
(recomputed from the ``KEY.sha256`` + ``KEY.cls`` members), the decoded-pixel
digests of the ``.beton`` files, the low-res size rule, that each DALI
``.idx`` file equals a fresh ``wds2idx`` run, and (for a part of a
``--val-fraction`` split) that the ``holdout`` record is well formed: one
sorted, distinct source position per sample. Exit status 0 when all agree,
1 with one line per problem otherwise.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from dataset_tools.errors import CqkdError
from dataset_tools.stores import manifest as mf
from dataset_tools.stores import webdataset as wds
from dataset_tools.stores.layout import StoreError, open_store


class VerifyError(CqkdError):
    """The store disagrees with its manifest; ``problems`` lists each issue."""

    def __init__(self, root: Path, problems: list[str]):
        self.problems = problems
        super().__init__(f"{root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)
                         + "\nre-run the conversion (dataset_tools/convert.py) for this split")


def _flat_decoder():
    import dataset_tools.ffcv_import  # noqa: F401 (FFCV without its torch-threads side effect)
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.pipeline.allocation_query import AllocationQuery

    class FlatRGBImageDecoder(SimpleRGBImageDecoder):
        """SimpleRGBImageDecoder for any mix of image sizes: each sample is
        decoded into the first h*w*3 bytes of a flat max_h*max_w*3 slot (the
        layout FFCV's own ResizedCropRGBImageDecoder uses for its temp
        buffer), so pixels come back untouched (no crop/resize)."""

        def declare_state_and_memory(self, previous_state):
            shape = (int(self.metadata["height"].max()) * int(self.metadata["width"].max()) * 3,)
            dtype = np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                    AllocationQuery(shape, dtype))

    return FlatRGBImageDecoder()


def read_beton(path: Path, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """-> (labels, indices, pixel_sha256, (N, 2) heights/widths) via FFCV's Loader on CPU."""
    from dataset_tools.ffcv_import import TorchThreadsKept
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    reader = Reader(str(path))
    image_col = f"f{reader.field_names.index('image')}"
    sizes = np.stack([reader.metadata[image_col]["height"],
                      reader.metadata[image_col]["width"]], 1).astype(np.int64)
    with TorchThreadsKept():
        loader = Loader(str(path), batch_size=batch_size, num_workers=min(4, os.cpu_count() or 1),
                        order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [_flat_decoder()], "label": [IntDecoder()],
                                   "index": [IntDecoder()]})
    labels, indices, digest, pos = [], [], mf.PixelDigest(), 0
    for images, lab, idx in loader:
        for flat in images:  # per-sample hashing: images differ in size
            h, w = sizes[pos]
            digest.update(mf.sample_pixel_digest(flat[: h * w * 3].reshape(h, w, 3)))
            pos += 1
        labels.append(np.array(lab).reshape(-1))
        indices.append(np.array(idx).reshape(-1))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(labels), cat(indices), digest.hexdigest(), sizes


def _check_index(tar_path: Path, idx_path: Path, problems: list[str]) -> None:
    if not idx_path.is_file():
        problems.append(f"{idx_path}: DALI index missing")
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "fresh.idx"
        try:
            wds.make_index(tar_path, fresh)
        except Exception as e:  # wds2idx refuses a broken tar
            problems.append(f"{idx_path}: wds2idx failed on {tar_path.name} ({e})")
            return
        if fresh.read_bytes() != idx_path.read_bytes():
            problems.append(f"{idx_path}: differs from a fresh wds2idx run on {tar_path.name}")


def read_shards(root: Path, shards: list[dict], image_ext: str, problems: list[str]
                ) -> tuple[np.ndarray, str]:
    """Walk the tars in order -> (labels, recomputed fingerprint)."""
    allowed = set(image_ext.split(";"))
    fp, labels, expect = mf.Fingerprint(), [], 0
    for sh in shards:
        tar_path, idx_path = root / sh["tar"], root / sh["index"]
        if not tar_path.is_file():
            problems.append(f"{tar_path}: missing")
            continue
        if mf.file_sha256(tar_path) != sh["sha256"]:
            problems.append(f"{tar_path}: sha256 differs from the manifest (file changed or corrupt)")
        _check_index(tar_path, idx_path, problems)
        count = 0
        try:
            with closing(wds.iter_tar_samples(tar_path)) as samples:
                for smp in samples:
                    where = f"{tar_path.name}:{smp.key}"
                    if smp.key != wds.sample_key(expect):
                        problems.append(f"{where}: expected key {expect:08d} (samples out of "
                                        f"order or missing)")
                    img = [e for e in smp.members if e in wds.IMAGE_EXTS]
                    if len(img) != 1 or img[0] not in allowed or not smp.members[img[0]][1]:
                        problems.append(f"{where}: image member missing or not one of "
                                        f".{image_ext}")
                    try:
                        label, index = int(smp.data["cls"]), int(smp.data["index"])
                        fp.update(smp.data["sha256"].decode(), label)
                    except (KeyError, ValueError) as e:
                        problems.append(f"{where}: bad or missing .cls/.index/.sha256 member "
                                        f"({e})")
                        label, index = -1, -1
                    if index != expect:
                        problems.append(f"{where}: .index says {index}, expected {expect}")
                    labels.append(label)
                    expect += 1
                    count += 1
        except wds.UnreadableShard as e:
            problems.append(f"{tar_path}: unreadable tar ({e.reason})")
            continue
        except OSError as e:
            problems.append(f"{tar_path}: unreadable tar ({e})")
            continue
        if count != sh["num_samples"]:
            problems.append(f"{tar_path}: {count} samples, manifest says {sh['num_samples']}")
    return np.array(labels, np.int64), fp.hexdigest()


def _check_holdout(h, n: int, problems: list[str], lines: list[str]) -> None:
    """The ``holdout`` record of a --val-fraction part (dataset_tools/stores/layout.py)."""
    if not isinstance(h, dict) or h.get("role") not in ("train", "val") \
            or not isinstance(h.get("source_positions"), list):
        problems.append(f"holdout: malformed record {str(h)[:80]!r} (needs role train|val and "
                        f"source_positions)")
        return
    pos = np.array(h["source_positions"], dtype=np.int64)
    if len(pos) != n:
        problems.append(f"holdout: {len(pos)} source positions, manifest says {n} samples")
    elif n and (pos[0] < 0 or np.any(np.diff(pos) <= 0)):
        problems.append("holdout: source positions are not distinct, sorted and >= 0")
    f = h.get("val_fraction")
    if not isinstance(f, (int, float)) or not 0 < f < 1:
        problems.append(f"holdout: val_fraction {f!r} outside (0, 1)")
    lines.append(f"holdout: {h['role']} part, {len(pos)} source positions OK")


def verify_store(root: os.PathLike | str) -> list[str]:
    """Check everything; returns summary lines, raises VerifyError/StoreError."""
    root = Path(root)
    store = open_store(root)
    m = store.manifest
    n, problems, lines = m["num_samples"], [], []
    labels_by_store: dict[str, np.ndarray] = {}

    def check_labels(kind: str, labels: np.ndarray) -> None:
        labels_by_store[kind] = labels
        if len(labels) != n:
            problems.append(f"{kind}: {len(labels)} samples, manifest says {n}")
            return
        counts = np.bincount(labels.clip(0), minlength=m["num_classes"])[: m["num_classes"]]
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= m["num_classes"] \
                or counts.tolist() != m["class_counts"]:
            problems.append(f"{kind}: class counts {counts.tolist()} differ from the manifest "
                            f"{m['class_counts']}")

    for kind in ("ffcv", "ffcv_lowres"):
        if not store.has(kind):
            continue
        entry = m["stores"][kind]
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if mf.file_sha256(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
        try:
            labels, indices, pixels, sizes = read_beton(path)
        except Exception as e:
            problems.append(f"{path}: FFCV cannot read it ({type(e).__name__}: {e})")
            continue
        check_labels(kind, labels)
        if not np.array_equal(indices, np.arange(len(indices))):
            problems.append(f"{path}: index field is not 0..N-1 in order")
        if pixels != entry["pixel_sha256"]:
            problems.append(f"{path}: decoded pixels differ from the manifest's pixel_sha256")
        if kind == "ffcv_lowres" and len(sizes) and sizes.min(1).max() > entry["resolution"]:
            problems.append(f"{path}: images with shorter side > {entry['resolution']}")
        lines.append(f"{kind}: {path.name}: {len(labels)} samples, labels/indices/pixels OK")

    if store.has("dali"):
        dali = m["stores"]["dali"]
        labels, fingerprint = read_shards(root, dali["shards"], dali["image_ext"], problems)
        check_labels("dali", labels)
        if fingerprint != m["fingerprint"]:
            problems.append(f"dali: fingerprint recomputed from the shards {fingerprint} differs "
                            f"from the manifest {m['fingerprint']}")
        lines.append(f"dali: {len(dali['shards'])} shard(s): {len(labels)} samples, indexes, "
                     f"labels and fingerprint OK")
    else:
        lines.append("fingerprint: not re-checkable without the webdataset shards (no source hashes)")

    if "holdout" in m:
        _check_holdout(m["holdout"], n, problems, lines)

    stores = list(labels_by_store.items())
    for kind, labels in stores[1:]:
        if len(labels) == len(stores[0][1]) and not np.array_equal(labels, stores[0][1]):
            problems.append(f"{kind}: labels differ from {stores[0][0]} at "
                            f"{int(np.flatnonzero(labels != stores[0][1])[0])}")
    if problems:
        raise VerifyError(root, problems)
    return [mf.summary(m)] + lines


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: convert.py verify OUT_DIR", file=sys.stderr)
        return 2
    try:
        lines = verify_store(argv[0])
    except StoreError as e:
        print(f"verify: error: {e}", file=sys.stderr)
        return 2
    except VerifyError as e:
        print(f"verify: FAILED: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print(f"verify: OK ({argv[0]})")
    return 0
