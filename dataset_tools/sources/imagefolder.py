"""The ``imagefolder`` reader: ``ROOT/<class>/**/<image>`` in torchvision
ImageFolder's order, hidden names ignored, problems reported by name."""
from __future__ import annotations

import os
from pathlib import Path

from dataset_tools.sources.base import IMAGE_EXTENSIONS, Problems, Source, SourceError, SourceItem, \
    is_hidden, is_image_name


def open_imagefolder(root: Path, problems: Problems) -> Source:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"{root}: cannot list the folder ({e.strerror}); check permissions")
    classes, top_images = [], 0
    for e in entries:
        if is_hidden(e.name):
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


def _walk_images(top: str, problems: Problems) -> list[tuple[str, str]]:
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
            if is_hidden(e.name):
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
