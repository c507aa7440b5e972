"""List the images of a source dataset: which files, in which order, with which label.

``open_source`` reads only the listing (directory entries, tar headers, pickle
batches, HDF5 shapes); pixels are read later, per item and possibly in worker
processes, by :func:`dataset_tools.decode.load_item`.

Kinds:

* ``imagefolder``: ``ROOT/<class>/**/<image>``, the layout and order of
  ``torchvision.datasets.ImageFolder`` (classes sorted by name, files sorted by
  folder then name, symlinks followed, the same image extensions). Two
  deliberate differences: names starting with ``.`` (``.DS_Store``, macOS
  ``._x.jpg`` companions, ``.ipynb_checkpoints/``) are ignored, and problems
  (empty class folder, symlink loop, broken link, FIFO) are reported by name
  instead of crashing later.
* ``tar``: an ImageFolder inside a ``.tar`` (or ``.tar.gz/.tgz/.tar.bz2/.tar.xz``,
  which is first decompressed once into a temporary ``.tar``), with the class
  folders at the top or under one top-level folder. Nothing is extracted:
  members are read by offset, and members with absolute paths, ``..`` or links
  pointing outside the archive are refused.
* ``cifar``: CIFAR-10/100 python pickles (``cifar-10-batches-py``,
  ``cifar-100-python`` or one batch file), loaded with a restricted unpickler.
* ``hdf5``: an ``N x H x W x 3`` (or ``N x H x W``) uint8 dataset plus a label dataset.

Bad inputs: with ``on_error="fail"`` the first one raises :class:`BadInput`
(one file) or :class:`SourceError` (the whole source); with ``"skip"`` each is
recorded in ``Source.skipped`` as ``(location, reason)`` and left out. A source
with no usable image is always a :class:`SourceError`. An empty class folder
keeps its class index when skipped, so labels match the other splits.
"""
from __future__ import annotations

import os
import tarfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# Same set as torchvision.datasets.folder.IMG_EXTENSIONS (not imported, to keep
# torch out of worker processes); tests check they agree.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
KINDS = ("imagefolder", "tar", "cifar", "hdf5")


class BadInput(Exception):
    """One bad input file. ``str()`` is ``"<file>: <reason>; <fix>"``."""

    def __init__(self, file: str, reason: str, fix: str = ""):
        self.file, self.reason, self.fix = str(file), reason, fix
        super().__init__(f"{file}: {reason}" + (f"; {fix}" if fix else ""))

    def __reduce__(self):  # survive the trip back from a worker process
        return (type(self), (self.file, self.reason, self.fix))


class SourceError(Exception):
    """The whole source is unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class SourceItem:
    """One image of a source.

    ``name``: display name relative to the source root (``apple/x.png``,
    ``data.tar:apple/x.png``, ``train[123]``). ``ref``: a picklable recipe for
    :func:`dataset_tools.decode.load_item`: an absolute path (str) for files,
    ``("tar", tar_path, offset, size, location)``, ``("hdf5", path, images_key,
    index)``, or the ``H x W x 3`` uint8 array itself (CIFAR).
    """

    name: str
    label: int
    ref: object = field(compare=False, repr=False)


@dataclass
class Source:
    """A listed source. ``items`` are in canonical order (see module doc).

    Call :meth:`close` (or use ``with``) when done: a compressed tar keeps a
    decompressed temporary copy until then (also removed at garbage
    collection / exit). Keep the Source alive while workers read its items.
    """

    kind: str
    path: str
    description: str
    classes: list[str]
    items: list[SourceItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _cleanup: Optional[weakref.finalize] = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Problems:
    """Collects listing problems, or raises the first one (on_error='fail')."""

    def __init__(self, on_error: str):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.fail = on_error == "fail"
        self.skipped: list[tuple[str, str]] = []

    def bad(self, file: str, reason: str, fix: str = "") -> None:
        if self.fail:
            raise BadInput(file, reason, fix)
        self.skipped.append((str(file), reason))

    def unsafe(self, file: str, reason: str) -> None:
        """A tar member that tries to reach outside the archive."""
        if self.fail:
            raise SourceError(f"{file}: {reason}; refused (nothing was extracted or read "
                              f"outside the archive): rebuild the archive with relative "
                              f"member paths, or use --on-error skip to leave it out")
        self.skipped.append((str(file), reason))


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def open_source(path: os.PathLike | str, kind: Optional[str] = None, *, on_error: str = "fail",
                hdf5_images: str = "images", hdf5_labels: str = "labels",
                class_names: Optional[Sequence[str]] = None, split: str = "train") -> Source:
    """List the source at ``path``; ``kind`` is detected when None (see module doc).

    ``split`` picks the CIFAR batches of a CIFAR directory (``train``/``test``).
    ``class_names`` overrides the names of CIFAR/HDF5 classes (index order).
    """
    problems = _Problems(on_error)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    p = Path(os.path.abspath(path))
    if not p.exists() and not p.is_symlink():
        raise SourceError(f"{p}: no such file or folder; check the source path")
    kind = kind or detect_kind(p)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    from dataset_tools import source_arrays, source_tar  # they import this module
    if kind == "imagefolder":
        src = _open_imagefolder(p, problems)
    elif kind == "tar":
        src = source_tar.open_tar(p, problems)
    elif kind == "cifar":
        src = source_arrays.open_cifar(p, split, class_names, problems)
    else:
        src = source_arrays.open_hdf5(p, hdf5_images, hdf5_labels, class_names, problems)
    src.skipped = problems.skipped
    if not src.items:
        src.close()
        why = "; ".join(f"{f}: {r}" for f, r in src.skipped[:5])
        raise SourceError(f"{p}: no usable images found{' (' + why + ')' if why else ''}; "
                          f"check the path points at the dataset root ({_layout_hint(kind)})")
    return src


def _layout_hint(kind: str) -> str:
    return {"imagefolder": "ROOT/<class>/<image>",
            "tar": "ARCHIVE:[top/]<class>/<image>",
            "cifar": "cifar-10-batches-py, cifar-100-python or a batch file",
            "hdf5": "an N x H x W x 3 uint8 image dataset plus labels"}[kind]


def detect_kind(p: Path) -> str:
    """Guess the kind of source at ``p`` from its name, then its first bytes."""
    if p.is_dir():
        return "cifar" if _is_cifar_dir(p) else "imagefolder"
    low = p.name.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(HDF5_SUFFIXES):
        return "hdf5"
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise SourceError(f"{p}: cannot read ({e.strerror}); check the path and permissions")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "cifar"  # a pickle; only CIFAR pickles are read, and safely
    if head == b"\x89HDF\r\n\x1a\n":
        return "hdf5"
    if tarfile.is_tarfile(p):
        return "tar"
    raise SourceError(f"{p}: cannot tell what kind of dataset this is (not a folder, tar, "
                      f"CIFAR pickle or HDF5 file); pass the kind explicitly (--source-kind)")


def _is_cifar_dir(p: Path) -> bool:
    return (p / "batches.meta").is_file() or \
        ((p / "meta").is_file() and ((p / "train").is_file() or (p / "test").is_file()))


# ---------------------------------------------------------------- ImageFolder

def _open_imagefolder(root: Path, problems: _Problems) -> Source:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"{root}: cannot list the folder ({e.strerror}); check permissions")
    classes, top_images = [], 0
    for e in entries:
        if _hidden(e.name):
            continue
        try:
            if e.is_dir():
                classes.append(e.name)
            elif is_image_name(e.name):
                top_images += 1
        except OSError as err:  # ELOOP: a link to itself
            problems.bad(e.path, f"symlink loop ({err.strerror})", "remove or fix the link")
    if not classes:
        hint = (f"it holds {top_images} images but no class sub-folders; ImageFolder expects "
                "ROOT/<class>/<image>: point to the parent folder or sort the images into "
                "class folders" if top_images else "no class sub-folders; ImageFolder expects "
                "ROOT/<class>/<image>")
        raise SourceError(f"{root}: {hint}")
    items: list[SourceItem] = []
    for label, cname in enumerate(classes):
        found = sorted(_walk_images(str(root / cname), problems))
        if not found:
            problems.bad(str(root / cname), "empty class folder: no image files "
                         f"({', '.join(IMAGE_EXTENSIONS)})", "add its images or delete the "
                         "folder (when skipped, the class keeps its index)")
        for folder, fname in found:
            full = os.path.join(folder, fname)
            items.append(SourceItem(os.path.relpath(full, root), label, full))
    desc = f"ImageFolder {root}: {len(classes)} classes, {len(items)} files"
    return Source("imagefolder", str(root), desc, classes, items)


def _walk_images(top: str, problems: _Problems) -> list[tuple[str, str]]:
    """(folder, file name) of every image under ``top``, following symlinked
    folders like ``os.walk(followlinks=True)`` but stopping at loops."""
    out: list[tuple[str, str]] = []
    stack = [(top, {})]  # folder, {(dev, inode): path} of its ancestors
    while stack:
        folder, ancestors = stack.pop()
        try:
            st = os.stat(folder)
            entries = list(os.scandir(folder))
        except OSError as e:
            problems.bad(folder, f"cannot list folder ({e.strerror})", "check permissions")
            continue
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            problems.bad(folder, f"symlink loop: same folder as its ancestor {ancestors[key]}",
                         "remove the link")
            continue
        ancestors = {**ancestors, key: folder}
        for e in entries:
            if _hidden(e.name):
                continue
            try:
                is_dir = e.is_dir()
            except OSError as err:  # ELOOP: the link resolves to itself
                problems.bad(e.path, f"symlink loop ({err.strerror})", "remove or fix the link")
                continue
            if is_dir:
                stack.append((e.path, ancestors))
            elif is_image_name(e.name):
                if e.is_file():
                    out.append((folder, e.name))
                elif e.is_symlink() and not os.path.exists(e.path):
                    problems.bad(e.path, "broken symlink (its target does not exist)",
                                 "fix the link or delete it")
                else:
                    problems.bad(e.path, "not a regular file (a FIFO, socket or device)",
                                 "replace it with the image file or delete it")
    return out
