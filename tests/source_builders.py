"""Build test sources (CIFAR pickles, tars, HDF5) from a small ImageFolder."""
from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import h5py
import numpy as np
from PIL import Image


class Py2StylePickler(pickle._Pickler):
    """Writes ``str``/``bytes`` as Python 2 ``str`` opcodes (SHORT_BINSTRING /
    BINSTRING), as in the files from cs.toronto.edu (pickled by Python 2 cPickle,
    protocol 2); Python 3 would write ``bytes`` through ``_codecs.encode``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        b = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def write_py2_pickle(path: Path, obj) -> None:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    # Python 2's numpy lived at numpy.core; GLOBAL opcodes are plain text lines.
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray\n",
                                            b"numpy.core.multiarray\n"))


def read_folder(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(classes, N x H x W x 3 uint8 images, labels, file names) of an
    ImageFolder whose images all have the same size, decoded with PIL."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    imgs, labels, names = [], [], []
    for i, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            imgs.append(np.array(Image.open(f).convert("RGB")))
            labels.append(i)
            names.append(f.name)
    return classes, np.stack(imgs), np.array(labels), names


def cifar_batch(images: np.ndarray, labels, names, label_key: bytes) -> dict:
    n = len(images)
    return {b"batch_label": b"testing batch", label_key: [int(x) for x in labels],
            b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(n, 3072)),
            b"filenames": [s.encode() for s in names]}


def build_cifar100_dir(folder: Path, out: Path) -> dict:
    """cifar-100-python layout: train = all images, test = every 3rd one."""
    classes, imgs, labels, names = read_folder(folder)
    out.mkdir(parents=True)
    write_py2_pickle(out / "train", cifar_batch(imgs, labels, names, b"fine_labels"))
    write_py2_pickle(out / "test", cifar_batch(imgs[::3], labels[::3], names[::3], b"fine_labels"))
    write_py2_pickle(out / "meta", {b"fine_label_names": [c.encode() for c in classes],
                                    b"coarse_label_names": [b"all"]})
    return {"classes": classes, "images": imgs, "labels": labels, "names": names}


def build_cifar10_dir(folder: Path, out: Path) -> dict:
    """cifar-10-batches-py layout: the images dealt round-robin into 5 train
    batches; test_batch = the first 10 images."""
    classes, imgs, labels, names = read_folder(folder)
    out.mkdir(parents=True)
    order = np.concatenate([np.arange(b, len(imgs), 5) for b in range(5)])
    for b in range(5):
        sel = np.arange(b, len(imgs), 5)
        write_py2_pickle(out / f"data_batch_{b + 1}",
                         cifar_batch(imgs[sel], labels[sel], [names[i] for i in sel], b"labels"))
    write_py2_pickle(out / "test_batch", cifar_batch(imgs[:10], labels[:10], names[:10], b"labels"))
    write_py2_pickle(out / "batches.meta", {b"label_names": [c.encode() for c in classes],
                                            b"num_cases_per_batch": 10000})
    return {"classes": classes, "images": imgs[order], "labels": labels[order],
            "test_images": imgs[:10], "test_labels": labels[:10]}


def build_tar(folder: Path, out: Path, top: str | None = None, mode: str = "w") -> Path:
    """Tar ``folder``'s class folders, at the archive root or under ``top/``."""
    with tarfile.open(out, mode) as tf:
        tf.add(folder, arcname=top or ".")  # "./apple/x.png" when at the root
    return out


def build_hdf5(folder: Path, out: Path, images_key="images", labels_key="labels",
               names_attr=True, gray=False) -> dict:
    classes, imgs, labels, _ = read_folder(folder)
    if gray:
        imgs = imgs[..., 1].copy()
    with h5py.File(out, "w") as f:
        f.create_dataset(images_key, data=imgs, chunks=True)
        d = f.create_dataset(labels_key, data=labels.astype(np.int32))
        if names_attr:
            d.attrs["class_names"] = classes
    return {"classes": classes, "images": imgs, "labels": labels}
