"""Staging directory + atomic swap for a conversion's OUT_DIR.

Everything is written into ``OUT_DIR.partial-<pid>`` beside OUT_DIR and only
renamed to OUT_DIR once complete, so a run killed at any point (even with
``kill -9``) never leaves an OUT_DIR that looks complete. A staging directory
holds a lock file locked with ``fcntl.lockf`` while its run is alive; POSIX
record locks vanish with the process that owns them (and are not inherited by
forked worker processes), so the next run can tell a dead run's leftovers
(lock free -> delete) from a live concurrent run (lock held -> leave alone),
even if the dead run's pid was reused.

Creation, cleanup and the final swap happen under ``flock`` on the parent
directory, so two conversions into the same parent never race each other.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

STAGING_TAG = ".partial-"
OLD_TAG = ".old-"
LOCK_NAME = ".convert.lock"


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _is_abandoned(staging: Path) -> bool:
    """True when no live process holds ``staging``'s lock."""
    lock = staging / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live run holds it
    finally:
        os.close(fd)  # closing drops the probe lock we may have taken
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove staging / moved-aside directories of dead runs into ``out_dir``.
    The caller must hold the parent lock."""
    removed = []
    for p in sorted(out_dir.parent.glob(out_dir.name + ".*")):
        rest = p.name[len(out_dir.name):]
        if not p.is_dir() or not (rest.startswith(STAGING_TAG) or rest.startswith(OLD_TAG)):
            continue
        # .old-* dirs only exist inside one locked swap, so any we see is stale.
        if rest.startswith(OLD_TAG) or _is_abandoned(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class Staging:
    """``with Staging(out_dir) as st:`` write into ``st.path``, then call
    ``st.commit()``. Leaving the block without commit (error, Ctrl-C) deletes
    the staging directory and leaves any existing OUT_DIR untouched."""

    def __init__(self, out_dir: os.PathLike | str):
        self.out_dir = Path(out_dir).absolute()
        self.path = self.out_dir.with_name(f"{self.out_dir.name}{STAGING_TAG}{os.getpid()}")
        self._lock_fd: int | None = None
        self.committed = False
        self.cleaned: list[Path] = []

    def __enter__(self) -> "Staging":
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        with _parent_lock(parent):
            self.cleaned = clean_stale(self.out_dir)
            if self.path.exists():  # our own pid's leftover from a previous life
                shutil.rmtree(self.path)
            self.path.mkdir()
            self._lock_fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)
        return self

    def commit(self) -> None:
        """Swap the staging directory in as OUT_DIR (moving an old OUT_DIR
        aside, then deleting it)."""
        old = self.out_dir.with_name(f"{self.out_dir.name}{OLD_TAG}{os.getpid()}")
        with _parent_lock(self.out_dir.parent):
            os.unlink(self.path / LOCK_NAME)
            _fsync_dir(self.path)
            if self.out_dir.exists():
                os.rename(self.out_dir, old)
            os.rename(self.path, self.out_dir)
            _fsync_dir(self.out_dir.parent)
            if old.exists():
                shutil.rmtree(old)
        self._release()
        self.committed = True

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
            self._release()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write_fn) -> None:
    """Write via ``write_fn(fileobj)`` to a temp file beside ``path``, fsync,
    rename: readers never see half a file, and an interrupted write leaves the
    old file (or none). The project's one atomic file writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: Path, obj, indent: int = 2) -> None:
    """``obj`` as indented JSON plus a newline, atomically: the one JSON writer."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
