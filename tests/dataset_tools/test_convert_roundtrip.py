"""Round trip: source files -> convert -> read back with FFCV / DALI on CPU.

Oracles are independent of the converter: torchvision's ImageFolder (PIL
decode, its own file order and labels) for pixels/labels, DALI's and FFCV's
own readers for the stores, and hand-computed sizes for the low-res rule.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from dataset_tools.convert import convert, main
from dataset_tools.convert_options import ConvertOptions
from dataset_tools.verify import VerifyError, verify_store

pytestmark = pytest.mark.filterwarnings(
    # numba finalizers of FFCV-compiled functions complain at garbage collection
    "ignore::pytest.PytestUnraisableExceptionWarning")

JPEG_Q = 90
# JPEG at q=90 of 224x224 photos (incl. chroma subsampling): per-image mean
# |error| is ~1-2 grey levels; allow 4, and PSNR >= 30 dB.
JPG_MEAN_ABS_TOL, JPG_MIN_PSNR = 4.0, 30.0


def _convert(src: Path, out: Path, **kw):
    kw.setdefault("samples_per_shard", 64)
    return convert(src, out, ConvertOptions(**kw), progress=False)


@pytest.fixture(scope="module")
def stores(cifar_subset, imagenette_subset, tmp_path_factory):
    """Each conversion once per module; keyed by a short name."""
    root = tmp_path_factory.mktemp("stores")
    out = {
        "cifar_raw_w1": _convert(cifar_subset, root / "c1", write_mode="raw", workers=1,
                                 student_resolution=16),
        "cifar_raw_w2": _convert(cifar_subset, root / "c2", write_mode="raw", workers=2,
                                 student_resolution=16),
        "inette_raw": _convert(imagenette_subset, root / "i_raw", write_mode="raw", workers=2,
                               samples_per_shard=30),
        "inette_jpg": _convert(imagenette_subset, root / "i_jpg", write_mode="jpg", workers=2,
                               jpeg_quality=JPEG_Q, student_resolution=64),
    }
    return out


def _source(subset: Path):
    """Oracle: torchvision ImageFolder (PIL decode, its own order and labels)."""
    ds = ImageFolder(str(subset))
    images = [np.asarray(ds.loader(p)) for p, _ in ds.samples]
    return images, np.array(ds.targets)


def _read_ffcv(path: Path):
    """All samples via FFCV's Loader on CPU with the stock decoders."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=64, num_workers=2, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()],
                                                "label": [IntDecoder()], "index": [IntDecoder()]})
    imgs, labels, idx = [], [], []
    for im, lab, ix in loader:
        imgs.append(np.array(im))
        labels.append(np.array(lab).reshape(-1))
        idx.append(np.array(ix).reshape(-1))
    return np.concatenate(imgs), np.concatenate(labels), np.concatenate(idx)


def _read_dali(store_dir: Path):
    """All samples via DALI's webdataset reader + CPU image decoder."""
    from pipelines.dali.importer import import_dali

    import_dali()  # gc paused: see pipelines/dali/importer.py
    from nvidia.dali import fn, pipeline_def, types

    m = json.loads((store_dir / "manifest.json").read_text())
    dali = m["stores"]["dali"]
    n, bs = m["num_samples"], 16

    @pipeline_def(batch_size=bs, num_threads=2, device_id=None)
    def pipe():
        img, cls, idx = fn.readers.webdataset(
            paths=[str(store_dir / s["tar"]) for s in dali["shards"]],
            index_paths=[str(store_dir / s["index"]) for s in dali["shards"]],
            ext=[dali["image_ext"], "cls", "index"], missing_component_behavior="error",
            name="reader")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), cls, idx

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n
    imgs, labels, idx = [], [], []
    for _ in range(math.ceil(n / bs)):
        im, cl, ix = p.run()
        for i in range(len(im)):
            imgs.append(np.array(im[i]))
            labels.append(int(bytes(np.array(cl[i])).decode()))
            idx.append(int(bytes(np.array(ix[i])).decode()))
    return imgs[:n], np.array(labels[:n]), np.array(idx[:n])


@pytest.mark.parametrize("key,subset", [("cifar_raw_w1", "cifar_subset"),
                                        ("inette_raw", "imagenette_subset")])
def test_raw_ffcv_pixels_labels_indices_exact(stores, key, subset, request):
    src_imgs, src_labels = _source(request.getfixturevalue(subset))
    res = stores[key]
    imgs, labels, idx = _read_ffcv(res.out_dir / res.manifest["stores"]["ffcv"]["path"])
    assert len(imgs) == len(src_imgs) == res.manifest["num_samples"]
    np.testing.assert_array_equal(imgs, np.stack(src_imgs))  # raw mode is lossless
    np.testing.assert_array_equal(labels, src_labels)
    np.testing.assert_array_equal(idx, np.arange(len(imgs)))
    assert res.manifest["class_counts"] == np.bincount(src_labels).tolist()
    # mean/std oracle: numpy over the source pixels
    px = np.stack(src_imgs).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(res.manifest["mean"], px.mean(0), atol=1e-6)
    np.testing.assert_allclose(res.manifest["std"], px.std(0), atol=1e-6)


def test_dali_shards_read_back(stores, cifar_subset, imagenette_subset):
    # CIFAR (PNG sources -> lossless PNG members): DALI's pixels are exact.
    src_imgs, src_labels = _source(cifar_subset)
    imgs, labels, idx = _read_dali(stores["cifar_raw_w1"].out_dir)
    np.testing.assert_array_equal(labels, src_labels)
    np.testing.assert_array_equal(idx, np.arange(len(src_imgs)))
    np.testing.assert_array_equal(np.stack(imgs), np.stack(src_imgs))
    # Imagenette: baseline RGB JPEGs pass through untouched, grayscale ones are
    # re-encoded as PNG; all decode to the source size and close to PIL's pixels.
    src_imgs, src_labels = _source(imagenette_subset)
    res = stores["inette_raw"]
    imgs, labels, idx = _read_dali(res.out_dir)
    np.testing.assert_array_equal(labels, src_labels)
    np.testing.assert_array_equal(idx, np.arange(len(src_imgs)))
    for got, want in zip(imgs, src_imgs):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).mean() < 1.0  # same libjpeg family; ~0 expected
    assert len(res.manifest["stores"]["dali"]["shards"]) == math.ceil(len(src_imgs) / 30)


def _tar_members(res) -> dict[str, bytes]:
    import tarfile
    members = {}
    for sh in res.manifest["stores"]["dali"]["shards"]:
        with tarfile.open(res.out_dir / sh["tar"]) as tf:
            for m in tf:
                assert (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o644)
                members[m.name] = tf.extractfile(m).read()
    return members


def test_passthrough_source_bytes_untouched(stores, imagenette_subset, cifar_subset):
    # CIFAR: plain 8-bit RGB PNGs go into the shards as they are.
    members = _tar_members(stores["cifar_raw_w1"])
    ds = ImageFolder(str(cifar_subset))
    for i, (path, _) in enumerate(ds.samples):
        assert members[f"{i:08d}.png"] == Path(path).read_bytes()
    assert len(members) == 4 * len(ds)  # image, cls, index, sha256
    res = stores["inette_raw"]
    ds = ImageFolder(str(imagenette_subset))
    members = _tar_members(res)
    n_jpg = 0
    for i, (path, _) in enumerate(ds.samples):
        data = Path(path).read_bytes()
        assert members[f"{i:08d}.sha256"].decode() == hashlib.sha256(data).hexdigest()
        if Image.open(path).mode == "RGB":
            assert members[f"{i:08d}.jpg"] == data  # baseline RGB JPEG: untouched
            n_jpg += 1
        else:
            assert f"{i:08d}.png" in members  # grayscale JPEG: re-encoded losslessly
    assert n_jpg > 0


def test_jpg_mode_close_to_source(stores, imagenette_subset):
    src_imgs, src_labels = _source(imagenette_subset)
    res = stores["inette_jpg"]
    imgs, labels, idx = _read_ffcv(res.out_dir / res.manifest["stores"]["ffcv"]["path"])
    np.testing.assert_array_equal(labels, src_labels)
    np.testing.assert_array_equal(idx, np.arange(len(src_imgs)))
    for got, want in zip(imgs, src_imgs):
        err = got.astype(np.float64) - want
        assert np.abs(err).mean() < JPG_MEAN_ABS_TOL
        assert 10 * np.log10(255.0 ** 2 / max((err ** 2).mean(), 1e-12)) > JPG_MIN_PSNR
    assert not np.array_equal(np.stack(src_imgs), imgs)  # it really is lossy


def _file_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_outputs_identical_for_1_and_2_workers(stores):
    a, b = stores["cifar_raw_w1"], stores["cifar_raw_w2"]
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    da, db = _file_digests(a.out_dir), _file_digests(b.out_dir)
    assert da == db and "manifest.json" in da and any(k.endswith(".beton") for k in da)


def test_fingerprint_is_hash_of_source_bytes_and_labels(stores, cifar_subset):
    ds = ImageFolder(str(cifar_subset))
    h = hashlib.sha256()
    for path, label in ds.samples:  # hand-computed per the documented definition
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
        h.update(int(label).to_bytes(8, "little", signed=True))
    assert stores["cifar_raw_w1"].manifest["fingerprint"] == "sha256:" + h.hexdigest()


def test_lowres_companion_size_rule(stores, imagenette_subset):
    from ffcv.reader import Reader

    # R=64, scale 0.35, aspect 4/3 -> S = ceil(64 * sqrt((4/3) / 0.35)) = ceil(124.9) = 125
    assert math.ceil(64 * math.sqrt((4 / 3) / 0.35)) == 125
    assert 125 * math.sqrt(0.35 / (4 / 3)) >= 64 > 124 * math.sqrt(0.35 / (4 / 3))
    res = stores["inette_jpg"]
    low = res.manifest["stores"]["ffcv_lowres"]
    assert low["resolution"] == 125
    imgs, labels, _ = _read_ffcv(res.out_dir / low["path"])
    src_imgs, src_labels = _source(imagenette_subset)
    assert imgs.shape[1:] == (125, 125, 3)
    np.testing.assert_array_equal(labels, src_labels)
    want = np.asarray(Image.fromarray(src_imgs[0]).resize((125, 125), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(imgs[0], want)  # raw, PIL antialiased bilinear
    # CIFAR: R=16 -> S = 32, the source size itself: never upscaled, stored as is.
    res = stores["cifar_raw_w1"]
    meta = Reader(str(res.out_dir / res.manifest["stores"]["ffcv_lowres"]["path"])).metadata
    assert res.manifest["stores"]["ffcv_lowres"]["resolution"] == 32
    assert set(meta["f0"]["height"]) == {32} and set(meta["f0"]["width"]) == {32}
    assert res.manifest["stores"]["ffcv_lowres"]["pixel_sha256"] == \
        res.manifest["stores"]["ffcv"]["pixel_sha256"]


def test_verify_passes_then_catches_corruption(stores, tmp_path, capsys):
    src = stores["inette_raw"].out_dir  # one .beton: verify reads it through FFCV each time
    assert main(["verify", str(src)]) == 0
    assert "verify: OK" in capsys.readouterr().out

    # one flipped byte inside an image member of a shard
    bad = shutil.copytree(src, tmp_path / "bad_shard")
    m = json.loads((bad / "manifest.json").read_text())
    tar = bad / m["stores"]["dali"]["shards"][0]["tar"]
    data = bytearray(tar.read_bytes())
    data[512 + 100] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "shard-000000.tar: sha256 differs" in err and "FAILED" in err

    # a label edited in the manifest (one sample moved from class 0 to class 1)
    bad = shutil.copytree(src, tmp_path / "bad_label")
    m = json.loads((bad / "manifest.json").read_text())
    m["class_counts"][0] -= 1
    m["class_counts"][1] += 1
    assert sum(m["class_counts"]) == m["num_samples"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VerifyError, match="class counts"):
        verify_store(bad)


def test_channel_sums_exact_on_both_paths():
    from dataset_tools.stores.manifest import channel_sums

    # small image (OpenCV histogram path) against numpy's int64 sums
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    px = rgb.reshape(-1, 3).astype(np.int64)
    assert channel_sums(rgb) == (px.sum(0).tolist(), (px * px).sum(0).tolist())
    # > 2**24 pixels (numpy bincount path; float32 counts would round here),
    # hand-computed: every pixel (1, 2, 3) except one (255, 255, 255)
    n = 4100 * 4100
    big = np.empty((4100, 4100, 3), np.uint8)
    big[...] = (1, 2, 3)
    big[0, 0] = 255
    assert channel_sums(big) == ([(n - 1) * v + 255 for v in (1, 2, 3)],
                                 [(n - 1) * v * v + 255 ** 2 for v in (1, 2, 3)])


def test_resize_shorter_side_and_no_upscale():
    from dataset_tools.records import resize_shorter

    rgb = np.zeros((30, 100, 3), np.uint8)
    assert resize_shorter(rgb, 10).shape == (10, 33, 3)  # 100 * 10 / 30 = 33.3 -> 33
    assert resize_shorter(rgb.transpose(1, 0, 2), 10).shape == (33, 10, 3)
    assert resize_shorter(rgb, 30) is rgb and resize_shorter(rgb, 64) is rgb  # never upscaled


def test_worker_codec_is_ffcvs():
    """dataset_tools.stores.ffcv_codec (what convert workers use instead of importing
    ffcv) against FFCV itself: the same size rule, JPEG bytes and decode."""
    from ffcv.fields.rgb_image import encode_jpeg as ffcv_encode, resizer as ffcv_resizer
    from ffcv.libffcv import imdecode as ffcv_imdecode

    from dataset_tools.stores import ffcv_codec

    rng = np.random.default_rng(0)
    for h, w, target in ((224, 224, 160), (300, 120, 256), (50, 70, None), (90, 90, 100)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours, theirs = ffcv_codec.resizer(img, target), ffcv_resizer(img, target)
        np.testing.assert_array_equal(ours, theirs)
        jpeg = ffcv_codec.encode_jpeg(ours, 90)
        np.testing.assert_array_equal(jpeg, ffcv_encode(theirs, 90))
        rh, rw = ours.shape[:2]
        a, b = np.empty((rh, rw, 3), np.uint8), np.zeros((rh, rw, 3), np.uint8)
        assert ffcv_codec.imdecode(jpeg, a, rh, rw, rh, rw, 0, 0, 1, 1, False, False) == 0
        ffcv_imdecode(jpeg, b, rh, rw, rh, rw, 0, 0, 1, 1, False, False)
        np.testing.assert_array_equal(a, b)


def test_convert_workers_import_no_torch_numba_or_ffcv():
    """Workers start from a fork server and import dataset_tools.records; with
    torch/numba/ffcv in its imports each worker spent ~4 s before its first
    image (500 images: 88 img/s with 2 workers, 465-1,604 with 1)."""
    import subprocess
    import sys

    code = ("import sys, dataset_tools.records; "
            "print(sorted({'torch', 'numba', 'ffcv'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout
