"""Sources whose images are arrays, not files: CIFAR python pickles and HDF5.

Used by :func:`dataset_tools.sources.open_source`; see its module doc.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dataset_tools.safe_unpickle import UnsafePickleError, restricted_load
from dataset_tools.sources.base import Problems, Source, SourceError, SourceItem

CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_BATCHES = {"train": ["train"], "test": ["test"]}


def _load_pickle(path: Path) -> dict:
    """A CIFAR batch/meta dict with ``str`` keys, or SourceError."""
    try:
        with open(path, "rb") as f:
            obj = restricted_load(f)
    except UnsafePickleError as e:
        raise SourceError(f"{path}: not a CIFAR pickle, it {e}; nothing in it was run. "
                          f"Only CIFAR-10/100 python batches are read") from None
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise SourceError(f"{path}: damaged or not a pickle ({type(e).__name__}: {e}); "
                          f"re-download the CIFAR python version") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: not a CIFAR batch (a {type(obj).__name__}, not a dict); "
                          f"point to cifar-10-batches-py, cifar-100-python or a batch file")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(value) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]


def open_cifar(p: Path, split: str, class_names: Optional[Sequence[str]],
               problems: Problems) -> Source:
    if p.is_dir():
        if (p / "batches.meta").is_file():
            variant, files, meta = "CIFAR-10", CIFAR10_BATCHES[split], p / "batches.meta"
        elif (p / "meta").is_file():
            variant, files, meta = "CIFAR-100", CIFAR100_BATCHES[split], p / "meta"
        else:
            raise SourceError(f"{p}: no batches.meta or meta file, so not a CIFAR python "
                              f"folder; point to cifar-10-batches-py or cifar-100-python")
        files = [p / f for f in files]
        for f in files:
            if not f.is_file():
                raise SourceError(f"{f}: missing from the CIFAR folder; re-download it")
    else:
        files = [p]
        meta = next((p.parent / m for m in ("batches.meta", "meta")
                     if (p.parent / m).is_file()), None)
        variant = "CIFAR batch"
    images, labels, names = [], [], []
    for f in files:
        d = _load_pickle(f)
        data = d.get("data")
        key = "labels" if "labels" in d else "fine_labels"
        if not isinstance(data, np.ndarray) or key not in d:
            raise SourceError(f"{f}: not a CIFAR batch (needs 'data' and 'labels' or "
                              f"'fine_labels'; has {sorted(d)})")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise SourceError(f"{f}: 'data' is {data.dtype} {data.shape}, CIFAR stores uint8 "
                              f"N x 3072; not a CIFAR batch")
        lab = np.asarray(d[key])
        if lab.ndim != 1 or len(lab) != len(data) or not np.issubdtype(lab.dtype, np.integer):
            raise SourceError(f"{f}: {len(lab)} labels for {len(data)} images; damaged batch, "
                              f"re-download it")
        # Stored as N x (R plane, G plane, B plane), 32 x 32 each.
        images.append(np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)))
        labels.append(lab.astype(np.int64))
        names += [f"{f.name}[{i}]" for i in range(len(data))]
    images, labels = np.concatenate(images), np.concatenate(labels)
    if class_names is None and meta is not None:
        m = _load_pickle(meta)
        key = "label_names" if "label_names" in m else "fine_label_names"
        class_names = _names(m.get(key, [])) or None
    classes = list(class_names) if class_names else \
        [f"class_{i}" for i in range(int(labels.max()) + 1)]
    items = _items(images, labels, names, classes, str(p), problems, lambda i: images[i])
    desc = f"{variant} python pickle {p} ({split if p.is_dir() else p.name}): " \
           f"{len(classes)} classes, {len(items)} images"
    return Source("cifar", str(p), desc, classes, items)


def _items(images, labels, names, classes, where, problems, ref) -> list[SourceItem]:
    """Items with a label in range; the others are bad inputs."""
    items = []
    for i, lab in enumerate(labels.tolist()):
        if 0 <= lab < len(classes):
            items.append(SourceItem(names[i], lab, ref(i)))
        else:
            problems.bad(f"{where}[{i}]", f"label {lab} outside 0..{len(classes) - 1}",
                         "fix the label or give all class names")
    return items


def open_hdf5(p: Path, images_key: str, labels_key: str,
              class_names: Optional[Sequence[str]], problems: Problems) -> Source:
    import h5py
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise SourceError(f"{p}: not a readable HDF5 file ({e}); check the path") from None
    with f:
        for key, flag in ((images_key, "images"), (labels_key, "labels")):
            if not isinstance(f.get(key), h5py.Dataset):
                found = []
                f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
                raise SourceError(f"{p}: no dataset {key!r} (datasets: {', '.join(found) or 'none'}"
                                  f"); name the {flag} dataset with --hdf5-{flag}")
        ds, lab_ds = f[images_key], f[labels_key]
        shape = ds.shape
        if ds.dtype != np.uint8 or not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
            raise SourceError(f"{p}: dataset {images_key!r} is {ds.dtype} {shape}; expected uint8 "
                              f"N x H x W x 3 (or N x H x W grayscale): convert it to that layout")
        labels = np.asarray(lab_ds[()])
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise SourceError(f"{p}: labels {labels_key!r} are {labels.dtype} {labels.shape}; "
                              f"expected N integers")
        if len(labels) != shape[0]:
            raise SourceError(f"{p}: {shape[0]} images in {images_key!r} but {len(labels)} labels "
                              f"in {labels_key!r}; the two datasets must have the same length")
        if class_names is None:
            attr = lab_ds.attrs.get("class_names", f.attrs.get("class_names"))
            class_names = _names(attr) if attr is not None else None
    labels = labels.astype(np.int64)
    classes = list(class_names) if class_names else \
        [f"class_{i}" for i in range(int(labels.max(initial=-1)) + 1)]
    path = os.path.abspath(p)
    names = [f"{p.name}[{i}]" for i in range(len(labels))]
    items = _items(np.empty(0), labels, names, classes, path, problems,
                   lambda i: ("hdf5", path, images_key, i))
    desc = f"HDF5 {p} (images {images_key!r}, labels {labels_key!r}): " \
           f"{len(classes)} classes, {len(items)} images of {shape[1]}x{shape[2]}"
    return Source("hdf5", str(p), desc, classes, items)
