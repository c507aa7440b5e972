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

A resumable writer (``Staging(out_dir, adopt=MARKER)``, used by
``dataset_tools/convert.py``) takes a dead run's staging directory over
instead of deleting it, when that directory holds ``MARKER`` (its record of
finished work): it is renamed to this run's name and locked, and the caller
decides whether the work in it is reusable (``Staging.clear`` empties it
otherwise); with ``keep_on_interrupt`` it is also left for a later run on
Ctrl-C. Other dead runs' leftovers are still deleted.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

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


def _abandoned_stagings(out_dir: Path) -> list[Path]:
    """Staging directories into ``out_dir`` that no live run holds."""
    return [p for p in sorted(out_dir.parent.glob(out_dir.name + STAGING_TAG + "*"))
            if p.is_dir() and _is_abandoned(p)]


def clean_stale(out_dir: Path, keep: Optional[Path] = None) -> list[Path]:
    """Remove staging / moved-aside directories of dead runs into ``out_dir``
    (except ``keep``). The caller must hold the parent lock."""
    removed = []
    for p in sorted(out_dir.parent.glob(out_dir.name + ".*")):
        rest = p.name[len(out_dir.name):]
        if not p.is_dir() or not (rest.startswith(STAGING_TAG) or rest.startswith(OLD_TAG)):
            continue
        if keep is not None and p == keep:
            continue
        # .old-* dirs only exist inside one locked swap, so any we see is stale.
        if rest.startswith(OLD_TAG) or _is_abandoned(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class Staging:
    """``with Staging(out_dir) as st:`` write into ``st.path``, then call
    ``st.commit()``. Leaving the block without commit (error, Ctrl-C) deletes
    the staging directory and leaves any existing OUT_DIR untouched.

    ``adopt``: the name of the marker a resumable run keeps in its staging
    directory; a dead run's directory holding it is taken over (the newest,
    or with ``adopt_tag`` the one named ``OUT_DIR.partial-<adopt_tag>``) and
    :attr:`adopted_tag` names it. ``keep_on_interrupt``: leave the directory
    for a later run to adopt when the block ends with Ctrl-C."""

    def __init__(self, out_dir: os.PathLike | str, adopt: Optional[str] = None,
                 adopt_tag: Optional[str] = None, keep_on_interrupt: bool = False):
        self.out_dir = Path(out_dir).absolute()
        self.tag = str(os.getpid())
        self.path = self.out_dir.with_name(f"{self.out_dir.name}{STAGING_TAG}{self.tag}")
        self._lock_fd: int | None = None
        self.committed = False
        self.cleaned: list[Path] = []
        self.adopt, self.adopt_tag = adopt, adopt_tag
        self.keep_on_interrupt = keep_on_interrupt
        self.adopted_tag: Optional[str] = None

    def _adoptee(self) -> Optional[Path]:
        if self.adopt is None:
            return None
        found = [p for p in _abandoned_stagings(self.out_dir) if (p / self.adopt).exists()]
        if self.adopt_tag is not None:
            found = [p for p in found if p.name.endswith(STAGING_TAG + self.adopt_tag)]
        return max(found, key=lambda p: (p / self.adopt).stat().st_mtime_ns, default=None)

    def __enter__(self) -> "Staging":
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        with _parent_lock(parent):
            keep = self._adoptee()
            self.cleaned = clean_stale(self.out_dir, keep=keep)
            if keep is not None:
                self.adopted_tag = keep.name[len(self.out_dir.name) + len(STAGING_TAG):]
                if keep != self.path:
                    if self.path.exists():  # our own pid's leftover from a previous life
                        shutil.rmtree(self.path)
                    os.rename(keep, self.path)
            elif self.path.exists():  # our own pid's leftover from a previous life
                shutil.rmtree(self.path)
            self.path.mkdir(exist_ok=keep is not None)
            self._lock_fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)
        return self

    def clear(self) -> None:
        """Empty the staging directory (but keep holding it)."""
        for p in self.path.iterdir():
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def commit(self) -> None:
        """Swap the staging directory in as OUT_DIR (moving an old OUT_DIR
        aside, then deleting it)."""
        old = self.out_dir.with_name(f"{self.out_dir.name}{OLD_TAG}{os.getpid()}")
        with _parent_lock(self.out_dir.parent):
            os.unlink(self.path / LOCK_NAME)
            fsync_path(self.path)
            if self.out_dir.exists():
                os.rename(self.out_dir, old)
            os.rename(self.path, self.out_dir)
            fsync_path(self.out_dir.parent)
            if old.exists():
                shutil.rmtree(old)
        self._release()
        self.committed = True

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, exc_type, *exc) -> None:
        if not self.committed:
            if not (self.keep_on_interrupt and exc_type is not None
                    and issubclass(exc_type, KeyboardInterrupt)):
                shutil.rmtree(self.path, ignore_errors=True)
            self._release()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries) by path."""
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
