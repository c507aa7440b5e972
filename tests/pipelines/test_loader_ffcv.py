"""The FFCV backend against independent computations.

Oracles: the ORIGINAL source files through torchvision's ImageFolder, decoded
by PIL; crops cut with :func:`pipelines.views.box_to_pixels` and resized by
Python OpenCV (``INTER_AREA``, the filter the decoder implements in numba:
within one level, see :func:`assert_area_equal`) and by torchvision's antialiased bilinear ``resized_crop`` (what the
reference backend does: must match within a stated tolerance). Orders come
from ``torch.utils.data.DistributedSampler``; view ids and boxes from
:mod:`pipelines.views`. Stores are built with dataset_tools/convert.py.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from dataset_tools.records import resize_shorter
from dataset_tools.stores.layout import StoreError, open_store
from pipelines.ffcv.loader import FFCVLoader
from pipelines.ffcv.decoder import (T_CROP_H, T_CROP_W, T_DEC_H, T_DEC_W, T_FLIP, T_INDEX, T_LEFT,
                                T_TOP, T_VIEW)
from pipelines.loader import LoaderConfig, create_loader
from pipelines.reference.loader import reduced_scale
from pipelines.views import box_to_pixels, epoch_view_ids, view_params

from loader_helpers import collect_epoch, convert_store, copy_store, ffcv_cfg, to_uint8

N = 80  # imagenette_subset: 10 classes x 8 JPEGs, 224x224


@pytest.fixture(scope="module")
def jpg_store(imagenette_subset, tmp_path_factory):
    return convert_store(imagenette_subset, tmp_path_factory.mktemp("ffcv_jpg") / "store", "ffcv",
                         "--write-mode", "jpg")


@pytest.fixture(scope="module")
def sources(imagenette_subset):
    """Original pixels and labels, by sample index (ImageFolder order = store order)."""
    folder = ImageFolder(str(imagenette_subset))
    images = [np.array(Image.open(p).convert("RGB")) for p, _ in folder.samples]
    return images, np.array([label for _, label in folder.samples])


@pytest.fixture
def trailers(monkeypatch):
    """Record what the compiled decoder wrote for every batch."""
    seen = []
    original = FFCVLoader._check_trailer

    def record(self, trailer, idx, vids):
        seen.append(trailer.copy())
        return original(self, trailer, idx, vids)

    monkeypatch.setattr(FFCVLoader, "_check_trailer", record)
    return seen


def to_uint8_nhwc(x: torch.Tensor, store) -> np.ndarray:
    """Undo the normalization -> uint8 NHWC, the layout of the OpenCV oracles."""
    return to_uint8(x, store).permute(0, 2, 3, 1).numpy()


def epoch_arrays(loader, store, epoch: int) -> dict:
    """One epoch as numpy arrays; the views as uint8 NHWC (teacher: None if absent)."""
    got = collect_epoch(loader, epoch)
    assert got["student"].dtype == torch.float32 and got["student"].device.type == "cpu"
    out = {k: got[k].numpy() for k in ("indices", "labels", "view_ids", "boxes", "flips")}
    for view in ("student", "teacher"):
        out[view] = to_uint8_nhwc(got[view], store) if view in got else None
    return out


def cv2_view(img: np.ndarray, box, flip: bool, size: int) -> np.ndarray:
    top, left, ch, cw = box_to_pixels(*[float(v) for v in box], img.shape[0], img.shape[1])
    out = cv2.resize(img[top:top + ch, left:left + cw], (size, size), interpolation=cv2.INTER_AREA)
    return out[:, ::-1] if flip else out


def assert_area_equal(got: np.ndarray, want: np.ndarray) -> None:
    """The decoder's numba INTER_AREA (pipelines.kernels.area_resize) against OpenCV's:
    the same filter, exact and rounded half up there, summed in float and
    rounded half to even by OpenCV, so a value may differ by one level,
    rarely (<0.1% of values on random crops; bound here at 1%)."""
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert d.max() <= 1 and (d > 0).mean() <= 0.01, (d.max(), (d > 0).mean())


def torchvision_view(img: np.ndarray, box, flip: bool, size: int) -> np.ndarray:
    top, left, ch, cw = box_to_pixels(*[float(v) for v in box], img.shape[0], img.shape[1])
    out = TF.resized_crop(torch.from_numpy(img).permute(2, 0, 1), top, left, ch, cw,
                          [size, size], antialias=True)
    out = TF.horizontal_flip(out) if flip else out
    return out.permute(1, 2, 0).numpy()


# Tolerance vs the reference's resize (torchvision antialiased bilinear, a
# triangle filter) for FFCV's INTER_AREA (box filter) on the same pixels and
# box: mean |diff| <= MEAN_TOL levels, 99th percentile <= P99_TOL. Measured on
# these images: 2.9 / 17 at 32 px and 1.9 / 13 at 64 px.
TOL = {32: (4.0, 24), 64: (3.0, 18)}


def test_crops_match_source_oracles(raw_store, sources, trailers):
    images, labels = sources
    cfg = ffcv_cfg(raw_store, teacher_resolution=64, shuffle=True)
    with create_loader(cfg) as loader:
        assert isinstance(loader, FFCVLoader) and len(loader) == 5
        got = epoch_arrays(loader, raw_store, epoch=1)
    idx = got["indices"]
    assert sorted(idx.tolist()) == list(range(N))
    np.testing.assert_array_equal(got["labels"], labels[idx])
    np.testing.assert_array_equal(got["view_ids"], epoch_view_ids(loader.views, idx, 1))
    boxes, flips = view_params(loader.views, idx, got["view_ids"])
    np.testing.assert_array_equal(got["boxes"], boxes)
    np.testing.assert_array_equal(got["flips"], flips)
    assert 0 < flips.sum() < N

    # What the compiled decoder did, sample by sample, is what the Batch says.
    tr = np.concatenate(trailers)
    np.testing.assert_array_equal(tr[:, T_INDEX], idx)  # decoder's source index == index field
    np.testing.assert_array_equal(tr[:, T_VIEW], got["view_ids"])
    np.testing.assert_array_equal(tr[:, T_FLIP].astype(bool), flips)
    assert (tr[:, T_DEC_H] == 224).all() and (tr[:, T_DEC_W] == 224).all()
    px = np.array([box_to_pixels(*[float(v) for v in b], 224, 224) for b in boxes])
    np.testing.assert_array_equal(tr[:, [T_TOP, T_LEFT, T_CROP_H, T_CROP_W]], px)

    for size, views in ((32, got["student"]), (64, got["teacher"])):
        assert views.shape == (N, size, size, 3)
        diffs = []
        for k, i in enumerate(idx):
            # Same pixels, same box, same filter: equal to rounding.
            assert_area_equal(views[k], cv2_view(images[i], boxes[k], flips[k], size))
            diffs.append(np.abs(views[k].astype(int) - torchvision_view(images[i], boxes[k],
                                                                        flips[k], size)))
        diffs = np.stack(diffs)
        mean_tol, p99_tol = TOL[size]
        assert diffs.mean() <= mean_tol and np.percentile(diffs, 99) <= p99_tol, \
            (size, diffs.mean(), np.percentile(diffs, 99))


def test_decoder_normalization_is_finish_batch_normalization(jpg_store):
    """On CPU the kernel writes normalized, flipped views into a new array per
    batch; the uint8 path (what CUDA uses) + BaseLoader._normalize must give
    bitwise the same tensors (the resize is exact integer arithmetic and the
    table holds exactly what _normalize computes), and kept batches must not
    be overwritten."""
    for channels_last in (False, True):
        cfg = ffcv_cfg(jpg_store, teacher_resolution=48, channels_last=channels_last,
                      reduced_decode=True)
        epochs = {}
        for fused in (True, False):
            with FFCVLoader(cfg, normalize_in_decoder=fused) as loader:
                loader.set_epoch(2)
                epochs[fused] = list(loader)  # all kept: no buffer may be reused under them
        assert len(epochs[True]) == len(epochs[False]) == 5
        for fast, slow in zip(epochs[True], epochs[False]):
            for name in ("student", "teacher"):
                a, b = getattr(fast, name), getattr(slow, name)
                assert a.dtype == torch.float32 and a.shape == b.shape, name
                assert torch.equal(a, b), (name, int((a != b).sum()))
                assert a.is_contiguous(memory_format=torch.channels_last) == channels_last
                assert channels_last or a.is_contiguous()
            assert torch.equal(fast.indices, slow.indices) and torch.equal(fast.boxes, slow.boxes)
        student = epochs[True][0].student
        assert student.shape == (16, 3, 32, 32) and epochs[True][0].teacher.shape[-1] == 48


def test_replayed_views_and_epoch_order(raw_store, sources):
    images, _ = sources
    cfg = ffcv_cfg(raw_store, num_views=3, student_resolution=16, shuffle=True, seed=5)
    seen: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    orders = []
    repeats = 0
    with create_loader(cfg) as loader:
        for epoch in range(4):
            got = epoch_arrays(loader, raw_store, epoch)
            sampler = DistributedSampler(range(N), num_replicas=1, rank=0, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            np.testing.assert_array_equal(got["indices"], list(sampler))
            orders.append(got["indices"])
            assert set(got["view_ids"].tolist()) <= {0, 1, 2}
            np.testing.assert_array_equal(got["view_ids"],
                                          epoch_view_ids(loader.views, got["indices"], epoch))
            for k, (i, v) in enumerate(zip(got["indices"].tolist(), got["view_ids"].tolist())):
                if (i, v) in seen:
                    repeats += 1
                    np.testing.assert_array_equal(got["boxes"][k], seen[(i, v)][0])
                    np.testing.assert_array_equal(got["student"][k], seen[(i, v)][1])
                else:
                    assert_area_equal(
                        got["student"][k], cv2_view(images[i], got["boxes"][k], got["flips"][k], 16))
                    seen[(i, v)] = (got["boxes"][k], got["student"][k])
    assert repeats >= N  # 4 epochs over 3 views: every sample replays at least once
    assert not np.array_equal(orders[0], orders[1])
    with create_loader(cfg) as again:  # a new loader reproduces an epoch exactly
        got = epoch_arrays(again, raw_store, 2)
    np.testing.assert_array_equal(got["indices"], orders[2])
    for k, (i, v) in enumerate(zip(got["indices"].tolist(), got["view_ids"].tolist())):
        np.testing.assert_array_equal(got["student"][k], seen[(i, v)][1])


def test_eval_is_view_zero_and_fixed_view_is_fixed(raw_store, sources):
    images, _ = sources
    with create_loader(ffcv_cfg(raw_store, train=False, shuffle=False)) as loader:
        got = epoch_arrays(loader, raw_store, 4)
    np.testing.assert_array_equal(got["indices"], np.arange(N))
    assert (got["view_ids"] == 0).all() and not got["flips"].any()
    assert (got["boxes"] == np.array([0, 0, 1, 1], np.float32)).all()
    for i in range(N):
        assert_area_equal(got["student"][i], cv2.resize(images[i], (32, 32),
                                                                    interpolation=cv2.INTER_AREA))
    with create_loader(ffcv_cfg(raw_store, fixed_view=7, student_resolution=16)) as loader:
        a, b = epoch_arrays(loader, raw_store, 0), epoch_arrays(loader, raw_store, 3)
    assert (a["view_ids"] == 7).all() and (b["view_ids"] == 7).all()
    order = np.argsort(a["indices"]), np.argsort(b["indices"])
    np.testing.assert_array_equal(a["student"][order[0]], b["student"][order[1]])
    np.testing.assert_array_equal(a["boxes"][order[0]], b["boxes"][order[1]])


def test_lowres_store_path(raw_store, sources, trailers):
    images, _ = sources
    side = open_store(raw_store).manifest["stores"]["ffcv_lowres"]["resolution"]
    assert side == 63  # ceil(32 * sqrt((4/3) / 0.35))
    cfg = ffcv_cfg(raw_store, lowres=True, shuffle=False)
    with create_loader(cfg) as loader:
        low = epoch_arrays(loader, raw_store, 2)
    with create_loader(ffcv_cfg(raw_store, shuffle=False)) as loader:
        full = epoch_arrays(loader, raw_store, 2)
    for k in ("indices", "labels", "view_ids", "boxes", "flips"):
        np.testing.assert_array_equal(low[k], full[k])
    tr = np.concatenate(trailers[:len(trailers) // 2])
    assert (tr[:, T_DEC_H] == side).all() and (tr[:, T_DEC_W] == side).all()
    for i in range(N):  # exact against the converter's low-res rule + INTER_AREA
        small = resize_shorter(images[i], side)
        assert_area_equal(low["student"][i], cv2_view(small, low["boxes"][i],
                                                                  low["flips"][i], 32))
    # vs the full-resolution path: the same view; pixels differ by the extra
    # downscale (PIL bilinear to 63 px) and the box rounded on 63 px instead of
    # 224 px (sub-pixel shifts on textured images). Measured mean: 6.5 levels
    # (2.5 for the whole-image view 0, where no box rounding is involved).
    d = np.abs(low["student"].astype(int) - full["student"])
    assert d.mean() <= 9.0, d.mean()


def test_reduced_jpeg_decode(jpg_store, sources, trailers):
    images, _ = sources
    cfg = ffcv_cfg(jpg_store, shuffle=False)
    with create_loader(cfg) as loader:
        full = epoch_arrays(loader, jpg_store, 1)
    n_full = len(trailers)
    with create_loader(LoaderConfig(**{**cfg.__dict__, "reduced_decode": True})) as loader:
        red = epoch_arrays(loader, jpg_store, 1)
    tr_full, tr_red = np.concatenate(trailers[:n_full]), np.concatenate(trailers[n_full:])
    np.testing.assert_array_equal(red["boxes"], full["boxes"])
    assert (tr_full[:, T_DEC_H] == 224).all()
    # Scale rule shared with the reference backend (its own implementation).
    k = np.array([reduced_scale(224, 224, b, 32) for b in red["boxes"]])
    np.testing.assert_array_equal(tr_red[:, T_DEC_H], -(-224 // k))
    assert (k > 1).sum() >= N // 2
    # JPEG (q90, FFCV's fast IDCT) vs the PIL-decoded source, same box and kernel.
    d_full = np.abs(full["student"].astype(int)
                    - np.stack([cv2_view(images[i], full["boxes"][i], full["flips"][i], 32)
                                for i in range(N)]))
    assert d_full.mean() <= 2.0, d_full.mean()
    d_red = np.abs(red["student"].astype(int) - full["student"])
    assert d_red.mean() <= 4.0, d_red.mean()


def test_distributed_shards_like_distributed_sampler(raw_store):
    world, seen = 3, []
    for rank in range(world):
        cfg = ffcv_cfg(raw_store, student_resolution=8, shuffle=True, seed=1)
        with FFCVLoader(cfg, rank=rank, world_size=world) as loader:
            assert loader.samples_per_rank == 27 and len(loader) == 2
            got = epoch_arrays(loader, raw_store, 1)
        sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=True, seed=1)
        sampler.set_epoch(1)
        np.testing.assert_array_equal(got["indices"], list(sampler))
        seen.append(got["indices"])
    allx = np.concatenate(seen)
    assert len(allx) == 81 and set(allx.tolist()) == set(range(N))  # one padding repeat


def test_errors_name_the_problem(raw_store, jpg_store, tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        FFCVLoader(ffcv_cfg(tmp_path / "nope"))
    with pytest.raises(StoreError, match="student-resolution"):
        FFCVLoader(ffcv_cfg(jpg_store, lowres=True))
    with pytest.raises(ValueError, match="teacher"):
        FFCVLoader(ffcv_cfg(raw_store, lowres=True, teacher_resolution=64))

    no_ffcv = copy_store(raw_store, tmp_path / "no_ffcv")
    m = json.loads((no_ffcv / "manifest.json").read_text())
    del m["stores"]["ffcv"]
    (no_ffcv / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="--formats ffcv"):
        FFCVLoader(ffcv_cfg(no_ffcv))

    wrong_n = copy_store(raw_store, tmp_path / "wrong_n")
    m = json.loads((wrong_n / "manifest.json").read_text())
    m["num_samples"] = N + 1
    (wrong_n / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="samples but"):
        FFCVLoader(ffcv_cfg(wrong_n))

    garbage = copy_store(raw_store, tmp_path / "garbage")
    (garbage / "train.beton").write_bytes(b"not an ffcv file" * 64)
    with pytest.raises(StoreError, match="train.beton"):
        FFCVLoader(ffcv_cfg(garbage))


def _rewrite_beton(path, edit):
    """Apply ``edit(reader, mmap)`` to a .beton file in place."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    data = np.memmap(path, dtype=np.uint8, mode="r+")
    edit(reader, data)
    data.flush()


def test_corrupt_store_content_is_detected(raw_store, jpg_store, tmp_path):
    from ffcv.types import HeaderType

    def swap_index(reader, data):  # the 'index' field of samples 0 and 1 swapped
        meta = reader.metadata.copy()
        f = f"f{reader.field_names.index('index')}"
        meta[f][[0, 1]] = meta[f][[1, 0]]
        start = HeaderType.itemsize + reader.field_descriptors.nbytes
        data[start:start + meta.nbytes] = meta.view(np.uint8)

    bad_index = copy_store(raw_store, tmp_path / "bad_index")
    _rewrite_beton(bad_index / "train.beton", swap_index)
    with FFCVLoader(ffcv_cfg(bad_index, shuffle=False, student_resolution=8)) as loader:
        with pytest.raises(StoreError, match="'index' field"):
            next(iter(loader))

    def zero_jpeg(reader, data):  # sample 3's JPEG bytes destroyed
        ptr = int(reader.metadata["f0"][3]["data_ptr"])
        data[ptr:ptr + 64] = 0

    bad_jpeg = copy_store(jpg_store, tmp_path / "bad_jpeg")
    _rewrite_beton(bad_jpeg / "train.beton", zero_jpeg)
    with FFCVLoader(ffcv_cfg(bad_jpeg, shuffle=False, student_resolution=8)) as loader:
        with pytest.raises(StoreError, match=r"decode sample\(s\) \[3\]"):
            next(iter(loader))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(raw_store):
    cfg = ffcv_cfg(raw_store, teacher_resolution=64, shuffle=True)
    with create_loader(cfg) as cpu_loader:
        a = epoch_arrays(cpu_loader, raw_store, 1)
    with create_loader(LoaderConfig(**{**cfg.__dict__, "device": "cuda"})) as gpu_loader:
        gpu_loader.set_epoch(1)
        batches = [b.to("cpu") for b in gpu_loader]
    assert all(b is not None for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.indices.numpy() for b in batches]), a["indices"])
    student = np.concatenate([to_uint8_nhwc(b.student, raw_store) for b in batches])
    teacher = np.concatenate([to_uint8_nhwc(b.teacher, raw_store) for b in batches])
    np.testing.assert_array_equal(student, a["student"])
    np.testing.assert_array_equal(teacher, a["teacher"])
