"""Bad and unusual inputs, generated here: what open_source / load_item do
with each, and (at the end) what the convert.py CLI does with a bad corpus."""
from __future__ import annotations

import builtins
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

from dataset_tools.decode import MAX_PIXELS_DEFAULT, load_item
from dataset_tools.sources import BadInput, SourceError, SourceItem, open_source
from source_builders import build_cifar100_dir, write_py2_pickle

RNG = np.random.default_rng(0)


def gradient_rgb(h=48, w=64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)],
                    -1).astype(np.uint8)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h 8-bit gray pixels, with almost no data."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def load_path(path: Path, **kw):
    return load_item(SourceItem(path.name, 0, str(path)), **kw)


def real_jpeg(imagenette_subset: Path) -> Path:
    return sorted((imagenette_subset / sorted(os.listdir(imagenette_subset))[0]).iterdir())[0]


# ------------------------------------------------------------ colour modes

def make_mode_file(kind: str, d: Path) -> tuple[Path, np.ndarray, str]:
    """(file, expected RGB, format) for one colour mode, written with PIL/cv2."""
    rgb = gradient_rgb()
    gray = rgb[..., 0]
    if kind == "cmyk_jpeg":
        f = d / "cmyk.jpg"
        Image.fromarray(rgb).convert("CMYK").save(f, quality=100)
        assert Image.open(f).mode == "CMYK"
        return f, rgb, "jpeg"
    if kind == "gray_L":
        Image.fromarray(gray).save(f := d / "gray.png")
        return f, np.repeat(gray[..., None], 3, 2), "png"
    if kind in ("palette_P", "palette_transparent"):
        pal = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = RNG.integers(0, 256, (40, 50), dtype=np.uint8)
        im = Image.frombytes("P", (50, 40), idx.tobytes())
        im.putpalette(pal.reshape(-1).tolist())
        f = d / f"{kind}.png"
        im.save(f, **({"transparency": 3} if kind == "palette_transparent" else {}))
        assert ("transparency" in Image.open(f).info) == (kind == "palette_transparent")
        return f, pal[idx], "png"
    if kind == "rgba":  # alpha is dropped, colours kept (also where alpha = 0)
        a = RNG.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
        a[:5] = 0
        Image.fromarray(np.dstack([rgb, a])).save(f := d / "rgba.png")
        assert Image.open(f).mode == "RGBA"
        return f, rgb, "png"
    if kind == "gray_alpha_LA":
        a = Image.fromarray(RNG.integers(0, 256, gray.shape, dtype=np.uint8))
        Image.merge("LA", (Image.fromarray(gray), a)).save(f := d / "la.png")
        return f, np.repeat(gray[..., None], 3, 2), "png"
    if kind == "gray16_I16":
        v = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
        Image.fromarray(v).save(f := d / "gray16.png")
        assert Image.open(f).mode == "I;16"
        # PIL's own convert("RGB") clips to 255 instead of scaling: the case matters.
        assert not np.array_equal(np.array(Image.open(f).convert("RGB"))[..., 0], v >> 8)
        return f, np.repeat((v >> 8).astype(np.uint8)[..., None], 3, 2), "png"
    if kind == "rgb16_png":
        v = RNG.integers(0, 65536, (48, 64, 3), dtype=np.uint16)
        cv2.imwrite(str(f := d / "rgb16.png"), v[..., ::-1])
        return f, (v >> 8).astype(np.uint8), "png"
    if kind == "bilevel_1":
        bits = gray > 100
        Image.fromarray(bits).save(f := d / "bits.png")
        return f, np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, 2), "png"
    if kind in ("webp", "bmp", "tiff"):
        f = d / f"x.{kind}"
        Image.fromarray(rgb).save(f, **({"lossless": True} if kind == "webp" else {}))
        return f, rgb, kind
    raise ValueError(kind)


MODES = ["cmyk_jpeg", "gray_L", "palette_P", "palette_transparent", "rgba", "gray_alpha_LA",
         "gray16_I16", "rgb16_png", "bilevel_1", "webp", "bmp", "tiff"]


@pytest.mark.parametrize("kind", MODES)
def test_modes_convert_to_rgb(tmp_path, kind):
    f, want, fmt = make_mode_file(kind, tmp_path)
    got = load_path(f)
    assert got.rgb.shape == want.shape and got.rgb.dtype == np.uint8 and got.fmt == fmt
    if kind == "cmyk_jpeg":  # lossy: close to the source and to OpenCV's decoder
        assert np.abs(got.rgb.astype(int) - want).mean() < 2.0
        np.testing.assert_allclose(got.rgb, cv2.imread(str(f))[..., ::-1], atol=3)
    else:
        np.testing.assert_array_equal(got.rgb, want)


# ------------------------------------------------------------ bad files

def bad_file(kind: str, d: Path, jpeg: Path) -> tuple[Path, str]:
    """(file, expected reason fragment)."""
    if kind == "truncated_jpeg":
        data = jpeg.read_bytes()
        (f := d / "truncated.jpg").write_bytes(data[: len(data) // 2])
        return f, "truncated or corrupt image data"
    if kind == "truncated_png_idat":
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "ok.png")
        data = (d / "ok.png").read_bytes()
        (f := d / "cut.png").write_bytes(data[: len(data) - 300])
        return f, "truncated or corrupt image data"
    if kind == "zero_bytes":
        (f := d / "empty.jpg").write_bytes(b"")
        return f, "empty file (0 bytes)"
    if kind == "text_as_jpg":
        (f := d / "notes.jpg").write_text("this is not an image\n" * 20)
        return f, "not an image"
    if kind == "html_as_png":
        (f := d / "page.png").write_text("<html><body>404 Not Found</body></html>")
        return f, "not an image"
    if kind == "bomb_header":  # 10^10 pixels claimed; decoding it would need 10 GB
        (f := d / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
        return f, f"over the limit of {MAX_PIXELS_DEFAULT} pixels"
    raise ValueError(kind)


BAD = ["truncated_jpeg", "truncated_png_idat", "zero_bytes", "text_as_jpg", "html_as_png",
       "bomb_header"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_file_is_bad_input(tmp_path, imagenette_subset, kind):
    f, fragment = bad_file(kind, tmp_path, real_jpeg(imagenette_subset))
    with pytest.raises(BadInput) as e:
        load_path(f)
    assert e.value.file == str(f) and fragment in e.value.reason
    assert str(e.value).startswith(f"{f}: ") and "; " in str(e.value)  # names file, has a fix


def test_pixel_limit_checked_from_header(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    Image.fromarray(gradient_rgb(30, 40)).save(f := tmp_path / "small.png")
    assert load_path(f, max_pixels=1200).rgb.shape == (30, 40, 3)  # at the limit: fine
    with pytest.raises(BadInput, match=r"40 x 30 = 1200 pixels, over the limit of 1199"):
        load_path(f, max_pixels=1199)
    # 2e8 pixels: over PIL's own hard limit. Raising ours lets PIL try to decode
    # (and fail on the missing data) instead of refusing from the header.
    (big := tmp_path / "big.png").write_bytes(png_header_only(20_000, 10_000))
    with pytest.raises(BadInput, match="over the limit"):
        load_path(big)
    with pytest.raises(BadInput, match="truncated or corrupt"):
        load_path(big, max_pixels=300_000_000)


@pytest.mark.timeout(30)  # a FIFO opened naively would block forever
def test_unreadable_paths_as_root(tmp_path):
    os.mkfifo(fifo := tmp_path / "fifo.jpg")
    (folder := tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "gone.jpg", dangling := tmp_path / "dangling.jpg")
    for f, fragment in [(fifo, "not a regular file"), (folder, "not a regular file"),
                        (dangling, "cannot read (No such file or directory)")]:
        with pytest.raises(BadInput) as e:
            load_path(f)
        assert e.value.file == str(f) and fragment in e.value.reason


def test_truncated_load_flag_must_stay_off(tmp_path, monkeypatch, imagenette_subset):
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_path(real_jpeg(imagenette_subset))


# ------------------------------------------------------------ listing problems

def listing_case(kind: str, root: Path, cname="zz_problem") -> tuple[Path, str]:
    """Add one listing problem to an ImageFolder; (path reported, reason fragment)."""
    c = root / cname
    c.mkdir()
    if kind != "empty_class":
        Image.fromarray(gradient_rgb()).save(c / "fine.png")
    if kind == "fifo":
        os.mkfifo(p := c / "pipe.jpg")
        return p, "not a regular file"
    if kind == "dangling_symlink":
        os.symlink(c / "missing.jpg", p := c / "link.jpg")
        return p, "broken symlink"
    if kind == "self_symlink":
        os.symlink("self.png", p := c / "self.png")
        return p, "symlink loop"
    if kind == "folder_loop":
        (c / "sub").mkdir()
        os.symlink("..", p := c / "sub" / "up")
        return p, "symlink loop: same folder as its ancestor"
    if kind == "empty_class":
        (c / "README.txt").write_text("no images here")
        return c, "empty class folder"
    raise ValueError(kind)


@pytest.fixture()
def good_folder(tmp_path, cifar_subset) -> Path:
    root = tmp_path / "src"
    for c in sorted(os.listdir(cifar_subset))[:2]:
        shutil.copytree(cifar_subset / c, root / c)
    return root


@pytest.mark.parametrize("kind", ["fifo", "dangling_symlink", "self_symlink", "folder_loop",
                                  "empty_class"])
def test_listing_problem_fail_or_skip(good_folder, kind):
    good = open_source(good_folder).items
    path, fragment = listing_case(kind, good_folder)
    with pytest.raises(BadInput) as e:
        open_source(good_folder)
    assert e.value.file == str(path) and fragment in e.value.reason
    src = open_source(good_folder, on_error="skip")
    assert [(f, fragment in r) for f, r in src.skipped] == [(str(path), True)]
    assert src.classes[-1] == "zz_problem"  # an empty class keeps its index
    extra = [] if kind == "empty_class" else [("zz_problem/fine.png", 2)]
    assert [(i.name, i.label) for i in src.items] == [(i.name, i.label) for i in good] + extra


def test_no_images_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class sub-folders"):
        open_source(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    Image.fromarray(gradient_rgb()).save(tmp_path / "flat" / "a.png")
    with pytest.raises(SourceError, match="holds 1 images but no class sub-folders"):
        open_source(tmp_path / "flat")
    for c in ("cat", "dog"):
        (tmp_path / "classes" / c).mkdir(parents=True)
        (tmp_path / "classes" / c / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="no usable images"):
        open_source(tmp_path / "classes", on_error="skip")
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(tmp_path / "nowhere")


# ------------------------------------------------------------ tar

def tar_with(path: Path, good: Path, extra: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tf:
        tf.add(good, arcname="train/cat/good.png")
        for ti in extra:
            tf.addfile(ti, None if ti.size == 0 else open(good, "rb"))
    return path


def member(name, type_=tarfile.REGTYPE, linkname="", size=0):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.size = type_, linkname, size
    return ti


UNSAFE = {
    "dotdot": member("train/cat/../../../evil.png", size=1),
    "absolute": member("/tmp/cqkd_evil_abs.png", size=1),
    "symlink_out": member("train/cat/sym.png", tarfile.SYMTYPE, "../../../etc/passwd"),
    "symlink_abs": member("train/cat/abs.png", tarfile.SYMTYPE, "/etc/hostname"),
    "hardlink_out": member("train/cat/hard.png", tarfile.LNKTYPE, "../outside.png"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_tar_unsafe_member_refused(tmp_path, kind):
    Image.fromarray(gradient_rgb()).save(good := tmp_path / "good.png")
    ti = UNSAFE[kind]
    ti.size = good.stat().st_size if ti.size else 0
    tar = tar_with(tmp_path / "t.tar", good, [ti])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SourceError) as e:
        open_source(tar)
    assert f"{tar}:{ti.name}" in str(e.value) and "refused" in str(e.value)
    src = open_source(tar, on_error="skip")
    assert [f for f, _ in src.skipped] == [f"{tar}:{ti.name}"]
    assert [i.name for i in src.items] == ["t.tar:train/cat/good.png"]
    assert load_item(src.items[0]).data == good.read_bytes()
    assert sorted(tmp_path.rglob("*")) == before and not Path("/tmp/cqkd_evil_abs.png").exists()


def test_tar_bad_members(tmp_path):
    Image.fromarray(gradient_rgb()).save(good := tmp_path / "good.png")
    tar = tar_with(tmp_path / "t.tar", good, [member("train/cat/empty.png"),
                                              member("train/cat/pipe.jpg", tarfile.FIFOTYPE),
                                              member("train/dog/x.jpg", tarfile.SYMTYPE, "nope.jpg")])
    with pytest.raises(BadInput, match="pipe.jpg: not a regular file"):
        open_source(tar)
    src = open_source(tar, on_error="skip")
    assert src.skipped == [
        (f"{tar}:train/cat/pipe.jpg", "not a regular file (device, FIFO or sparse member)"),
        (f"{tar}:train/dog/x.jpg", "link target 'train/dog/nope.jpg' is not a file in the archive"),
        (f"{tar}:train/dog", "empty class folder: no image files")]
    assert src.classes == ["cat", "dog"] and len(src.items) == 2
    with pytest.raises(BadInput, match="empty file"):
        load_item(src.items[0])
    # Cut inside a member's data: refused when listed, reported if cut after.
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        m = tf.getmember("train/cat/good.png")
    (cut := tmp_path / "cut.tar").write_bytes(data[: m.offset_data + m.size // 2])
    with pytest.raises(SourceError, match="cut.tar: not a readable tar archive"):
        open_source(cut)
    good_item = next(i for i in src.items if i.name.endswith("good.png"))
    assert load_item(good_item).data == good.read_bytes()
    tar.write_bytes(data[: m.offset_data + m.size // 2])
    with pytest.raises(BadInput, match="archive truncated"):
        load_item(good_item)
    (tmp_path / "junk.tar").write_bytes(b"\x00" * 100 + b"not a tar")
    with pytest.raises(SourceError, match="not a readable tar archive"):
        open_source(tmp_path / "junk.tar")


# ------------------------------------------------------------ CIFAR pickles

class RunsCode:
    """Pickles to a call of ``func(*args)``: what a malicious 'dataset' does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload", ["os_system", "exec"])
def test_malicious_pickle_does_not_run(tmp_path, payload):
    def make(marker: Path):
        if payload == "os_system":
            return RunsCode(os.system, f"touch {marker}")
        return RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps({b"data": make(control)}, protocol=2))
    assert control.exists()  # the payload is live with a plain unpickler

    marker = tmp_path / "marker"
    evil = tmp_path / "data_batch_evil"
    evil.write_bytes(pickle.dumps({b"data": make(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(SourceError, match=r"not a CIFAR pickle, it refuses global "
                                          r"(posix\.system|__builtin__\.exec)") as e:
        open_source(evil)  # detected as a pickle -> cifar
    assert str(evil) in str(e.value) and not marker.exists()
    # Inside a CIFAR folder, a poisoned meta file is refused too.
    d = tmp_path / "c100"
    d.mkdir()
    write_py2_pickle(d / "train", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": make(marker)}, protocol=2))
    with pytest.raises(SourceError, match="refuses global"):
        open_source(d)
    assert not marker.exists()


def test_non_cifar_pickles(tmp_path, cifar_subset):
    cases = {"a_list": (pickle.dumps([1, 2, 3]), "not a CIFAR batch"),
             "no_data": (pickle.dumps({b"labels": [1]}), "not a CIFAR batch"),
             "wrong_shape": (pickle.dumps({b"data": np.zeros((2, 10), np.uint8),
                                           b"labels": [0, 1]}), "N x 3072"),
             "few_labels": (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                          b"labels": [0]}), "1 labels for 2 images")}
    for name, (data, fragment) in cases.items():
        (f := tmp_path / name).write_bytes(data)
        with pytest.raises(SourceError, match=fragment):
            open_source(f, "cifar")
    d = tmp_path / "cifar-100-python"
    build_cifar100_dir(cifar_subset, d)
    raw = (d / "train").read_bytes()
    (d / "train").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SourceError, match="damaged or not a pickle"):
        open_source(d)
    (d / "test").unlink()
    with pytest.raises(SourceError, match="test: missing from the CIFAR folder"):
        open_source(d, split="test")


# ------------------------------------------------------------ HDF5

def test_hdf5_bad_layouts(tmp_path):
    def h5(name, **datasets):
        with h5py.File(f := tmp_path / name, "w") as fh:
            for k, v in datasets.items():
                fh.create_dataset(k, data=v)
        return f
    img = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(SourceError, match=r"4 images in 'images' but 3 labels in 'labels'"):
        open_source(h5("mismatch.h5", images=img, labels=np.arange(3)))
    with pytest.raises(SourceError, match=r"is float32 .*expected uint8"):
        open_source(h5("float.h5", images=img.astype(np.float32), labels=np.arange(4)))
    with pytest.raises(SourceError, match=r"no dataset 'images' \(datasets: x, y\).*--hdf5-images"):
        open_source(h5("keys.h5", x=img, y=np.arange(4)))
    f = h5("neg.h5", images=img, labels=np.array([0, 1, -1, 1]))
    with pytest.raises(BadInput, match=r"neg.h5\[2\]: label -1 outside 0..1"):
        open_source(f)
    src = open_source(f, on_error="skip")
    assert [i.name for i in src.items] == ["neg.h5[0]", "neg.h5[1]", "neg.h5[3]"]
    assert src.skipped == [(f"{f}[2]", "label -1 outside 0..1")]


# ------------------------------------------------------------ convert.py CLI

CONVERT = Path(__file__).resolve().parents[2] / "dataset_tools" / "convert.py"


def run_convert(*args) -> "subprocess.CompletedProcess":
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def bad_corpus(tmp_path, cifar_subset, imagenette_subset) -> tuple[Path, dict, int]:
    """ImageFolder with good images, odd colour modes and every kind of bad file.
    -> (root, {bad path: reason fragment}, number of good images)."""
    root = tmp_path / "corpus"
    for c in sorted(os.listdir(cifar_subset))[:2]:
        shutil.copytree(cifar_subset / c, root / c)
    (root / "modes").mkdir()
    for kind in ("cmyk_jpeg", "gray16_I16", "rgba", "palette_transparent"):
        make_mode_file(kind, root / "modes")
    (root / "junk").mkdir()
    bad = {}
    for kind in BAD:
        f, fragment = bad_file(kind, root / "junk", real_jpeg(imagenette_subset))
        bad[str(f)] = fragment
    (root / "junk" / "ok.png").unlink()  # the intact copy behind the truncated PNG
    for kind in ("fifo", "dangling_symlink", "self_symlink", "empty_class"):
        p, fragment = listing_case(kind, root, f"zz_{kind}")
        bad[str(p)] = fragment
    return root, bad, 2 * 20 + 4 + 3  # cifar, modes, one fine.png per non-empty zz_ class


def test_cli_skip_lists_every_bad_file(tmp_path, bad_corpus):
    root, bad, n_good = bad_corpus
    out = tmp_path / "out"
    r = run_convert(root, out, "--on-error", "skip", "--workers", "2")
    assert r.returncode == 0, r.stderr
    import json
    m = json.loads((out / "manifest.json").read_text())
    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert sorted(skipped) == sorted(bad)
    for f, fragment in bad.items():
        assert fragment in skipped[f], (f, skipped[f])
    assert m["num_samples"] == n_good
    counts = {c: m["class_counts"][i] for c, i in m["classes"].items()}
    assert counts["modes"] == 4 and counts["zz_fifo"] == 1
    assert counts["junk"] == 0 and counts["zz_empty_class"] == 0  # classes keep their index
    assert sorted(m["classes"]) == sorted(os.listdir(root))


def test_cli_fail_names_file_and_writes_nothing(tmp_path, cifar_subset, imagenette_subset):
    root = tmp_path / "src"
    for c in sorted(os.listdir(cifar_subset))[:3]:
        shutil.copytree(cifar_subset / c, root / c)
    last = root / sorted(os.listdir(root))[-1]
    f, _ = bad_file("truncated_jpeg", last, real_jpeg(imagenette_subset))
    out = tmp_path / "out"
    r = run_convert(root, out, "--on-error", "fail", "--workers", "1")
    assert r.returncode != 0
    assert f"{f}: truncated or corrupt image data" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no OUT_DIR, no staging left behind
