"""Each source kind on real data, checked against independent oracles:
torchvision's ImageFolder (classes, labels, order, decoded pixels), the PNGs a
CIFAR/HDF5 file was built from, and hashlib over the file bytes."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from dataset_tools.decode import load_item
from dataset_tools.sources import (IMAGE_EXTENSIONS, BadInput, SourceItem, detect_kind,
                                   open_source)
from source_builders import (build_cifar10_dir, build_cifar100_dir, build_hdf5, build_tar,
                             cifar_batch, read_folder, write_py2_pickle)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def array_digest(a: np.ndarray) -> str:
    """The documented array fingerprint, computed independently."""
    return sha(f"{a.dtype.str}|{a.shape}|".encode() + np.ascontiguousarray(a).tobytes())


def assert_matches_imagefolder(src, root: Path, name_of=lambda rel: rel):
    """Same classes, order, labels and pixels as torchvision's ImageFolder;
    sha256 and data are the file's bytes."""
    ds = ImageFolder(str(root))
    assert src.classes == ds.classes
    assert [(it.name, it.label) for it in src.items] == \
        [(name_of(os.path.relpath(p, root)), y) for p, y in ds.samples]
    for item, (path, _) in zip(src.items, ds.samples):
        loaded = load_item(item)
        raw = Path(path).read_bytes()
        assert loaded.data == raw and loaded.sha256 == sha(raw)
        assert loaded.rgb.dtype == np.uint8 and loaded.rgb.flags.c_contiguous
        np.testing.assert_array_equal(loaded.rgb, np.asarray(ds.loader(path)), err_msg=path)
        assert loaded.fmt == {".png": "png", ".jpeg": "jpeg", ".jpg": "jpeg"}[
            Path(path).suffix.lower()]


def test_image_extensions_are_torchvisions():
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS


@pytest.mark.parametrize("subset", ["cifar_subset", "imagenette_subset"])
def test_imagefolder_matches_torchvision(request, subset):
    root = request.getfixturevalue(subset)
    src = open_source(root)
    assert src.kind == "imagefolder" and src.skipped == []
    assert src.description == f"ImageFolder {root}: 10 classes, {len(src.items)} files"
    assert_matches_imagefolder(src, root)


def test_imagefolder_nested_links_and_junk(tmp_path, cifar_subset):
    root = tmp_path / "train"
    for c in sorted(os.listdir(cifar_subset))[:3]:
        shutil.copytree(cifar_subset / c, root / c)
    a, b = sorted(os.listdir(root))[:2]
    first = sorted(os.listdir(root / a))[0]
    (root / a / "deeper" / "sub").mkdir(parents=True)
    shutil.copy(root / a / first, root / a / "deeper" / "sub" / "nested.png")
    shutil.copy(root / a / first, root / a / "deeper" / "UPPER.PNG")
    (root / "README.txt").write_text("top-level files are ignored")
    (root / b / "notes.txt").write_text("non-image files are ignored")
    os.symlink(root / b, root / "zz_linked_class")       # symlinked class folder
    os.symlink(root / b, root / a / "linked_subfolder")  # symlinked sub-folder
    src = open_source(root)
    assert len(src.classes) == 4 and src.skipped == []
    assert_matches_imagefolder(src, root)

    # Hidden entries are ignored (torchvision would make a class of the
    # folder and fail to decode the AppleDouble file): the listing is unchanged.
    (root / ".ipynb_checkpoints").mkdir()
    shutil.copy(root / a / first, root / ".ipynb_checkpoints" / "x.png")
    (root / a / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (root / b / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    again = open_source(root)
    assert again.classes == src.classes and again.items == src.items and again.skipped == []


@pytest.mark.parametrize("top,mode,name", [(None, "w", "data.tar"), ("train", "w", "data.tar"),
                                           ("train", "w:gz", "data.tar.gz"),
                                           (None, "w:xz", "data.tar.xz")])
def test_tar_matches_imagefolder(tmp_path, cifar_subset, top, mode, name):
    tar = build_tar(cifar_subset, tmp_path / name, top=top, mode=mode)
    with open_source(tar) as src:
        assert src.kind == "tar" and src.skipped == []
        assert (f"(top folder {top}/)" in src.description) == bool(top)
        prefix = f"{name}:{top + '/' if top else ''}"
        assert_matches_imagefolder(src, cifar_subset, lambda rel: prefix + rel)
        tmp_copy = Path(src.items[0].ref[1])
        assert (tmp_copy == tar) == (mode == "w")
    assert mode == "w" or not tmp_copy.exists()  # the decompressed copy is removed


def test_tar_links_inside_archive_resolve(tmp_path, cifar_subset):
    a, b = sorted(os.listdir(cifar_subset))[:2]
    f = sorted(os.listdir(cifar_subset / a))[0]
    raw = (cifar_subset / a / f).read_bytes()
    with tarfile.open(tmp_path / "l.tar", "w") as tf:
        tf.add(cifar_subset / a / f, arcname=f"top/{a}/{f}")
        for kind, name, target in [(tarfile.SYMTYPE, f"top/{b}/sym.png", f"../{a}/{f}"),
                                   (tarfile.LNKTYPE, f"top/{b}/hard.png", f"top/{a}/{f}")]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, target
            tf.addfile(ti)
    src = open_source(tmp_path / "l.tar")
    assert src.classes == [a, b]
    assert [(i.name, i.label) for i in src.items] == [
        (f"l.tar:top/{a}/{f}", 0), (f"l.tar:top/{b}/hard.png", 1), (f"l.tar:top/{b}/sym.png", 1)]
    assert all(load_item(i).data == raw for i in src.items)


def check_cifar(src, classes, images, labels):
    assert src.kind == "cifar" and src.classes == list(classes)
    assert [i.label for i in src.items] == [int(x) for x in labels]
    for item, img in zip(src.items, images):
        loaded = load_item(item)
        np.testing.assert_array_equal(loaded.rgb, img)
        assert loaded.data is None and loaded.fmt == "array"
        assert loaded.sha256 == array_digest(img)


def test_cifar100_pixels_equal_source_pngs(tmp_path, cifar_subset):
    exp = build_cifar100_dir(cifar_subset, tmp_path / "cifar-100-python")
    src = open_source(tmp_path / "cifar-100-python")
    check_cifar(src, exp["classes"], exp["images"], exp["labels"])
    assert src.items[5].name == "train[5]" and "CIFAR-100" in src.description
    test = open_source(tmp_path / "cifar-100-python", split="test")
    check_cifar(test, exp["classes"], exp["images"][::3], exp["labels"][::3])


def test_cifar10_batches_in_order(tmp_path, cifar_subset):
    exp = build_cifar10_dir(cifar_subset, tmp_path / "cifar-10-batches-py")
    src = open_source(tmp_path / "cifar-10-batches-py")
    check_cifar(src, exp["classes"], exp["images"], exp["labels"])
    assert src.items[0].name == "data_batch_1[0]" and src.items[-1].name.startswith("data_batch_5")
    test = open_source(tmp_path / "cifar-10-batches-py", split="test")
    check_cifar(test, exp["classes"], exp["test_images"], exp["test_labels"])


def test_cifar_single_batch_file_and_python3_pickles(tmp_path, cifar_subset):
    classes, imgs, labels, names = read_folder(cifar_subset)
    d = tmp_path / "single"
    d.mkdir()
    write_py2_pickle(d / "test_batch", cifar_batch(imgs, labels, names, b"labels"))
    write_py2_pickle(d / "batches.meta", {b"label_names": [c.encode() for c in classes]})
    assert detect_kind(d / "test_batch") == "cifar"
    check_cifar(open_source(d / "test_batch"), classes, imgs, labels)
    # Re-saved by Python 3 (str keys; protocol 2 spells bytes via _codecs.encode).
    batch = {k.decode(): v for k, v in cifar_batch(imgs, labels, names, b"labels").items()}
    for proto in (2, 4, 5):
        f = tmp_path / f"py3_proto{proto}"
        f.write_bytes(pickle.dumps(batch, protocol=proto))
        src = open_source(f, "cifar")
        check_cifar(src, [f"class_{i}" for i in range(10)], imgs, labels)
        named = open_source(f, "cifar", class_names=classes)
        assert named.classes == classes


@pytest.mark.parametrize("gray", [False, True])
def test_hdf5_matches_source_pngs(tmp_path, cifar_subset, gray):
    exp = build_hdf5(cifar_subset, tmp_path / "train.h5", gray=gray)
    src = open_source(tmp_path / "train.h5")
    assert src.kind == "hdf5" and src.classes == exp["classes"]
    assert [i.label for i in src.items] == exp["labels"].tolist()
    assert src.items[7].name == "train.h5[7]"
    for item, img in zip(src.items, exp["images"]):
        loaded = load_item(item)
        want = np.repeat(img[..., None], 3, axis=2) if gray else img
        np.testing.assert_array_equal(loaded.rgb, want)
        assert loaded.sha256 == array_digest(img) and loaded.fmt == "array"


def test_hdf5_custom_keys_and_default_class_names(tmp_path, cifar_subset):
    exp = build_hdf5(cifar_subset, tmp_path / "d.hdf5", images_key="data/x",
                     labels_key="data/y", names_attr=False)
    src = open_source(tmp_path / "d.hdf5", hdf5_images="data/x", hdf5_labels="data/y")
    assert src.classes == [f"class_{i}" for i in range(10)]
    np.testing.assert_array_equal(load_item(src.items[-1]).rgb, exp["images"][-1])


def test_detect_kind(tmp_path, cifar_subset):
    build_cifar100_dir(cifar_subset, tmp_path / "c100")
    build_tar(cifar_subset, tmp_path / "noext", mode="w")
    build_hdf5(cifar_subset, tmp_path / "noext_h5")
    assert detect_kind(cifar_subset) == "imagefolder"
    assert detect_kind(tmp_path / "c100") == "cifar"
    assert detect_kind(tmp_path / "noext") == "tar"
    assert detect_kind(tmp_path / "noext_h5") == "hdf5"


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_load_item_in_worker_processes(tmp_path, cifar_subset, method):
    build_cifar100_dir(cifar_subset, tmp_path / "c100")
    build_hdf5(cifar_subset, tmp_path / "t.h5")
    build_tar(cifar_subset, tmp_path / "t.tar.gz", top="train", mode="w:gz")
    srcs = [open_source(p) for p in (cifar_subset, tmp_path / "c100", tmp_path / "t.h5",
                                     tmp_path / "t.tar.gz")]
    items = [it for s in srcs for it in s.items[::40]]
    local = [load_item(it) for it in items]  # also opens the HDF5 file in this process
    bad = SourceItem("missing.png", 0, str(tmp_path / "missing.png"))
    with ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as pool:
        remote = list(pool.map(load_item, items))
        with pytest.raises(BadInput) as e:
            pool.submit(load_item, bad).result()
    assert e.value.file == str(tmp_path / "missing.png") and "cannot read" in e.value.reason
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a.rgb, b.rgb)
        assert (a.sha256, a.fmt, a.data) == (b.sha256, b.fmt, b.data)
    for s in srcs:
        s.close()
