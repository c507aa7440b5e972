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

One reader per module (``imagefolder``, ``tar``, ``arrays`` for CIFAR pickles
and HDF5) over :mod:`dataset_tools.sources.base`; this module is the factory.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence

from dataset_tools.sources.arrays import open_cifar, open_hdf5
from dataset_tools.sources.base import (HDF5_SUFFIXES, IMAGE_EXTENSIONS, KINDS, TAR_SUFFIXES,
                                        BadInput, Problems, Source, SourceError, SourceItem,
                                        is_image_name)
from dataset_tools.sources.imagefolder import open_imagefolder
from dataset_tools.sources.tar import open_tar

__all__ = ["BadInput", "IMAGE_EXTENSIONS", "KINDS", "Source", "SourceError", "SourceItem",
           "detect_kind", "is_image_name", "open_source"]


def open_source(path: os.PathLike | str, kind: Optional[str] = None, *, on_error: str = "fail",
                hdf5_images: str = "images", hdf5_labels: str = "labels",
                class_names: Optional[Sequence[str]] = None, split: str = "train") -> Source:
    """List the source at ``path``; ``kind`` is detected when None (see module doc).

    ``split`` picks the CIFAR batches of a CIFAR directory (``train``/``test``).
    ``class_names`` overrides the names of CIFAR/HDF5 classes (index order).
    """
    problems = Problems(on_error)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    p = Path(os.path.abspath(path))
    if not p.exists() and not p.is_symlink():
        raise SourceError(f"{p}: no such file or folder; check the source path")
    kind = kind or detect_kind(p)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if kind == "imagefolder":
        src = open_imagefolder(p, problems)
    elif kind == "tar":
        src = open_tar(p, problems)
    elif kind == "cifar":
        src = open_cifar(p, split, class_names, problems)
    else:
        src = open_hdf5(p, hdf5_images, hdf5_labels, class_names, problems)
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
