"""Checkpoints of a conversion, so a killed run resumes instead of restarting.

The rule: a conversion appends samples, in source order, to files in its
staging directories (``dataset_tools/atomic.py``). Every ``--checkpoint-every
N`` source items, or every :data:`CHECKPOINT_SECONDS` of converting when N is
not given, the writers flush and fsync their files and a checkpoint goes to
``.resume/`` in the first staging directory: ``chunk-K.npz`` holds what the
chunk of items since the previous checkpoint added (per sample: the
fingerprint entry, pixel digests, source position; the ``.beton`` metadata
rows and page allocations), ``tail-K.npz`` the state to go on from (file
lengths, the FFCV page being filled, the open webdataset shard, the running
statistics, skipped files). Each file is written atomically, ``tail-K`` last,
so the newest tail whose chunks 0..K are all present is a consistent point.

A rerun into the same OUT_DIR (and VAL_DIR) takes the dead run's staging
directories over, cuts every file back to its length at that point, replays
the chunks into the hashes and tables, and converts only the items after it:
its output is byte-identical to an uninterrupted run's, for any worker
count (workers only prepare samples; the main process appends them in
order). The partial work is keyed by everything that changes the output
(:func:`conversion_key`: the output-shaping options, split names and holdout
settings, the source listing with each file's size and modification time or
each array's bytes, and the versions of the libraries that encode the
bytes); a rerun whose key differs discards it and starts over, saying which
part of the key changed. Options that do not change the bytes (``--workers``,
``--checkpoint-every``, ``--no-progress``) may change between runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dataset_tools.atomic import Staging, atomic_write_bytes, write_json_atomic

RESUME_DIR = ".resume"
KEY_NAME = "key.json"
CHECKPOINT_SECONDS = 30.0  # at most this much converting is redone after a kill
_CHUNK = re.compile(r"chunk-(\d{6})\.npz")
_TAIL = re.compile(r"tail-(\d{6})\.npz")


def source_identity(source) -> str:
    """sha256 over the listing: per item its name, label and content identity
    (a file's size and mtime, an in-memory array's bytes, a container
    member's location), plus the source file's size and mtime when the source
    is one file (tar, HDF5, a CIFAR batch). Reading every file's bytes would
    cost as much as the conversion; a stat does not."""
    h = hashlib.sha256()
    if os.path.isfile(source.path):
        st = os.stat(source.path)
        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    for it in source.items:
        ref = it.ref
        if isinstance(ref, str):
            try:
                st = os.stat(ref)
                ident = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                ident = "missing"
        elif isinstance(ref, np.ndarray):
            ident = hashlib.sha256(np.ascontiguousarray(ref).data).hexdigest()
        elif isinstance(ref, tuple):  # ("tar" | "hdf5", path, ...): the path may be a temp copy
            ident = repr((ref[0],) + tuple(ref[2:]))
        else:
            ident = repr(ref)
        h.update(f"{it.name}\0{it.label}\0{ident}\n".encode())
    return "sha256:" + h.hexdigest()


def library_versions() -> dict:
    """The libraries whose code decides the output bytes (resize, encode, layout)."""
    import cv2
    import ffcv
    import PIL

    from dataset_tools.stores.manifest import TOOL_VERSION
    return {"cqkd-convert": TOOL_VERSION, "ffcv": ffcv.__version__, "opencv": cv2.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def conversion_key(*, options: dict, layout: dict, source, given_src: str) -> dict:
    """Everything that changes a conversion's output (see the module doc)."""
    return {"options": options, "layout": layout,
            # SRC as typed is recorded only by a split's manifests (holdout.source)
            "source_given": given_src if layout.get("val_fraction") else None,
            "source": {"kind": source.kind, "path": source.path,
                       "description": source.description, "classes": list(source.classes),
                       "listing_skipped": [list(s) for s in source.skipped],
                       "items": source_identity(source)},
            "libraries": library_versions()}


def key_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``a.b: old -> new`` for each leaf that differs (for the discard message)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += key_differences(a, b, f"{prefix}{k}.")
        elif f"{prefix}{k}" == "source.items":
            out.append("source files (names, labels, sizes or modification times)")
        else:
            out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


@dataclass
class Checkpoint:
    """What a conversion resumes from: the source position reached, each
    part's state (``meta[role]``), the chunks' additions in order
    (``arrays["role.name"]``: one array per chunk) and the tail arrays."""

    position: int
    meta: dict
    arrays: dict = field(default_factory=dict)
    tail: dict = field(default_factory=dict)

    def part(self, role: str) -> "PartCheckpoint":
        pre = role + "."
        return PartCheckpoint(
            self.meta["parts"][role],
            {k[len(pre):]: v for k, v in self.arrays.items() if k.startswith(pre)},
            {k[len(pre):]: v for k, v in self.tail.items() if k.startswith(pre)})


@dataclass
class PartCheckpoint:
    meta: dict
    arrays: dict  # name -> list of per-chunk arrays
    tail: dict    # name -> array


class ResumeLog:
    """The checkpoints of one conversion, kept in its staging directories
    (the first one holds the chunks; every one holds the key)."""

    def __init__(self, stagings: list[Staging], key: dict, every: Optional[int] = None):
        self.stagings, self.every = stagings, every
        self.key = json.loads(json.dumps(key))  # as it reads back from key.json
        self.dir = stagings[0].path / RESUME_DIR
        self.next_chunk = 0
        self.note: Optional[str] = None  # why partial work was discarded, for the user
        self._last_pos, self._last_time = 0, time.monotonic()

    # ------------------------------------------------------------------ reading
    def start(self) -> Optional[Checkpoint]:
        """The checkpoint to resume from, or None after setting up a fresh
        start (the stagings emptied; :attr:`note` says why when there was
        partial work that cannot be used)."""
        adopted = {s.adopted_tag for s in self.stagings}
        if adopted == {None}:
            return self.restart(None)
        if len(adopted) != 1:
            return self.restart("its staging directories do not belong to one run")
        for s in self.stagings:
            try:
                old = json.loads((s.path / RESUME_DIR / KEY_NAME).read_text())
            except (OSError, ValueError):
                return self.restart(f"{s.path}: its key is missing or unreadable")
            if old != self.key:
                diff = "; ".join(key_differences(old, self.key)) or "the key changed"
                return self.restart(f"it was made with other options or another source ({diff})")
        try:
            ckpt = self._load()
        except (OSError, ValueError, KeyError) as e:
            return self.restart(f"its checkpoint files are unreadable ({e})")
        if ckpt is None:
            return self.restart(None)  # killed before the first checkpoint: nothing to reuse
        return ckpt

    def _load(self) -> Optional[Checkpoint]:
        names = os.listdir(self.dir)
        chunks = sorted(int(m[1]) for n in names if (m := _CHUNK.fullmatch(n)))
        tails = sorted(int(m[1]) for n in names if (m := _TAIL.fullmatch(n)))
        usable = [k for k in tails if chunks[:k + 1] == list(range(k + 1))]
        if not usable:
            return None
        k = usable[-1]
        for n in names:  # chunks written after the last tail, and older tails
            m = _CHUNK.fullmatch(n) or _TAIL.fullmatch(n)
            if m and (int(m[1]) > k or (n.startswith("tail") and int(m[1]) < k)):
                os.unlink(self.dir / n)
        with np.load(self.dir / f"tail-{k:06d}.npz", allow_pickle=False) as z:
            tail = {n: z[n] for n in z.files}
        meta = json.loads(tail.pop("meta").tobytes())
        arrays: dict[str, list] = {}
        end = 0
        for c in range(k + 1):
            with np.load(self.dir / f"chunk-{c:06d}.npz", allow_pickle=False) as z:
                if int(z["start"]) != end:
                    raise ValueError(f"chunk {c} starts at {int(z['start'])}, not {end}")
                end = int(z["end"])
                for n in z.files:
                    if n not in ("start", "end"):
                        arrays.setdefault(n, []).append(z[n])
        if end != meta["position"]:
            raise ValueError(f"chunks end at {end}, the tail at {meta['position']}")
        self.next_chunk = k + 1
        self._last_pos = meta["position"]
        return Checkpoint(meta["position"], meta, arrays, tail)

    def restart(self, why: Optional[str]) -> None:  # -> None, for ``return self.restart(...)``
        """Empty the stagings and record the key: a fresh start."""
        self.note = None if why is None else \
            f"discarded the partial work in {self.stagings[0].path}: {why}; starting over"
        for s in self.stagings:
            s.clear()
            write_json_atomic(s.path / RESUME_DIR / KEY_NAME, self.key)
        self.next_chunk, self._last_pos = 0, 0
        return None

    # ------------------------------------------------------------------ writing
    def due(self, position: int) -> bool:
        if self.every is not None:
            return position - self._last_pos >= self.every
        return time.monotonic() - self._last_time >= CHECKPOINT_SECONDS

    def save(self, position: int, parts: list) -> None:
        """Checkpoint every part's writers at ``position`` (source items done)."""
        chunk = {"start": np.int64(self._last_pos), "end": np.int64(position)}
        tail, meta = {}, {"position": position, "parts": {}}
        for part in parts:
            arrays, part_tail, part_meta = part.writer.checkpoint()
            chunk.update({f"{part.role}.{n}": a for n, a in arrays.items()})
            tail.update({f"{part.role}.{n}": a for n, a in part_tail.items()})
            meta["parts"][part.role] = part_meta
        tail["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        k = self.next_chunk
        atomic_write_bytes(self.dir / f"chunk-{k:06d}.npz", lambda f: np.savez(f, **chunk))
        atomic_write_bytes(self.dir / f"tail-{k:06d}.npz", lambda f: np.savez(f, **tail))
        if k > 0:
            (self.dir / f"tail-{k - 1:06d}.npz").unlink(missing_ok=True)
        self.next_chunk, self._last_pos, self._last_time = k + 1, position, time.monotonic()

    def finish(self) -> None:
        """Remove the checkpoints (before the stagings are swapped in)."""
        import shutil

        for s in self.stagings:
            shutil.rmtree(s.path / RESUME_DIR, ignore_errors=True)
