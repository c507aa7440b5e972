"""The reference backend against independent computations.

The oracle reads the ORIGINAL source files through torchvision's ImageFolder
(not the store), decodes them with PIL and crops with torchvision, so store
indexing, labels, views and rounding are all checked end to end.
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import time

import numpy as np
import psutil
import pytest
import torch
import torchvision.transforms.functional as F1
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torchvision.datasets import ImageFolder

from dataset_tools.stores.manifest import PixelDigest, sample_pixel_digest
from dataset_tools.stores.layout import StoreError, open_store
from pipelines.loader import LoaderConfig, create_loader
from pipelines.reference.loader import decode, lowres_source, reduced_scale
from pipelines.views import box_to_pixels, view_params

from loader_helpers import collect_epoch, convert_store, to_uint8


@pytest.fixture(scope="module")
def jpeg_store(imagenette_subset, tmp_path_factory):
    """80 imagenette JPEGs (kept byte-identical in the shards), with a low-res store."""
    return convert_store(imagenette_subset, tmp_path_factory.mktemp("ref_jpeg") / "store",
                         "dali", "--student-resolution", "32")


@pytest.fixture(scope="module")
def png_store(cifar_subset, tmp_path_factory):
    """200 CIFAR PNGs (32x32), stored as PNG: lossless."""
    return convert_store(cifar_subset, tmp_path_factory.mktemp("ref_png") / "store", "dali")


@pytest.fixture(scope="module")
def sources(imagenette_subset, cifar_subset, jpeg_store, png_store):
    """kind -> (store dir, ImageFolder of the original files). The sample
    order is checked to be ImageFolder's by recomputing the manifest's
    fingerprint (sha256 of each file's bytes + label) from the original files."""
    out = {}
    for kind, src, store in (("jpeg", imagenette_subset, jpeg_store), ("png", cifar_subset, png_store)):
        folder = ImageFolder(str(src))
        h = hashlib.sha256()
        for path, label in folder.samples:
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
            h.update(int(label).to_bytes(8, "little", signed=True))
        assert open_store(store).fingerprint == "sha256:" + h.hexdigest()
        out[kind] = (store, folder)
    return out


def cfg_for(store, **kw) -> LoaderConfig:
    base = dict(backend="reference", store=str(store), batch_size=16, num_workers=0,
                device="cpu", reduced_decode=False, drop_last=False)
    base.update(kw)
    return LoaderConfig(**base)


def pil_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def as_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def expected_view(path, box, flip, size) -> list[torch.Tensor]:
    """Independent computations of one view: torchvision v2 on the decoded
    tensor (the contract's call), v1 on the tensor, v1 on the PIL image."""
    im = pil_rgb(path)
    top, left, h, w = box_to_pixels(*[float(v) for v in box], im.height, im.width)
    outs = [F2.resized_crop(as_tensor(im), top, left, h, w, [size, size], antialias=True),
            F1.resized_crop(as_tensor(im), top, left, h, w, [size, size], antialias=True),
            as_tensor(F1.resized_crop(im, top, left, h, w, [size, size]))]
    return [F1.hflip(o) for o in outs] if flip else outs


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_views_equal_direct_computation(sources, kind):
    store, folder = sources[kind]
    cfg = cfg_for(store, teacher_resolution=48, seed=3)
    with create_loader(cfg) as loader:
        got = collect_epoch(loader, epoch=1, max_batches=2)
        idx = got["indices"].numpy()
        assert (got["view_ids"] == 2).all()  # random mode: view epoch + 1
        boxes, flips = view_params(cfg.view_config(), idx, np.full(len(idx), 2))
        assert torch.equal(got["boxes"], torch.from_numpy(boxes))
        assert torch.equal(got["flips"], torch.from_numpy(flips))
        assert 0 < flips.sum() < len(flips)
        student, teacher = to_uint8(got["student"], store), to_uint8(got["teacher"], store)
    for j, i in enumerate(idx):
        path, label = folder.samples[i]
        assert got["labels"][j] == label
        for size, img in ((32, student[j]), (48, teacher[j])):
            v2, v1, pil = expected_view(path, boxes[j], flips[j], size)
            assert torch.equal(img, v2), f"sample {i} ({path}) at {size}px"
            # The other antialiased bilinear implementations agree to 1 level.
            assert (img.int() - v1.int()).abs().max() <= 1
            assert (img.int() - pil.int()).abs().max() <= 1


def test_epoch_covers_store_and_batches(sources):
    store, folder = sources["jpeg"]
    man = open_store(store).manifest
    with create_loader(cfg_for(store, batch_size=24)) as loader:
        assert len(loader) == 4
        got = collect_epoch(loader)
    assert got["sizes"] == [24, 24, 24, 8]
    idx = got["indices"].numpy()
    assert sorted(idx.tolist()) == list(range(80))
    assert got["labels"].tolist() == [folder.targets[i] for i in idx]
    assert np.bincount(got["labels"].numpy()).tolist() == man["class_counts"]
    with create_loader(cfg_for(store, batch_size=24, drop_last=True)) as loader:
        assert len(loader) == 3
        got = collect_epoch(loader)
    assert got["sizes"] == [24, 24, 24] and len(set(got["indices"].tolist())) == 72


def test_eval_mode_is_whole_image(sources):
    store, folder = sources["jpeg"]
    with create_loader(cfg_for(store, train=False)) as loader:
        got = collect_epoch(loader, epoch=5, max_batches=1)
    assert (got["view_ids"] == 0).all() and not got["flips"].any()
    assert torch.equal(got["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(16, 4))
    student = to_uint8(got["student"], store)
    for j, i in enumerate(got["indices"].tolist()):
        full = as_tensor(pil_rgb(folder.samples[i][0]))
        assert torch.equal(student[j], F2.resize(full, [32, 32], antialias=True))


def test_replayed_views_are_identical_across_epochs_and_instances(sources):
    store, _ = sources["jpeg"]
    cfg = cfg_for(store, num_views=3, seed=11)
    seen, vids_per_epoch = {}, []
    loaders = [create_loader(cfg), create_loader(cfg)]
    for loader, epoch in [(loaders[0], 0), (loaders[0], 1), (loaders[1], 1), (loaders[1], 2)]:
        got = collect_epoch(loader, epoch)
        order = got["indices"].argsort()
        vids_per_epoch.append(got["view_ids"][order])
        for j in range(len(got["indices"])):
            key = (int(got["indices"][j]), int(got["view_ids"][j]))
            val = (got["boxes"][j], got["flips"][j], got["student"][j])
            if key in seen:
                assert all(torch.equal(a, b) for a, b in zip(seen[key], val)), key
            else:
                seen[key] = val
    for loader in loaders:
        loader.close()
    assert {v for _, v in seen} == {0, 1, 2}
    assert torch.equal(vids_per_epoch[1], vids_per_epoch[2])  # same epoch, other instance
    assert not torch.equal(vids_per_epoch[0], vids_per_epoch[1])  # epochs draw other views


def test_shuffle_order_depends_on_seed_and_epoch(sources):
    store, _ = sources["png"]

    def order(seed, epoch, shuffle=True):
        with create_loader(cfg_for(store, seed=seed, shuffle=shuffle, batch_size=64)) as loader:
            return collect_epoch(loader, epoch)["indices"].tolist()

    first = order(0, 0)
    assert sorted(first) == list(range(200)) and first != list(range(200))
    assert order(0, 0) == first  # a new instance, same seed and epoch
    assert order(0, 1) != first
    assert order(1, 0) != first
    assert order(0, 3, shuffle=False) == list(range(200))


def test_random_mode_draws_fresh_crops_each_epoch(sources):
    store, _ = sources["png"]
    with create_loader(cfg_for(store, shuffle=False, batch_size=200)) as loader:
        a, b = collect_epoch(loader, 0), collect_epoch(loader, 1)
    assert (a["view_ids"] == 1).all() and (b["view_ids"] == 2).all()
    assert (a["boxes"] != b["boxes"]).any(dim=1).all()


def test_teacher_view_downsampled_matches_student(sources):
    store, _ = sources["jpeg"]
    with create_loader(cfg_for(store, teacher_resolution=128)) as loader:
        got = collect_epoch(loader, 2, max_batches=2)
    assert got["teacher"].shape[1:] == (3, 128, 128) and got["student"].shape[1:] == (3, 32, 32)
    student = to_uint8(got["student"], store).float()
    down = F2.resize(to_uint8(got["teacher"], store), [32, 32], antialias=True).float()
    # Same crop and flip, two resampling paths (crop->32 vs crop->128->32).
    diff = (down - student).abs()
    assert diff.mean() < 1.5 and diff.quantile(0.99) < 12, (diff.mean(), diff.quantile(0.99))
    shifted = (down - student.flip(-1)).abs().mean()
    assert shifted > 4 * diff.mean()  # a mirrored teacher would be caught


def test_reduced_decode_scale_and_closeness(sources):
    store, folder = sources["jpeg"]
    data = open(folder.samples[0][0], "rb").read()
    whole = np.array([0.0, 0.0, 1.0, 1.0])
    # The reduced crop stays >= 2x the output: 224 px -> 8 px may decode at 1/8 (28 px).
    assert [reduced_scale(224, 224, whole, r) for r in (8, 16, 32, 56, 57)] == [8, 4, 2, 2, 1]
    half, more = np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.0, 0.6, 1.0])  # 112, 134 px tall
    assert [reduced_scale(224, 224, b, r) for b, r in ((half, 16), (more, 16))] == [2, 4]
    assert [reduced_scale(224, 224, b, r) for b, r in ((half, 32), (more, 32))] == [1, 2]
    assert decode(data, True, whole, 16).shape == (3, 56, 56)
    assert decode(data, True, whole, 32).shape == (3, 112, 112)
    assert decode(data, True, whole, 57).shape == (3, 224, 224)
    assert decode(data, False, whole, 32).shape == (3, 224, 224)  # PNG: no DCT scaling

    runs = {}
    for reduced in (False, True):
        with create_loader(cfg_for(store, reduced_decode=reduced, teacher_resolution=48)) as loader:
            runs[reduced] = collect_epoch(loader, 4)
    for k in ("indices", "labels", "boxes", "flips"):
        assert torch.equal(runs[False][k], runs[True][k])
    for view in ("student", "teacher"):
        exact, reduced = (to_uint8(runs[r][view], store).float() for r in (False, True))
        diff = (exact - reduced).abs()
        # DCT scaling is a box prefilter, the exact path an antialiased
        # bilinear one: they differ about as much as two resize kernels do.
        assert 0 < diff.mean() < 4.5 and diff.quantile(0.99) < 30, (view, diff.mean())


def test_reduced_decode_is_a_no_op_on_png(sources):
    store, _ = sources["png"]
    runs = [collect_epoch(create_loader(cfg_for(store, reduced_decode=r, batch_size=100)), 1)
            for r in (False, True)]
    assert torch.equal(runs[0]["student"], runs[1]["student"])


def test_lowres_emulation_reproduces_the_lowres_store(sources):
    store, folder = sources["jpeg"]
    s = open_store(store)
    side = s.manifest["stores"]["ffcv_lowres"]["resolution"]
    # Recompute the low-res store's pixel digest from the emulated images.
    digest = PixelDigest()
    for path, _ in folder.samples:
        low = lowres_source(as_tensor(pil_rgb(path)), side)
        assert min(low.shape[1:]) == side
        digest.update(sample_pixel_digest(low.permute(1, 2, 0).numpy()))
    assert digest.hexdigest() == s.manifest["stores"]["ffcv_lowres"]["pixel_sha256"]

    with create_loader(cfg_for(store, lowres=True)) as loader:
        got = collect_epoch(loader, 1, max_batches=1)
    student = to_uint8(got["student"], store)
    for j, i in enumerate(got["indices"].tolist()):
        low = lowres_source(as_tensor(pil_rgb(folder.samples[i][0])), side)
        top, left, h, w = box_to_pixels(*got["boxes"][j].double().tolist(), low.shape[1], low.shape[2])
        want = F2.resized_crop(low, top, left, h, w, [32, 32], antialias=True)
        assert torch.equal(student[j], F1.hflip(want) if got["flips"][j] else want)


def test_lowres_without_lowres_store_is_a_clear_error(sources):
    with pytest.raises(StoreError, match="student-resolution"):
        create_loader(cfg_for(sources["png"][0], lowres=True))


def test_store_errors(sources, tmp_path):
    store, _ = sources["png"]
    fp = open_store(store).fingerprint
    create_loader(cfg_for(store, expected_fingerprint=fp)).close()
    with pytest.raises(StoreError, match="fingerprint .* differs from the expected sha256:00"):
        create_loader(cfg_for(store, expected_fingerprint="sha256:00"))
    with pytest.raises(StoreError, match="no such store directory"):
        create_loader(cfg_for(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    tar = next((broken / "train_wds").glob("*.tar"))
    tar.unlink()
    with pytest.raises(StoreError, match=str(tar)):
        create_loader(cfg_for(broken))
    tar.write_bytes(b"")  # present but empty
    with pytest.raises(StoreError, match=f"{tar}: unreadable webdataset shard"):
        create_loader(cfg_for(broken))
    shutil.copyfile(next((store / "train_wds").glob("*.tar")), tar)
    create_loader(cfg_for(broken)).close()  # repaired
    with tarfile.open(tar, "w"):  # a valid tar without the samples
        pass
    with pytest.raises(StoreError, match="lack 200 of 200 samples"):
        create_loader(cfg_for(broken))
    (broken / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json: missing"):
        create_loader(cfg_for(broken))


def _children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_gone(before, timeout=10.0):
    deadline = time.monotonic() + timeout
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    return _children() - before


def test_workers_persist_across_epochs_and_stop_on_close(sources):
    store, _ = sources["png"]
    with create_loader(cfg_for(store, batch_size=10)) as plain:  # in-process oracle
        want = collect_epoch(plain, 1)["indices"]
    before = _children()
    loader = create_loader(cfg_for(store, num_workers=2, batch_size=10))
    for _ in loader:  # abandon epoch 0 after one batch
        break
    workers = _children() - before
    assert len(workers) == 2
    # The next epoch reuses the workers and yields none of epoch 0's prefetched batches.
    assert torch.equal(collect_epoch(loader, 1)["indices"], want)
    assert _children() - before == workers
    loader.close()
    loader.close()  # twice is fine
    assert not _wait_gone(before)
    assert torch.equal(collect_epoch(loader, 1)["indices"], want)  # usable after close
    # Dropping the last reference stops the workers too, promptly (no reference
    # cycle left to the cyclic GC, under which shutdown waits out timeouts).
    del loader
    assert not _wait_gone(before, timeout=4.0)


def test_close_releases_shard_files(sources):
    store, _ = sources["png"]

    def open_tars():
        return [f.path for f in psutil.Process().open_files() if f.path.endswith(".tar")]

    before = open_tars()
    loader = create_loader(cfg_for(store, num_workers=0))
    next(iter(loader))
    assert len(open_tars()) == len(before) + 1
    loader.close()
    assert open_tars() == before
