"""CIFAR-C corruptions (trainer/evaluation/corruptions.py) and ``evaluate --corruptions``."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from trainer.evaluation import corruption_ops as C
from trainer.evaluation import corruptions as D
from trainer import jobs
from trainer.__main__ import main as cli
from trainer.recipe import Config


@pytest.fixture(scope="module")
def images(data_root) -> np.ndarray:
    """24 real CIFAR-100 test images (3 from each of 8 classes), uint8 NHWC."""
    split = data_root / "cifar100" / "test"
    files = [f for d in sorted(split.iterdir())[:8] for f in sorted(d.iterdir())[:3]]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_contract(images, name):
    """uint8, same shape, deterministic, batch-independent, changes the image."""
    x = images[:6]
    idx = np.arange(100, 106)
    for sev in (1, 5):
        out = C.corrupt_batch(x, name, sev, idx, seed=3)
        assert out.dtype == np.uint8 and out.shape == x.shape
        assert np.array_equal(out, C.corrupt_batch(x, name, sev, idx, seed=3))
        one = C.corrupt(x[2], name, sev, index=102, seed=3)  # alone == inside the batch
        assert np.array_equal(one, out[2])
        assert np.abs(out.astype(int) - x).mean() > 0.5, (name, sev)
    if name not in ("zoom_blur", "contrast", "brightness", "pixelate", "jpeg_compression",
                    "defocus_blur"):  # the random ones depend on the seed and the index
        a = C.corrupt_batch(x, name, 5, idx, seed=3)
        assert not np.array_equal(a, C.corrupt_batch(x, name, 5, idx, seed=4))
        assert not np.array_equal(a[0], C.corrupt(x[0], name, 5, index=999, seed=3))


def _mad(clean, out):
    return float(np.abs(out.astype(np.float64) - clean).mean())


def _decorrelation(clean, out):
    """1 - Pearson correlation per image: blind to the affine intensity change
    of frost's blend, which makes its mean difference non-monotone."""
    a = clean.reshape(len(clean), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(np.mean(1 - (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


# Exceptions found by measuring (24 images): glass blur changes in two steps
# (1 pass at severities 1-3, 2 passes at 4-5; sigma alone barely matters);
# motion blur's severities 3 and 4 share sigma 2 (the radius only adds
# negligible taps), so they are equal up to the random angle, and so are
# frost's (image, frost) weights (0.9, 0.4) and (0.85, 0.4); elastic is
# excluded: its CIFAR-C affine jitter shrinks with severity (0.08 -> 0.03 of
# the image) while the local elastic displacement grows, so the mean pixel
# difference falls (about 20 -> 12) although severity 5 is the most warped.
def test_severity_monotone(images):
    for name in C.CORRUPTIONS:
        measure = _decorrelation if name == "frost" else _mad
        m = [measure(images, C.corrupt_batch(images, name, s, range(len(images)))) for s in C.SEVERITIES]
        if name == "elastic_transform":
            continue
        if name == "glass_blur":
            assert min(m[3:]) > 1.3 * max(m[:3]), m
        elif name in ("motion_blur", "frost"):  # severities 3 and 4 nearly the same
            assert m[0] < m[1] < m[2] and m[2] * 0.9 < m[3] < m[4], (name, m)
        else:
            assert all(a < b for a, b in zip(m, m[1:])), (name, m)


def test_brightness_by_hand():
    """HSV value + c with hue and saturation kept == scaling RGB by V'/V
    (a black pixel becomes grey V'); truncated to uint8. cv2 computes in
    float32, hence 1 level of slack."""
    img = np.array([[[100, 50, 0], [0, 0, 0], [255, 0, 0]],
                    [[200, 200, 200], [10, 200, 90], [250, 251, 252]]], np.uint8)
    expect = {1: [[[112, 56, 0], [12, 12, 12], [255, 0, 0]],  # c = 0.05
                  [[212, 212, 212], [10, 212, 95], [252, 253, 255]]],
              5: [[[176, 88, 0], [76, 76, 76], [255, 0, 0]],  # c = 0.3, V' clipped at 1
                  [[255, 255, 255], [12, 255, 114], [252, 253, 255]]]}
    for sev, want in expect.items():
        got = C.corrupt(img, "brightness", sev).astype(int)
        assert np.abs(got - np.array(want)).max() <= 1, (sev, got.tolist())
    # And the closed form on random pixels.
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    f = rgb / 255.0
    v = f.max(-1, keepdims=True)
    scale = np.minimum(v + 0.15, 1) / np.where(v > 0, v, 1)
    want = np.where(v > 0, f * scale, 0.15) * 255
    assert np.abs(C.corrupt(rgb, "brightness", 3).astype(float) - np.floor(want + 1e-9)).max() <= 1


def test_contrast_by_hand():
    # Per channel: mean of {0, 255} is 0.5; factor 0.75 -> 0.125 and 0.875 of 255 (truncated).
    img = np.array([[[0, 255, 10]], [[255, 0, 10]]], np.uint8)
    assert C.corrupt(img, "contrast", 1).tolist() == [[[31, 223, 10]], [[223, 31, 10]]]
    # Severity 5 (0.15): 0.5 -/+ 0.075 -> 108.375 / 146.625.
    assert C.corrupt(img, "contrast", 5).tolist() == [[[108, 146, 10]], [[146, 108, 10]]]


def test_jpeg_matches_pil(images):
    for sev, quality in zip(C.SEVERITIES, (80, 65, 58, 50, 40)):
        for img in images[:4]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
            want = np.asarray(Image.open(buf).convert("RGB"))
            assert np.array_equal(C.corrupt(img, "jpeg_compression", sev), want)


def test_filters_match_opencv(images):
    """The batched torch convolutions equal OpenCV per image with the border
    modes of the reference (skimage gaussian: replicate; cv2.filter2D: reflect 101)."""
    f = images[:4] / 255.0
    for sigma in (0.4, 1.0):
        k = 2 * int(4 * sigma + 0.5) + 1
        want = np.stack([cv2.GaussianBlur(im, (k, k), sigma, borderType=cv2.BORDER_REPLICATE) for im in f])
        assert np.abs(C._gaussian(f, sigma) - want).max() < 1e-9
    for radius, alias in C.CIFAR_C_PARAMS["defocus_blur"]:
        kern = C.disk_kernel(radius, alias)
        want = np.stack([cv2.filter2D(im, -1, kern) for im in f])
        assert np.abs(C._conv(f, kern, "reflect") - want).max() < 1e-9


def test_motion_kernel_by_hand():
    """Angle 0: a one-sided horizontal line, weights exp(-i^2 / 2 sigma^2)."""
    k = C.motion_kernel(3, 1.5, 0.0)
    r = 6
    w = np.exp(-np.arange(7) ** 2 / (2 * 1.5 ** 2))
    assert np.allclose(k[r, r:], w / w.sum()) and np.isclose(k.sum(), 1)
    assert np.count_nonzero(k) == 7
    k90 = C.motion_kernel(3, 1.5, 90.0)  # straight down the rows
    assert np.allclose(k90[r:, r], w / w.sum())


def test_glass_blur_equals_reference_loop(images):
    """The vectorized pass equals the reference's sequential loop, whose tuple
    "swap" of numpy views copies the neighbour into the pixel."""
    t = C.CORRUPTIONS.index("glass_blur")
    for sev in (3, 5):
        sigma, delta, iterations = C.CIFAR_C_PARAMS["glass_blur"][sev - 1]
        out = C.corrupt_batch(images[:3], "glass_blur", sev, [7, 8, 9])
        for k, i in enumerate((7, 8, 9)):
            rng = np.random.default_rng((0, t, sev, i))
            y = C._u8(C._gaussian(C._float(images[k:k + 1]), sigma))[0]
            for _ in range(iterations):
                off = rng.integers(-delta, delta, (2, 30, 30))  # the same draws
                for h in range(32 - delta, delta, -1):
                    for w in range(32 - delta, delta, -1):
                        hp, wp = h + off[0, h - 2, w - 2], w + off[1, h - 2, w - 2]
                        y[h, w], y[hp, wp] = y[hp, wp], y[h, w]
            assert np.array_equal(out[k], C._u8(C._gaussian(C._float(y[None]), sigma))[0])


def test_frost_texture_statistics():
    """The synthetic frost matches the reference photographs' statistics
    (per 32 px crop after its 0.2x resize: mean RGB ~(146, 167, 180), std ~21,
    mean |horizontal gradient| ~18) and is bluish."""
    stats = []
    for i in range(40):
        f = C.frost_texture(32, 32, np.random.default_rng(i))
        assert f.shape == (32, 32, 3) and f.min() >= 0 and f.max() <= 255
        stats.append((*f.mean((0, 1)), f.std((0, 1)).mean(), np.abs(np.diff(f.mean(2), axis=1)).mean()))
    r, g, b, std, grad = np.mean(stats, 0)
    assert 130 < r < 165 and 150 < g < 185 and 165 < b < 200 and r < g < b
    assert 15 < std < 30 and 12 < grad < 24
    p = C.plasma_fractal(32, 2.0, np.random.default_rng(0))
    assert p.shape == (32, 32) and p.min() == 0 and p.max() == 1


def test_selection_and_errors():
    labels = np.array([0, 0, 1, 0, 2, 1, 2, 2, 0])
    assert D.balanced_order(labels).tolist() == [0, 2, 4, 1, 5, 6, 3, 7, 8]
    assert C.parse_selection("fog, snow", "5,1") == (["fog", "snow"], [5, 1])
    assert C.parse_selection("", "") == (list(C.CORRUPTIONS), [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="unknown corruption.*frosty"):
        C.parse_selection("frosty", "")
    with pytest.raises(ValueError, match="severities must be in 1..5"):
        C.parse_selection("", "0,6")
    with pytest.raises(ValueError, match="expected uint8"):
        C.corrupt_batch(np.zeros((1, 4, 4, 3), np.float32), "fog", 1, [0])


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_checkpoint(cifar_stores, tmp_path_factory):
    """A resnet8 teacher trained 2 epochs at 16 px on the 10-class subset: the
    evaluation resizes the 32 px (corrupted) images to 16 px."""
    cfg = Config()
    cfg.run = replace(cfg.run, name="c", out_dir=str(tmp_path_factory.mktemp("runs")), progress=False)
    cfg.data = replace(cfg.data, train_store=str(cifar_stores["train"]), val_store=str(cifar_stores["val"]),
                       test_store=str(cifar_stores["test"]), batch_size=50, eval_batch_size=64, num_workers=0,
                       teacher_resolution=16,
                       num_views=2)
    cfg.model = replace(cfg.model, teacher="resnet8")
    cfg.optim = replace(cfg.optim, epochs=2, lr=0.05)
    jobs.run_teacher(cfg)
    return cfg, cfg.teacher_dir / "final.pt"


def test_native_images_are_the_stored_pixels(tiny_checkpoint):
    from pipelines.reference.loader import decode, index_shards
    from dataset_tools.stores.layout import open_store

    cfg, _ = tiny_checkpoint
    with jobs._eval_loader(cfg, "test", 32, torch.device("cpu")) as loader:
        imgs, labels, idx = D.read_native_images(loader, limit=25)
    store = open_store(cfg.data.test_store)
    shards = index_shards(store)
    assert len(idx) == 25 and sorted(np.bincount(labels).tolist()) == [2] * 5 + [3] * 5
    for k in (0, 11, 24):
        i = int(idx[k])
        with open(shards.tars[shards.shard[i]], "rb") as f:
            f.seek(int(shards.offset[i]))
            raw = decode(f.read(int(shards.size[i])), bool(shards.is_jpeg[i]))
        assert np.array_equal(imgs[k], raw.permute(1, 2, 0).numpy()) and labels[k] == shards.labels[i]
    # Each class contributes its first samples in index order.
    for c in range(10):
        mine = idx[labels == c]
        assert mine.tolist() == np.flatnonzero(shards.labels == c)[:len(mine)].tolist()
    for backend in ("ffcv", "dali"):  # every backend reads the same pixels
        other = replace(cfg, data=replace(cfg.data, backend=backend))
        with jobs._eval_loader(other, "test", 32, torch.device("cpu")) as loader:
            b_imgs, _, b_idx = D.read_native_images(loader, limit=25)
        assert np.array_equal(b_idx, idx) and np.array_equal(b_imgs, imgs), backend


def test_clean_row_equals_evaluate(tiny_checkpoint):
    """No limit: the clean row sees exactly what run_evaluate's loader (the memory backend) sees."""
    cfg, ckpt = tiny_checkpoint
    ev = jobs.run_evaluate(cfg, str(ckpt))
    res = jobs.run_evaluate_corruptions(cfg, str(ckpt), [1], ["contrast"])
    assert res["num_images"] == 200 and res["clean"]["top1"] == ev["top1"]
    assert res["clean"]["ece"] == pytest.approx(ev["ece"], abs=1e-6)
    assert res["clean"]["nll"] == pytest.approx(ev["nll"], rel=1e-5)


def test_cli_evaluate_corruptions(tiny_checkpoint, capsys):
    cfg, ckpt = tiny_checkpoint
    args = ["evaluate", "--corruptions", "--corruption-limit", "30", "--checkpoint", str(ckpt),
            f"data.train_store={cfg.data.train_store}", f"data.val_store={cfg.data.val_store}",
            f"data.test_store={cfg.data.test_store}",
            "data.num_workers=0", "data.eval_batch_size=64", "run.progress=false"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "frost" in printed and "sev 5" in printed
    out = json.loads((ckpt.parent / "final_corruptions.json").read_text())
    assert out["num_images"] == 30 and out["limit"] == 30 and out["resolution"] == 16
    assert out["native_resolution"] == 32
    assert set(out["corruptions"]) == set(C.CORRUPTIONS)
    cells = [out["corruptions"][t][str(s)] for t in C.CORRUPTIONS for s in C.SEVERITIES]
    assert len(cells) == 75 and all(0 <= c["top1"] <= 1 and 0 <= c["ece"] <= 1 for c in cells)
    assert out["mean"]["top1"] == pytest.approx(np.mean([c["top1"] for c in cells]))
    assert out["mean_by_severity"]["5"]["top1"] <= out["clean"]["top1"] + 0.05
    assert cli(args + ["--severities", "7"]) == 1  # clear error, exit code 1
    assert "severities must be in 1..5" in capsys.readouterr().err
