"""The in-memory backend: its resize kernel against torchvision one image at
a time, the per-process resident splits, sharding, the memory budget, and
mixed-size stores. (Pixels and views against the reference backend, epoch by
epoch: tests/pipelines/test_loader_equivalence.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dataset_tools.stores.layout import StoreError
from pipelines.kernels.resized_crop import pixel_boxes, resized_crop_batch
from pipelines.loader import LoaderConfig, create_loader
from pipelines.memory import loader as memory
from pipelines.views import box_to_pixels

from loader_helpers import collect_epoch, convert_store, to_uint8


@pytest.fixture(scope="module")
def png_store(cifar_subset, tmp_path_factory):
    return convert_store(cifar_subset, tmp_path_factory.mktemp("mem_png") / "store", "dali",
                         "--student-resolution", "16")


@pytest.fixture(scope="module")
def mixed_size_store(tmp_path_factory):
    """Six images of three different sizes (the padding path)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mem_mixed") / "src"
    rng = np.random.default_rng(0)
    for c, (h, w) in enumerate(((40, 24), (24, 40), (33, 33))):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(2):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{k}.png")
    return convert_store(root, tmp_path_factory.mktemp("mem_mixed") / "store", "dali")


def _cfg(store, **kw) -> LoaderConfig:
    base = dict(backend="memory", store=str(store), batch_size=16, num_workers=1, device="cpu",
                drop_last=False, seed=5, student_resolution=16, num_views=3)
    base.update(kw)
    return LoaderConfig(**base)


@pytest.mark.parametrize("size,in_hw", [(16, (32, 32)), (32, (32, 32)), (24, (40, 60)), (64, (33, 33))])
def test_batched_resize_matches_torchvision_per_image(size, in_hw):
    rng = np.random.default_rng(size)
    n, (h, w) = 24, in_hw
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8))
    boxes = np.stack([rng.uniform(0, 0.5, n), rng.uniform(0, 0.5, n),
                      rng.uniform(0.2, 0.5, n), rng.uniform(0.2, 0.5, n)], axis=1).astype(np.float32)
    flips = rng.uniform(size=n) < 0.5
    pix = pixel_boxes(boxes, np.full(n, h), np.full(n, w))
    for i in range(n):  # the vectorised rounding is box_to_pixels, bit for bit
        assert tuple(pix[i]) == box_to_pixels(*map(float, boxes[i]), h, w)
    got = resized_crop_batch(images, torch.from_numpy(pix), torch.from_numpy(flips), size)
    for i in range(n):
        t, l, ch, cw = map(int, pix[i])
        ref = TF.resized_crop(images[i], t, l, ch, cw, size=[size, size], antialias=True)
        ref = TF.horizontal_flip(ref) if flips[i] else ref
        diff = (got[i] - ref.float()).abs()
        assert diff.max() <= 1, f"sample {i}: {diff.max():.0f} levels off torchvision"
        assert (got[i] - ref.flip(-1).float()).abs().mean() > 5  # the comparison discriminates


def test_resident_split_is_decoded_once_per_process(png_store):
    memory._RESIDENT.clear()
    with create_loader(_cfg(png_store)) as a, create_loader(_cfg(png_store, train=False)) as b:
        assert a.split is b.split
        assert a.split.images.dtype == torch.uint8 and a.split.images.shape == (200, 3, 32, 32)
    side = int(a.store.manifest["stores"]["ffcv_lowres"]["resolution"])
    with create_loader(_cfg(png_store, lowres=True)) as c:  # the low-res source is another split
        assert c.split is not a.split and c.split.images.shape[-1] == min(32, side)


def test_shards_are_disjoint_and_cover_the_split(png_store):
    seen = []
    for rank in range(2):
        with create_loader(_cfg(png_store), rank=rank, world_size=2) as loader:
            seen.append(collect_epoch(loader, 3)["indices"].tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(200))


def test_too_big_for_the_budget_is_a_clear_error(png_store):
    memory._RESIDENT.clear()
    with pytest.raises(StoreError, match=r"memory backend would hold .* GiB .* data\.backend=ffcv"):
        memory.MemoryLoader(_cfg(png_store), max_bytes=1000)


def test_mixed_sizes_are_padded_and_cropped_within_each_image(mixed_size_store):
    from pipelines.kernels.pil_image import decode  # the reference's decode of one sample
    from dataset_tools.stores.layout import open_store
    from dataset_tools.stores.webdataset import index_shards

    with create_loader(_cfg(mixed_size_store, train=False, student_resolution=20, batch_size=6)) as loader:
        got = collect_epoch(loader, 0)
        split = loader.split
    assert split.images.shape == (6, 3, 40, 40)
    assert sorted(zip(split.heights.tolist(), split.widths.tolist())) == sorted(
        [(40, 24)] * 2 + [(24, 40)] * 2 + [(33, 33)] * 2)
    shards = index_shards(open_store(mixed_size_store))
    mean = torch.tensor(loader.store.mean).view(3, 1, 1) * 255
    std = torch.tensor(loader.store.std).view(3, 1, 1) * 255
    for row, i in enumerate(got["indices"].tolist()):
        with open(shards.tars[shards.shard[i]], "rb") as f:
            f.seek(int(shards.offset[i]))
            img = decode(f.read(int(shards.size[i])), False)
        ref = TF.resize(img, [20, 20], antialias=True).float()
        levels = got["student"][row] * std + mean
        assert (levels - ref).abs().max() <= 1.01, f"sample {i}: padding leaked into the view"


@pytest.mark.parametrize("kw", [dict(num_views=3, teacher_resolution=32), dict(train=False),
                                dict(fixed_view=2, num_views=3)])
def test_view_bank_equals_resizing_per_batch(png_store, kw):
    """Replayable views come from a bank resized once; without room for it
    (a budget that fits the split only) every batch is resized: the same
    views, and the bank is shared by the next loader of the same views."""
    memory._RESIDENT.clear()
    memory._BANKS.clear()
    with create_loader(_cfg(png_store, **kw)) as banked:
        assert all(b is not None for b in banked.banks.values())
        got = collect_epoch(banked, 4)
    split_bytes = 200 * 3 * 32 * 32
    memory._BANKS.clear()
    per_batch = memory.MemoryLoader(_cfg(png_store, **kw), max_bytes=split_bytes + 100)
    assert all(b is None for b in per_batch.banks.values())
    ref = collect_epoch(per_batch, 4)
    for k in ("indices", "labels", "boxes", "flips", "view_ids"):
        assert torch.equal(got[k], ref[k]), k
    for view in ("student", "teacher"):
        if view in ref:
            diff = (to_uint8(got[view], png_store).int() - to_uint8(ref[view], png_store).int()).abs()
            assert diff.max() <= 1, view  # the same views, to a rounding tie
    with create_loader(_cfg(png_store, **kw)) as again, create_loader(_cfg(png_store, **kw)) as third:
        assert again.banks[16] is third.banks[16]
