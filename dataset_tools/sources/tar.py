"""Tar sources: an ImageFolder inside a tar, read in place by member offset.

Used by :func:`dataset_tools.sources.open_source`; see its module doc. A
compressed archive is decompressed once into a temporary ``.tar`` (random
access needs it), removed by ``Source.close()`` or at garbage collection.
Members are never extracted; absolute paths, ``..`` and links leading outside
the archive are refused; links inside it are resolved to their target's data.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import posixpath
import shutil
import tarfile
import tempfile
import weakref
from pathlib import Path
from typing import Optional

from dataset_tools.sources.base import Problems, Source, SourceError, SourceItem, is_hidden, is_image_name

_LINK_DEPTH = 8  # links followed before giving up


def open_tar(path: Path, problems: Problems) -> Source:
    read_path = path
    opener = _decompressor(path)
    if opener is not None:  # random access needs an uncompressed copy
        tmp = tempfile.mkdtemp(prefix="cqkd-untar-")
        read_path = Path(tmp) / (path.name + ".tar")
        try:
            with opener(path) as fin, open(read_path, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except (OSError, EOFError, ValueError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SourceError(f"{path}: cannot decompress ({e}); re-create or re-download it")
    try:
        with tarfile.open(read_path, "r:") as tf:
            members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        if opener is not None:
            shutil.rmtree(read_path.parent, ignore_errors=True)
        raise SourceError(f"{path}: not a readable tar archive ({e}); re-create or "
                          f"re-download it")
    src = Source("tar", str(path), "", [], [])
    if opener is not None:
        src.cleanup = weakref.finalize(src, shutil.rmtree, str(read_path.parent), True)
    files, dirs = _tar_members(path, members, problems)
    src.classes, src.items, top = _tar_layout(path, read_path, files, dirs, problems)
    src.description = (f"tar {path}{f' (top folder {top}/)' if top else ''}: "
                       f"{len(src.classes)} classes, {len(src.items)} files")
    return src


def _decompressor(path: Path):
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror}); check the path") from None
    if head[:2] == b"\x1f\x8b":
        return gzip.open
    if head[:3] == b"BZh":
        return bz2.open
    if head == b"\xfd7zXZ\x00":
        return lzma.open
    return None


def _member_path(name: str) -> Optional[str]:
    """Normalized relative member path, or None if it leaves the archive."""
    if name.startswith("/") or ".." in name.split("/"):
        return None
    return posixpath.normpath(name)


def _tar_members(path: Path, members, problems: Problems):
    """-> ({path: (offset, size)} of usable image files, {folder paths})."""
    regular, links, files, dirs = {}, {}, {}, set()
    for m in members:
        where = f"{path}:{m.name}"
        rel = _member_path(m.name)
        if rel is None:
            problems.unsafe(where, "member path is absolute or contains '..'")
            continue
        regular.pop(rel, None)  # a later member of the same name replaces it
        links.pop(rel, None)
        parts = rel.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if m.issym() or m.islnk():
            base = posixpath.dirname(rel) if m.issym() else ""
            target = posixpath.normpath(posixpath.join(base, m.linkname))
            if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
                problems.unsafe(where, f"link to {m.linkname!r}, outside the archive")
                continue
            links[rel] = target
        elif m.isdir():
            dirs.add(rel)
        elif m.isfile() and not m.issparse():
            regular[rel] = (m.offset_data, m.size)
        elif is_image_name(rel):
            problems.bad(where, "not a regular file (device, FIFO or sparse member)",
                         "re-create the archive from plain files")
    for rel, target in links.items():
        for _ in range(_LINK_DEPTH):
            if target not in links:
                break
            target = links[target]
        if target in regular:
            regular.setdefault(rel, regular[target])
        elif is_image_name(rel):
            problems.bad(f"{path}:{rel}", f"link target {target!r} is not a file in the archive",
                         "re-create the archive with the file itself")
    for rel, loc in regular.items():
        if is_image_name(rel):
            files[rel] = loc
    dirs.discard(".")
    return files, dirs


def _tar_layout(path: Path, read_path: Path, files: dict, dirs: set, problems: Problems):
    """Class folders at the top, or under one top-level folder."""
    tops = {d.split("/")[0] for d in dirs} | {f.split("/")[0] for f in files}
    top = ""
    if len(tops) == 1 and files and all(f.count("/") >= 2 for f in files):
        top = tops.pop()
    cut = len(top) + 1 if top else 0
    class_dirs = {d[cut:].split("/")[0] for d in dirs if d.startswith(top + "/" if top else "")}
    classes = sorted(c for c in class_dirs if c and not is_hidden(c))
    index = {c: i for i, c in enumerate(classes)}
    keyed = []
    for rel, (offset, size) in files.items():
        parts = rel[cut:].split("/")
        if len(parts) < 2 or any(is_hidden(x) for x in parts):
            continue  # top-level files and hidden entries are ignored, as in a folder
        keyed.append(((parts[0], "/".join(parts[:-1]), parts[-1]), rel, offset, size))
    keyed.sort(key=lambda k: k[0])
    items = [SourceItem(f"{path.name}:{rel}", index[key[0]],
                        ("tar", str(read_path), offset, size, f"{path}:{rel}"))
             for key, rel, offset, size in keyed]
    have = {it.label for it in items}
    for c in classes:
        if index[c] not in have:
            problems.bad(f"{path}:{top + '/' if top else ''}{c}", "empty class folder: no image "
                         "files", "add its images or delete the folder (when skipped, the "
                         "class keeps its index)")
    return classes, items, top
