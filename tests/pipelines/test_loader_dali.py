"""The DALI backend (CPU pipeline here; the mixed/GPU one when CUDA exists)
against independent computations: views and pixels, epochs and sampling.
The scaled JPEG decoder, the feed, resources and errors are in
``test_loader_dali_io.py``.

Oracle: the ORIGINAL source files read through torchvision's ImageFolder,
decoded by PIL, cropped and resized by torchvision (:mod:`dali_oracle`,
which states the tolerances). Labels, indices, boxes, flips and view ids
must be exact.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from pipelines.dali.loader import DALILoader, pixel_box_nodes
from pipelines.loader import LoaderConfig, create_loader
from pipelines.views import box_to_pixels, epoch_view_ids, view_params

from dali_oracle import assert_close_to_oracle, oracle_view
from loader_helpers import collect_epoch, dali_cfg, to_uint8

N_PNG = 200  # conftest's CIFAR subset: 10 classes x 20 PNGs


def check_against_oracle(store, folder: ImageFolder, got: dict, cfg: LoaderConfig, view_id):
    idx = got["indices"].numpy()
    vids = np.broadcast_to(view_id, idx.shape)
    assert torch.equal(got["view_ids"], torch.from_numpy(np.array(vids)))
    boxes, flips = view_params(cfg.view_config(), idx, vids)
    assert torch.equal(got["boxes"], torch.from_numpy(boxes))
    assert torch.equal(got["flips"], torch.from_numpy(flips))
    views = [("student", cfg.student_resolution)]
    if cfg.teacher_resolution:
        views.append(("teacher", cfg.teacher_resolution))
    for name, size in views:
        imgs = to_uint8(got[name], store)
        assert imgs.shape == (len(idx), 3, size, size)
        rings = []
        for j, i in enumerate(idx):
            path, label = folder.samples[i]
            assert int(got["labels"][j]) == label
            want = oracle_view(path, boxes[j], flips[j], size)
            rings.append(assert_close_to_oracle(imgs[j], want, f"{name} of sample {i} ({path})"))
        assert np.mean(rings) <= 3, f"{name}: edge rings differ by {np.mean(rings):.1f} on average"


# --------------------------------------------------------------------------- views and pixels
@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_views_match_torchvision(kind, dali_jpeg_store, dali_png_store, imagenette_subset,
                                  cifar_subset):
    store, src = ((dali_jpeg_store, imagenette_subset) if kind == "jpeg"
                  else (dali_png_store, cifar_subset))
    cfg = dali_cfg(store, teacher_resolution=48, seed=3)
    with create_loader(cfg) as loader:
        assert isinstance(loader, DALILoader)
        # one stored size: pixel boxes computed in Python (the other path: variable sizes)
        assert loader._source.image_size == ((224, 224) if kind == "jpeg" else (32, 32))
        got = collect_epoch(loader, epoch=1, max_batches=3)
    assert got["sizes"] == [16, 16, 16]
    assert 0 < int(got["flips"].sum()) < 48
    check_against_oracle(store, ImageFolder(str(src)), got, cfg, view_id=2)  # random: epoch + 1


def test_variable_image_sizes(dali_varsize):
    src, store = dali_varsize
    cfg = dali_cfg(store, batch_size=5, teacher_resolution=40, seed=1, shuffle=False)
    with create_loader(cfg) as loader:
        assert loader._source.image_size is None  # pixel boxes from each header, in the graph
        got = collect_epoch(loader, epoch=4)
    assert got["sizes"] == [5, 5, 2]
    check_against_oracle(store, ImageFolder(str(src)), got, cfg, view_id=5)


def test_in_graph_pixel_boxes_equal_box_to_pixels():
    """The DALI arithmetic that rounds boxes is box_to_pixels to the pixel,
    including half-pixel ties, the clamps and 1-pixel images."""
    from pipelines.dali.importer import import_dali

    import_dali()  # gc paused: see pipelines/dali/importer.py
    from nvidia.dali import fn, pipeline_def, types

    sizes = [(64, 32), (1, 1), (7, 300), (224, 224), (33, 47)]
    enc = []
    for h, w in sizes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format="PNG")
        enc.append(np.frombuffer(buf.getvalue(), np.uint8))
    rng = np.random.default_rng(0)
    cases = [(10.5 / 64, 5.5 / 32, 20.5 / 64, 3.5 / 32),  # exact ties -> round half up
             (0.0, 0.0, 1.0, 1.0), (0.999, 0.999, 0.9, 0.9), (0.5, 0.5, 0.001, 0.001)]
    cases += [tuple(b) for b in view_params(LoaderConfig().view_config(), np.arange(200),
                                            np.ones(200, np.int64))[0].astype(np.float64)]
    cases += [tuple(b) for b in rng.uniform(0, 1, (100, 4))]
    items = [(enc[k % len(sizes)], sizes[k % len(sizes)], c) for k, c in enumerate(cases)]
    batch = len(items)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        e, st, ex = fn.external_source(
            source=lambda: ([it[0] for it in items],
                            [np.array(it[2][:2], np.float64) for it in items],
                            [np.array(it[2][2:], np.float64) for it in items]),
            num_outputs=3, batch=True, dtype=[types.UINT8, types.FLOAT64, types.FLOAT64])
        return pixel_box_nodes(e, st, ex)

    p = pipe()
    anchor, shape = (np.array(o.as_tensor()) for o in p.run())
    del p
    for k, (_, (h, w), c) in enumerate(items):
        assert tuple(anchor[k]) + tuple(shape[k]) == box_to_pixels(*c, h, w), (k, c, (h, w))


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_decode_is_bitwise_and_normalization_within_an_ulp(kind, dali_jpeg_store, dali_png_store,
                                                           imagenette_subset, cifar_subset):
    """Eval (view 0) at the stored size (224 px JPEGs, 32 px PNGs): the pixels
    are PIL's decode bit for bit (libjpeg-turbo in both), and the in-graph
    normalization (fn.crop_mirror_normalize, which multiplies by 1/std) is
    BaseLoader's torch formula up to float32 rounding (eps * max(1, |x|)),
    and maps back to exactly the decoded pixels."""
    store, src, size = ((dali_jpeg_store, imagenette_subset, 224) if kind == "jpeg"
                        else (dali_png_store, cifar_subset, 32))
    folder = ImageFolder(str(src))
    for channels_last in (False, True):
        cfg = dali_cfg(store, train=False, channels_last=channels_last, student_resolution=size,
                      batch_size=8)
        with create_loader(cfg) as loader:
            b = next(iter(loader))
            mean, std = loader._mean, loader._std
        assert (b.view_ids == 0).all() and not b.flips.any()
        assert torch.equal(b.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(8, 4))
        assert b.student.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        raw = torch.stack([F.pil_to_tensor(Image.open(folder.samples[i][0]).convert("RGB"))
                           for i in b.indices.tolist()])
        want = (raw.float() - mean) / std
        ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(1.0)
        assert ((b.student - want).abs() <= ulp).all()
        assert torch.equal(to_uint8(b.student, store), raw)


def test_eval_and_fixed_views(dali_jpeg_store, imagenette_subset):
    folder = ImageFolder(str(imagenette_subset))
    cfg = dali_cfg(dali_jpeg_store, train=False, student_resolution=24)
    with create_loader(cfg) as loader:
        got = collect_epoch(loader, epoch=7, max_batches=1)
    check_against_oracle(dali_jpeg_store, folder, got, cfg, view_id=0)
    cfg = dali_cfg(dali_jpeg_store, fixed_view=3, num_views=4)
    with create_loader(cfg) as loader:
        got = collect_epoch(loader, epoch=2, max_batches=1)
    check_against_oracle(dali_jpeg_store, folder, got, cfg, view_id=3)


@pytest.mark.parametrize("reduced", [False, True])
def test_replayed_views_identical_across_epochs(dali_jpeg_store, reduced):
    cfg = dali_cfg(dali_jpeg_store, num_views=2, seed=11, reduced_decode=reduced)
    seen, vid_by_epoch = {}, []
    with create_loader(cfg) as loader:
        for epoch in (0, 1, 2, 3):
            got = collect_epoch(loader, epoch)
            idx = got["indices"].numpy()
            assert torch.equal(got["view_ids"],
                               torch.from_numpy(epoch_view_ids(cfg.view_config(), idx, epoch)))
            vid_by_epoch.append(got["view_ids"][np.argsort(idx)])
            for j, i in enumerate(idx):
                key = (int(i), int(got["view_ids"][j]))
                val = (got["boxes"][j], got["flips"][j], got["student"][j])
                if key in seen:  # same sample, same view: same box and the same pixels
                    assert all(torch.equal(a, b) for a, b in zip(seen[key], val)), key
                seen[key] = val
    assert {v for _, v in seen} == {0, 1}
    assert not all(torch.equal(vid_by_epoch[0], v) for v in vid_by_epoch[1:])


@pytest.mark.parametrize("reduced", [False, True])
def test_teacher_and_student_share_the_crop(dali_jpeg_store, reduced):
    """Teacher (96 px) downsampled to the student size ~ the student: same box."""
    with create_loader(dali_cfg(dali_jpeg_store, teacher_resolution=96, student_resolution=24,
                               reduced_decode=reduced)) as ld:
        b = next(iter(ld))
    t = to_uint8(b.teacher, dali_jpeg_store)
    s = to_uint8(b.student, dali_jpeg_store)
    down = F.resize(t, [24, 24], antialias=True)
    # (scaled decoder: the student is a box filter over a 1/d decode, the
    # teacher a full decode, here reduced with torchvision's bilinear)
    assert (down.float() - s.float()).abs().mean() < (4.0 if reduced else 2.5)
    # and a different crop would not be close: shift the pairing by one sample
    assert (down.float() - s.roll(1, 0).float()).abs().mean() > 10


# --------------------------------------------------------------------------- epochs and sampling
def test_epoch_order_reproducible_changing_and_covering(dali_png_store):
    def order(epoch, **kw):
        with create_loader(dali_cfg(dali_png_store, batch_size=64, **kw)) as loader:
            got = collect_epoch(loader, epoch)
        return got["indices"].tolist(), got["sizes"], got["labels"]

    a, sizes, labels = order(0, seed=4)
    assert sizes == [64, 64, 64, 8]
    assert sorted(a) == list(range(N_PNG))
    assert labels.tolist() == [i // 20 for i in a]  # ImageFolder order: 10 classes x 20
    assert order(0, seed=4)[0] == a  # reproducible across instances
    assert order(1, seed=4)[0] != a and order(0, seed=5)[0] != a
    ds = DistributedSampler(range(N_PNG), num_replicas=1, rank=0, shuffle=True, seed=4)
    ds.set_epoch(0)
    assert a == list(ds)  # the documented sampler (shared with the reference backend)
    assert order(3, shuffle=False)[0] == list(range(N_PNG))
    b, sizes, _ = order(0, seed=4, drop_last=True)
    assert sizes == [64, 64, 64] and b == a[:192]


def test_rank_sharding_each_sample_once_plus_padding(dali_png_store):
    world, n = 3, N_PNG
    per_rank = -(-n // world)
    parts = []
    for r in range(world):
        cfg = dali_cfg(dali_png_store, batch_size=32, seed=2, num_workers=0)  # 0 -> one DALI thread
        with DALILoader(cfg, rank=r, world_size=world) as ld:
            assert ld.samples_per_rank == per_rank
            parts.append(collect_epoch(ld, epoch=1)["indices"].numpy())
    padded = np.stack(parts, axis=1).reshape(-1)
    assert sorted(padded[:n].tolist()) == list(range(n))
    assert padded[n:].tolist() == padded[: world * per_rank - n].tolist()


def test_early_break_leaves_no_stale_batches(dali_png_store):
    cfg = dali_cfg(dali_png_store, batch_size=16, seed=9)
    with create_loader(cfg) as loader:
        for epoch in range(3):
            collect_epoch(loader, epoch, max_batches=1)  # abandon with batches prefetched
        it = iter(loader)
        next(it)
        got = collect_epoch(loader, 5)  # a new iteration while one is open closes the old one
        assert got["indices"].numpy().tolist() == loader.epoch_order().tolist()
        loader.set_epoch(5)
        assert sum(1 for _ in loader) == len(loader) == 13
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)
    loader.close()  # twice is fine


# --------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA (mixed nvJPEG decode)")),
])
def test_mixed_decode_on_gpu(device, dali_jpeg_store, imagenette_subset):
    """The same graph with device='mixed': batches on the GPU, same views;
    nvJPEG's IDCT differs from libjpeg-turbo's, hence a looser tolerance."""
    cfg = dali_cfg(dali_jpeg_store, device=device, teacher_resolution=64, seed=3)
    with create_loader(cfg) as gpu, create_loader(dali_cfg(dali_jpeg_store, teacher_resolution=64,
                                                          seed=3)) as cpu:
        g, c = collect_epoch(gpu, 1, max_batches=2), collect_epoch(cpu, 1, max_batches=2)
    assert g["student"].is_cuda and g["teacher"].is_cuda and g["labels"].is_cuda
    for k in ("labels", "indices", "boxes", "flips", "view_ids"):
        assert torch.equal(g[k].cpu(), c[k]), k
    for k in ("student", "teacher"):
        d = (to_uint8(g[k].cpu(), dali_jpeg_store).float()
             - to_uint8(c[k], dali_jpeg_store).float()).abs()
        assert d.mean() < 2 and d[..., 1:-1, 1:-1].max() <= 24, (k, d.mean(), d.max())
