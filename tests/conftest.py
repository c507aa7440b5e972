"""Shared fixtures: small, deterministic subsets of the shared datasets."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dataset_tools.locate import shared_datasets_dir


@pytest.fixture(scope="session")
def data_root() -> Path:
    return shared_datasets_dir()


def make_subset(src_split: Path, dst: Path, classes: int, per_class: int) -> Path:
    """Copy the first ``per_class`` files of the first ``classes`` class folders
    (sorted) into an ImageFolder at ``dst``."""
    class_dirs = sorted(p for p in src_split.iterdir() if p.is_dir())[:classes]
    for cdir in class_dirs:
        out = dst / cdir.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(cdir.iterdir())[:per_class]:
            shutil.copyfile(f, out / f.name)
    return dst


@pytest.fixture(scope="session")
def cifar_subset(data_root, tmp_path_factory) -> Path:
    """CIFAR-100 train: 10 classes x 20 PNGs (32x32)."""
    return make_subset(data_root / "cifar100" / "train", tmp_path_factory.mktemp("cifar_sub"), 10, 20)


@pytest.fixture(scope="session")
def imagenette_subset(data_root, tmp_path_factory) -> Path:
    """Imagenette-224 train: 10 classes x 8 JPEGs (224x224)."""
    return make_subset(data_root / "imagenette-224" / "train",
                       tmp_path_factory.mktemp("inette_sub"), 10, 8)


@pytest.fixture(scope="session")
def raw_store(imagenette_subset, tmp_path_factory) -> Path:
    """The imagenette subset as an FFCV store of raw pixels (the PIL decode
    of each source JPEG) with a 32 px low-res companion."""
    from loader_helpers import convert_store

    return convert_store(imagenette_subset, tmp_path_factory.mktemp("ffcv_raw") / "store", "ffcv",
                         "--write-mode", "raw", "--student-resolution", "32")


@pytest.fixture(scope="session")
def dali_jpeg_store(imagenette_subset, tmp_path_factory) -> Path:
    """The imagenette subset as DALI webdataset shards (JPEG)."""
    from loader_helpers import convert_store

    return convert_store(imagenette_subset, tmp_path_factory.mktemp("dali_jpeg") / "store", "dali")


@pytest.fixture(scope="session")
def dali_png_store(cifar_subset, tmp_path_factory) -> Path:
    """The CIFAR subset as DALI webdataset shards (PNG)."""
    from loader_helpers import convert_store

    return convert_store(cifar_subset, tmp_path_factory.mktemp("dali_png") / "store", "dali")


@pytest.fixture(scope="session")
def dali_varsize(imagenette_subset, tmp_path_factory) -> tuple[Path, Path]:
    """(source folder, DALI store) of images of different, non-square,
    non-MCU-aligned sizes (JPEG and PNG)."""
    from PIL import Image

    from loader_helpers import convert_store

    src = tmp_path_factory.mktemp("dali_var_src")
    sizes = [(224, 160), (150, 224), (97, 131), (64, 201), (33, 47), (211, 99)]
    files = sorted(p for p in imagenette_subset.rglob("*") if p.is_file())
    for k, (h, w) in enumerate(sizes * 2):
        cls = src / f"c{k % 2}"
        cls.mkdir(exist_ok=True)
        with Image.open(files[k]) as im:
            im = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
            if k < len(sizes):
                im.save(cls / f"{k:02d}.jpg", quality=90)
            else:
                im.save(cls / f"{k:02d}.png")
    return src, convert_store(src, tmp_path_factory.mktemp("dali_var") / "store", "dali")


@pytest.fixture(scope="session")
def cifar_stores(data_root, tmp_path_factory) -> dict:
    """Converted CIFAR-100 stores for trainer tests: train 10 classes x 60
    split at convert time into train (48 per class) and a held-out val (12
    per class), test 10 classes x 20; raw pixels, with a 16 px low-res
    companion."""
    from dataset_tools.convert import main as convert_main

    root = tmp_path_factory.mktemp("cifar_stores")
    out = {}
    for split, per_class in (("train", 60), ("test", 20)):
        src = make_subset(data_root / "cifar100" / split, root / f"src_{split}", 10, per_class)
        args = [str(src), str(root / split), "--write-mode", "raw", "--workers", "1",
                "--split-name", split]
        if split == "train":
            args += ["--student-resolution", "16", "--val-fraction", "0.2", "--val-seed", "0"]
        assert convert_main(args) == 0
        out[split] = root / split
    out["val"] = root / "val"
    return out


@pytest.fixture(scope="session")
def teacher_run(cifar_stores, tmp_path_factory):
    """A trained teacher (resnet8, 4 epochs on ``cifar_stores``), its
    temperature fitted on the val split and a filled cache, shared by the
    trainer and benchmark tests."""
    from trainer import jobs
    from trainer_helpers import make_cfg

    out = tmp_path_factory.mktemp("runs")
    cfg = make_cfg(cifar_stores, out, optim=dict(epochs=4))
    teacher = jobs.run_teacher(cfg)
    calib = jobs.run_calibrate(cfg)
    cache = jobs.run_cache(cfg)
    return cfg, teacher, calib, cache
