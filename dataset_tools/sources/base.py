"""What every source reader shares: the item and source types, the errors,
the image-name rules and the problem collector (``on_error`` fail | skip)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

from dataset_tools.errors import CqkdError

# Same set as torchvision.datasets.folder.IMG_EXTENSIONS (not imported, to keep
# torch out of worker processes); tests check they agree.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
KINDS = ("imagefolder", "tar", "cifar", "hdf5")


class BadInput(CqkdError):
    """One bad input file. ``str()`` is ``"<file>: <reason>; <fix>"``."""

    def __init__(self, file: str, reason: str, fix: str = ""):
        self.file, self.reason, self.fix = str(file), reason, fix
        super().__init__(f"{file}: {reason}" + (f"; {fix}" if fix else ""))

    def __reduce__(self):  # survive the trip back from a worker process
        return (type(self), (self.file, self.reason, self.fix))


class SourceError(CqkdError):
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
    cleanup: Optional[weakref.finalize] = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        if self.cleanup is not None:
            self.cleanup()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Problems:
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


def is_hidden(name: str) -> bool:
    return name.startswith(".")
