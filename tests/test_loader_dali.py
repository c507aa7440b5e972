"""The DALI backend (CPU pipeline here; the mixed/GPU one when CUDA exists)
against independent computations.

Oracle: the ORIGINAL source files read through torchvision's ImageFolder,
decoded by PIL, cropped with ``box_to_pixels`` and resized with
``torchvision.transforms.v2.functional.resized_crop(antialias=True)``.
Tolerances, on the 0..255 scale: DALI's CPU JPEG decoder is libjpeg-turbo
like PIL's and decodes bit-identically, and its antialiased linear resize
equals torchvision's to +-1 level everywhere except the outermost pixel ring,
where DALI extends the crop's edge pixels and torchvision renormalizes its
truncated filter: the ring's mean |diff| grows with the downscale factor
(measured on imagenette: ~1.3 on average at 224 -> 32 px, up to ~14 for one
image at 224 -> 24), so it is bounded at 3 per batch and 16 per image.
Labels, indices, boxes, flips and view ids must be exact.
"""
from __future__ import annotations

import gc
import io
import json
import os
import shutil

import numpy as np
import psutil
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from dataset_tools.store import StoreError
from pipelines.dali_backend import DALILoader, pixel_box_nodes
from pipelines.dali_feed import BatchSource
from pipelines.loader import LoaderConfig, create_loader
from pipelines.views import box_to_pixels, epoch_view_ids, view_params

from loader_helpers import collect_epoch, convert_store, to_uint8

N_PNG = 200  # conftest's CIFAR subset: 10 classes x 20 PNGs


@pytest.fixture(scope="module")
def jpeg_store(imagenette_subset, tmp_path_factory):
    return convert_store(imagenette_subset, tmp_path_factory.mktemp("dali_jpeg") / "store",
                         "dali")


@pytest.fixture(scope="module")
def png_store(cifar_subset, tmp_path_factory):
    return convert_store(cifar_subset, tmp_path_factory.mktemp("dali_png") / "store", "dali")


@pytest.fixture(scope="module")
def varsize(imagenette_subset, tmp_path_factory):
    """Images of different, non-square, non-MCU-aligned sizes (JPEG and PNG)."""
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


def cfg_for(store, **kw) -> LoaderConfig:
    """DALI's own decoder graph unless ``reduced_decode=True`` is passed (the
    scaled JPEG decoder, tested below against its own oracle)."""
    base = dict(backend="dali", store=str(store), batch_size=16, num_workers=2, device="cpu",
                drop_last=False, reduced_decode=False)
    base.update(kw)
    return LoaderConfig(**base)


def oracle_view(path, box, flip, size) -> torch.Tensor:
    with Image.open(path) as im:
        img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    top, left, h, w = box_to_pixels(*[float(v) for v in box], img.shape[1], img.shape[2])
    out = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return F.horizontal_flip(out) if flip else out


def assert_close_to_oracle(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    d = (got.int() - want.int()).abs()
    assert d[:, 1:-1, 1:-1].max() <= 1, f"{what}: interior differs by {d[:, 1:-1, 1:-1].max()}"
    ring = (d.sum() - d[:, 1:-1, 1:-1].sum()) / (d.numel() - d[:, 1:-1, 1:-1].numel())
    assert ring <= 16, f"{what}: edge ring differs by {ring:.1f} on average"
    return float(ring)


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
def test_views_match_torchvision(kind, jpeg_store, png_store, imagenette_subset, cifar_subset):
    store, src = (jpeg_store, imagenette_subset) if kind == "jpeg" else (png_store, cifar_subset)
    cfg = cfg_for(store, teacher_resolution=48, seed=3)
    with create_loader(cfg) as loader:
        assert isinstance(loader, DALILoader)
        # one stored size: pixel boxes computed in Python (the other path: variable sizes)
        assert loader._source.image_size == ((224, 224) if kind == "jpeg" else (32, 32))
        got = collect_epoch(loader, epoch=1, max_batches=3)
    assert got["sizes"] == [16, 16, 16]
    assert 0 < int(got["flips"].sum()) < 48
    check_against_oracle(store, ImageFolder(str(src)), got, cfg, view_id=2)  # random: epoch + 1


def test_variable_image_sizes(varsize):
    src, store = varsize
    cfg = cfg_for(store, batch_size=5, teacher_resolution=40, seed=1, shuffle=False)
    with create_loader(cfg) as loader:
        assert loader._source.image_size is None  # pixel boxes from each header, in the graph
        got = collect_epoch(loader, epoch=4)
    assert got["sizes"] == [5, 5, 2]
    check_against_oracle(store, ImageFolder(str(src)), got, cfg, view_id=5)


def test_in_graph_pixel_boxes_equal_box_to_pixels():
    """The DALI arithmetic that rounds boxes is box_to_pixels to the pixel,
    including half-pixel ties, the clamps and 1-pixel images."""
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
def test_decode_is_bitwise_and_normalization_within_an_ulp(kind, jpeg_store, png_store,
                                                           imagenette_subset, cifar_subset):
    """Eval (view 0) at the stored size (224 px JPEGs, 32 px PNGs): the pixels
    are PIL's decode bit for bit (libjpeg-turbo in both), and the in-graph
    normalization (fn.crop_mirror_normalize, which multiplies by 1/std) is
    BaseLoader's torch formula up to float32 rounding (eps * max(1, |x|)),
    and maps back to exactly the decoded pixels."""
    store, src, size = ((jpeg_store, imagenette_subset, 224) if kind == "jpeg"
                        else (png_store, cifar_subset, 32))
    folder = ImageFolder(str(src))
    for channels_last in (False, True):
        cfg = cfg_for(store, train=False, channels_last=channels_last, student_resolution=size,
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


def test_eval_and_fixed_views(jpeg_store, imagenette_subset):
    folder = ImageFolder(str(imagenette_subset))
    cfg = cfg_for(jpeg_store, train=False, student_resolution=24)
    with create_loader(cfg) as loader:
        got = collect_epoch(loader, epoch=7, max_batches=1)
    check_against_oracle(jpeg_store, folder, got, cfg, view_id=0)
    cfg = cfg_for(jpeg_store, fixed_view=3, num_views=4)
    with create_loader(cfg) as loader:
        got = collect_epoch(loader, epoch=2, max_batches=1)
    check_against_oracle(jpeg_store, folder, got, cfg, view_id=3)


@pytest.mark.parametrize("reduced", [False, True])
def test_replayed_views_identical_across_epochs(jpeg_store, reduced):
    cfg = cfg_for(jpeg_store, num_views=2, seed=11, reduced_decode=reduced)
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
def test_teacher_and_student_share_the_crop(jpeg_store, reduced):
    """Teacher (96 px) downsampled to the student size ~ the student: same box."""
    with create_loader(cfg_for(jpeg_store, teacher_resolution=96, student_resolution=24,
                               reduced_decode=reduced)) as ld:
        b = next(iter(ld))
    t = to_uint8(b.teacher, jpeg_store)
    s = to_uint8(b.student, jpeg_store)
    down = F.resize(t, [24, 24], antialias=True)
    # (scaled decoder: the student is a box filter over a 1/d decode, the
    # teacher a full decode, here reduced with torchvision's bilinear)
    assert (down.float() - s.float()).abs().mean() < (4.0 if reduced else 2.5)
    # and a different crop would not be close: shift the pairing by one sample
    assert (down.float() - s.roll(1, 0).float()).abs().mean() > 10


# --------------------------------------------------------------------------- epochs and sampling
def test_epoch_order_reproducible_changing_and_covering(png_store):
    def order(epoch, **kw):
        with create_loader(cfg_for(png_store, batch_size=64, **kw)) as loader:
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


def test_rank_sharding_each_sample_once_plus_padding(png_store):
    world, n = 3, N_PNG
    per_rank = -(-n // world)
    parts = []
    for r in range(world):
        cfg = cfg_for(png_store, batch_size=32, seed=2, num_workers=0)  # 0 -> one DALI thread
        with DALILoader(cfg, rank=r, world_size=world) as ld:
            assert ld.samples_per_rank == per_rank
            parts.append(collect_epoch(ld, epoch=1)["indices"].numpy())
    padded = np.stack(parts, axis=1).reshape(-1)
    assert sorted(padded[:n].tolist()) == list(range(n))
    assert padded[n:].tolist() == padded[: world * per_rank - n].tolist()


def test_early_break_leaves_no_stale_batches(png_store):
    cfg = cfg_for(png_store, batch_size=16, seed=9)
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


# --------------------------------------------------------------------------- scaled JPEG decode
def ffcv_area_oracle(path, box, flip, size, need) -> tuple[torch.Tensor, int]:
    """The scaled decoder's contract, recomputed: FFCV's libturbojpeg
    ``imdecode`` (Python entry point) at DCT scale 1/d, the largest d in
    (8, 4, 2) keeping the crop >= 2 * d * need pixels on both axes; the box
    rounded on the decoded image; OpenCV's INTER_AREA resize. Returns (CHW image, d)."""
    import cv2
    from ffcv.libffcv import imdecode

    data = np.fromfile(path, np.uint8)
    with Image.open(path) as im:
        w, h = im.size
    _, _, ch, cw = box_to_pixels(*[float(v) for v in box], h, w)
    d = next((d for d in (8, 4, 2) if ch >= 2 * d * need and cw >= 2 * d * need), 1)
    dh, dw = -(-h // d), -(-w // d)
    img = np.zeros((dh, dw, 3), np.uint8)
    assert imdecode(data, img, h, w, h, w, 0, 0, 1, d, False, False) == 0
    top, left, ch, cw = box_to_pixels(*[float(v) for v in box], dh, dw)
    out = cv2.resize(img[top:top + ch, left:left + cw], (size, size), interpolation=cv2.INTER_AREA)
    out = torch.from_numpy(out).permute(2, 0, 1)
    return (F.horizontal_flip(out) if flip else out), d


@pytest.mark.parametrize("student,teacher", [(24, 0), (24, 160)])
def test_scaled_jpeg_decode_matches_its_oracle(jpeg_store, imagenette_subset, student, teacher):
    """reduced_decode on CPU: JPEG samples decode at a reduced DCT scale and
    resize with INTER_AREA (the FFCV backend's per-sample work, run as a DALI
    numba operator); equal to FFCV's decode + OpenCV's resize within one level
    (the numba area filter rounds exactly, OpenCV in float). The store also
    holds PNGs (its grayscale sources): those take DALI's decoder in the same
    batches and match torchvision as in the tests above."""
    folder = ImageFolder(str(imagenette_subset))
    cfg = cfg_for(jpeg_store, reduced_decode=True, student_resolution=student,
                  teacher_resolution=teacher, seed=5)
    with create_loader(cfg) as loader:
        assert loader.scaled_decode
        got = collect_epoch(loader, epoch=1)
    need = max(student, teacher)
    views = [("student", student)] + ([("teacher", teacher)] if teacher else [])
    scales, pngs = set(), 0
    for j, i in enumerate(got["indices"].tolist()):
        path, label = folder.samples[i]
        assert int(got["labels"][j]) == label
        box, flip = got["boxes"][j].numpy(), bool(got["flips"][j])
        with Image.open(path) as im:
            is_png = im.mode != "RGB"  # the converter stores non-RGB JPEGs as RGB PNGs
        for name, size in views:
            img = to_uint8(got[name][j:j + 1], jpeg_store)[0]
            if is_png:
                assert_close_to_oracle(img, oracle_view(path, box, flip, size), f"{name} of {i}")
                continue
            want, d = ffcv_area_oracle(path, box, flip, size, need)
            scales.add(d)
            diff = (img.int() - want.int()).abs().max()
            assert diff <= 1, f"{name} of sample {i} ({path}), scale 1/{d}: off by {diff}"
        pngs += is_png
    assert pngs >= 1  # both branches of the graph ran
    assert scales == ({2, 4} if teacher == 0 else {1}), scales


@pytest.mark.parametrize("kind", ["jpeg", "jpeg-scaled", "png", "varsize"])
def test_padded_feed_equals_per_sample_feed(kind, jpeg_store, png_store, varsize, monkeypatch):
    """The images travel to DALI as one zero-padded array when that is cheap,
    else as one zero-copy view per sample: both give identical batches."""
    store = {"png": png_store, "varsize": varsize[1]}.get(kind, jpeg_store)
    cfg = cfg_for(store, seed=3, teacher_resolution=24 if kind.startswith("jpeg") else 0,
                  reduced_decode=kind == "jpeg-scaled")

    def run():
        kinds = []
        with create_loader(cfg) as loader:
            batch = loader._source._batch

            def recording(idx, vid):
                inputs, extra = batch(idx, vid)
                kinds.append(type(inputs[0]))
                return inputs, extra
            loader._source._batch = recording
            return collect_epoch(loader, epoch=1), set(kinds)

    monkeypatch.setattr(BatchSource, "max_pad_ratio", 1e9)  # pad however uneven the sizes
    padded, kinds = run()
    assert kinds == {np.ndarray}
    monkeypatch.setattr(BatchSource, "max_pad_ratio", 0.0)
    monkeypatch.setattr(BatchSource, "pad_slack_bytes", -1)
    listed, kinds = run()
    assert kinds == {list}
    assert padded.keys() == listed.keys()
    for k in padded:
        if k != "sizes":
            assert torch.equal(padded[k], listed[k]), k


# --------------------------------------------------------------------------- resources and errors
@pytest.mark.parametrize("kind", ["png", "jpeg-scaled"])
def test_no_thread_or_memory_leak(kind, png_store, jpeg_store):
    proc = psutil.Process()

    def usage():
        gc.collect()
        return proc.num_threads(), proc.memory_info().rss

    cfg = (cfg_for(png_store, batch_size=32) if kind == "png" else
           cfg_for(jpeg_store, batch_size=32, reduced_decode=True))

    def break_early(loader, epoch):
        loader.set_epoch(epoch)
        for _ in zip(range(2), loader):
            pass

    def recreate(epoch, close):
        loader = create_loader(cfg)
        break_early(loader, epoch)
        if close:
            loader.close()

    shared = create_loader(cfg)
    for e in range(3):  # warm-up: lazy allocations, numba, allocator pools
        break_early(shared, e)
        recreate(e, close=e % 2 == 0)
    threads0, rss0 = usage()
    for e in range(20):
        break_early(shared, e)
        recreate(e, close=e % 2 == 0)  # closed explicitly or just dropped
    threads1, rss1 = usage()
    shared.close()
    assert threads1 <= threads0 + 2, (threads0, threads1)
    assert rss1 - rss0 < 150 * 2**20, f"RSS grew {(rss1 - rss0) / 2**20:.0f} MiB"


def test_store_errors(jpeg_store, tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        DALILoader(cfg_for(tmp_path / "nope"))
    with pytest.raises(StoreError, match="low-res"):
        DALILoader(cfg_for(jpeg_store, lowres=True))
    with pytest.raises(StoreError, match="fingerprint"):
        DALILoader(cfg_for(jpeg_store, expected_fingerprint="sha256:00"))

    def broken_copy(name, edit):
        dst = tmp_path / name
        shutil.copytree(jpeg_store, dst)
        edit(dst, json.loads((dst / "manifest.json").read_text()))
        return dst

    def no_dali(d, man):
        man["stores"].pop("dali")
        (d / "manifest.json").write_text(json.dumps(man))

    with pytest.raises(StoreError, match="no 'dali' data"):
        DALILoader(cfg_for(broken_copy("no_dali", no_dali)))

    def missing_tar(d, man):
        (d / man["stores"]["dali"]["shards"][0]["tar"]).unlink()

    with pytest.raises(StoreError, match="missing"):
        DALILoader(cfg_for(broken_copy("no_tar", missing_tar)))

    def more_samples(d, man):
        man["num_samples"] += 5
        (d / "manifest.json").write_text(json.dumps(man))

    with pytest.raises(StoreError, match="in no DALI shard index"):
        DALILoader(cfg_for(broken_copy("short", more_samples)))

    def bad_index(d, man):
        (d / man["stores"]["dali"]["shards"][0]["index"]).write_text("garbage\n")

    with pytest.raises(StoreError, match="not a DALI webdataset index"):
        DALILoader(cfg_for(broken_copy("bad_idx", bad_index)))

    def truncated_tar(d, man):
        tar = d / man["stores"]["dali"]["shards"][0]["tar"]
        os.truncate(tar, tar.stat().st_size // 2)

    with pytest.raises(StoreError, match="beyond the end of"):
        DALILoader(cfg_for(broken_copy("short_tar", truncated_tar)))
    with pytest.raises(ValueError, match="rank 2 outside"):
        DALILoader(cfg_for(jpeg_store), rank=2, world_size=2)


def test_damaged_shards_name_the_sample(jpeg_store, tmp_path):
    """Damage after conversion: a clear StoreError naming the sample and the
    verify command, not a crash (DALI 2.4 segfaults on unidentifiable image
    data, so signatures are checked before DALI sees the bytes)."""
    def damaged(name):
        dst = tmp_path / name
        shutil.copytree(jpeg_store, dst)
        return dst, json.loads((dst / "manifest.json").read_text())["stores"]["dali"]["shards"][0]

    def loader(store):
        return DALILoader(cfg_for(store, shuffle=False, batch_size=16))

    store, shard = damaged("zeroed")  # a zeroed block over sample 21's header
    with loader(store) as ld:
        t = ld._source.table
        with open(t.tars[t.shard[21]], "r+b") as f:
            f.seek(int(t.img_off[21]))
            f.write(bytes(64))
        for _ in range(2):  # and again: still the clear error
            with pytest.raises(StoreError, match=r"sample 00000021 is not a JPEG or PNG.*verify"):
                collect_epoch(ld)

    store, shard = damaged("label")  # sample 5's label overwritten with letters
    with loader(store) as ld:
        t = ld._source.table
        with open(t.tars[t.shard[5]], "r+b") as f:
            f.seek(int(t.cls_off[5]))
            f.write(b"x" * int(t.cls_len[5]))
        with pytest.raises(StoreError, match=r"sample 00000005 has a label that is not an "
                                             r"integer in 0\.\.9"):
            collect_epoch(ld)

    # index and tar disagree: sample 37 cut short (no JPEG end marker: DALI gets
    # its exact bytes, not the zero-padded feed, and reports the decode error)
    store, shard = damaged("truncated")
    idx = store / shard["index"]
    lines = idx.read_text().splitlines()
    tok = lines[1 + 37].split()
    assert tok[0] == "jpg" and tok[3] == "00000037.jpg"
    tok[2] = str(int(tok[2]) // 3)
    lines[1 + 37] = " ".join(tok)
    idx.write_text("\n".join(lines) + "\n")
    for reduced in (False, True):  # DALI's decoder, then the scaled one (its status)
        with DALILoader(cfg_for(store, shuffle=False, batch_size=16,
                                reduced_decode=reduced)) as ld:
            assert ld.scaled_decode == reduced
            for _ in range(2):  # DALI cannot go on after a decode error; the loader says so
                with pytest.raises(StoreError, match=r"failed on sample 00000037.*verify.*"
                                                     r"cannot continue"):
                    collect_epoch(ld)


# --------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA (mixed nvJPEG decode)")),
])
def test_mixed_decode_on_gpu(device, jpeg_store, imagenette_subset):
    """The same graph with device='mixed': batches on the GPU, same views;
    nvJPEG's IDCT differs from libjpeg-turbo's, hence a looser tolerance."""
    cfg = cfg_for(jpeg_store, device=device, teacher_resolution=64, seed=3)
    with create_loader(cfg) as gpu, create_loader(cfg_for(jpeg_store, teacher_resolution=64,
                                                          seed=3)) as cpu:
        g, c = collect_epoch(gpu, 1, max_batches=2), collect_epoch(cpu, 1, max_batches=2)
    assert g["student"].is_cuda and g["teacher"].is_cuda and g["labels"].is_cuda
    for k in ("labels", "indices", "boxes", "flips", "view_ids"):
        assert torch.equal(g[k].cpu(), c[k]), k
    for k in ("student", "teacher"):
        d = (to_uint8(g[k].cpu(), jpeg_store).float() - to_uint8(c[k], jpeg_store).float()).abs()
        assert d.mean() < 2 and d[..., 1:-1, 1:-1].max() <= 24, (k, d.mean(), d.max())
