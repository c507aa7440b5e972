"""The DALI backend's input side: the scaled JPEG decoder
(:mod:`pipelines.dali.scaled_decode`) against its own oracle, the padded
feed (:mod:`pipelines.dali.feed`) against the per-sample feed, threads and
memory across epochs and loaders, and bad or damaged stores.
"""
from __future__ import annotations

import gc
import json
import os
import shutil

import numpy as np
import psutil
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.datasets import ImageFolder

from dataset_tools.stores.layout import StoreError
from pipelines.dali.loader import DALILoader
from pipelines.dali.feed import BatchSource
from pipelines.loader import create_loader
from pipelines.views import box_to_pixels

from dali_oracle import assert_close_to_oracle, oracle_view
from loader_helpers import collect_epoch, dali_cfg, to_uint8

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
def test_scaled_jpeg_decode_matches_its_oracle(dali_jpeg_store, imagenette_subset, student,
                                               teacher):
    """reduced_decode on CPU: JPEG samples decode at a reduced DCT scale and
    resize with INTER_AREA (the FFCV backend's per-sample work, run as a DALI
    numba operator); equal to FFCV's decode + OpenCV's resize within one level
    (the numba area filter rounds exactly, OpenCV in float). The store also
    holds PNGs (its grayscale sources): those take DALI's decoder in the same
    batches and match torchvision as in the tests above."""
    folder = ImageFolder(str(imagenette_subset))
    cfg = dali_cfg(dali_jpeg_store, reduced_decode=True, student_resolution=student,
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
            img = to_uint8(got[name][j:j + 1], dali_jpeg_store)[0]
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
def test_padded_feed_equals_per_sample_feed(kind, dali_jpeg_store, dali_png_store, dali_varsize,
                                            monkeypatch):
    """The images travel to DALI as one zero-padded array when that is cheap,
    else as one zero-copy view per sample: both give identical batches."""
    store = {"png": dali_png_store, "varsize": dali_varsize[1]}.get(kind, dali_jpeg_store)
    cfg = dali_cfg(store, seed=3, teacher_resolution=24 if kind.startswith("jpeg") else 0,
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
def test_no_thread_or_memory_leak(kind, dali_png_store, dali_jpeg_store):
    proc = psutil.Process()

    def usage():
        gc.collect()
        return proc.num_threads(), proc.memory_info().rss

    cfg = (dali_cfg(dali_png_store, batch_size=32) if kind == "png" else
           dali_cfg(dali_jpeg_store, batch_size=32, reduced_decode=True))

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


def test_store_errors(dali_jpeg_store, tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        DALILoader(dali_cfg(tmp_path / "nope"))
    with pytest.raises(StoreError, match="low-res"):
        DALILoader(dali_cfg(dali_jpeg_store, lowres=True))
    with pytest.raises(StoreError, match="fingerprint"):
        DALILoader(dali_cfg(dali_jpeg_store, expected_fingerprint="sha256:00"))

    def broken_copy(name, edit):
        dst = tmp_path / name
        shutil.copytree(dali_jpeg_store, dst)
        edit(dst, json.loads((dst / "manifest.json").read_text()))
        return dst

    def no_dali(d, man):
        man["stores"].pop("dali")
        (d / "manifest.json").write_text(json.dumps(man))

    with pytest.raises(StoreError, match="no 'dali' data"):
        DALILoader(dali_cfg(broken_copy("no_dali", no_dali)))

    def missing_tar(d, man):
        (d / man["stores"]["dali"]["shards"][0]["tar"]).unlink()

    with pytest.raises(StoreError, match="missing"):
        DALILoader(dali_cfg(broken_copy("no_tar", missing_tar)))

    def more_samples(d, man):
        man["num_samples"] += 5
        (d / "manifest.json").write_text(json.dumps(man))

    with pytest.raises(StoreError, match="in no DALI shard index"):
        DALILoader(dali_cfg(broken_copy("short", more_samples)))

    def bad_index(d, man):
        (d / man["stores"]["dali"]["shards"][0]["index"]).write_text("garbage\n")

    with pytest.raises(StoreError, match="not a DALI webdataset index"):
        DALILoader(dali_cfg(broken_copy("bad_idx", bad_index)))

    def truncated_tar(d, man):
        tar = d / man["stores"]["dali"]["shards"][0]["tar"]
        os.truncate(tar, tar.stat().st_size // 2)

    with pytest.raises(StoreError, match="beyond the end of"):
        DALILoader(dali_cfg(broken_copy("short_tar", truncated_tar)))
    with pytest.raises(ValueError, match="rank 2 outside"):
        DALILoader(dali_cfg(dali_jpeg_store), rank=2, world_size=2)


def test_damaged_shards_name_the_sample(dali_jpeg_store, tmp_path):
    """Damage after conversion: a clear StoreError naming the sample and the
    verify command, not a crash (DALI 2.4 segfaults on unidentifiable image
    data, so signatures are checked before DALI sees the bytes)."""
    def damaged(name):
        dst = tmp_path / name
        shutil.copytree(dali_jpeg_store, dst)
        return dst, json.loads((dst / "manifest.json").read_text())["stores"]["dali"]["shards"][0]

    def loader(store):
        return DALILoader(dali_cfg(store, shuffle=False, batch_size=16))

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
        with DALILoader(dali_cfg(store, shuffle=False, batch_size=16,
                                reduced_decode=reduced)) as ld:
            assert ld.scaled_decode == reduced
            for _ in range(2):  # DALI cannot go on after a decode error; the loader says so
                with pytest.raises(StoreError, match=r"failed on sample 00000037.*verify.*"
                                                     r"cannot continue"):
                    collect_epoch(ld)
