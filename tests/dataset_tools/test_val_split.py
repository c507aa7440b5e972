"""The held-out validation split made at convert time (--val-fraction).

The split rule (dataset_tools/split.py) is checked against hand-computed
counts and the documented permutation; a real CLI conversion is read back
through the stores (FFCV's Loader, the webdataset tars) and compared with
the source files themselves (bytes, labels, PIL-decoded pixels), not only
with what the manifests say.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_tools.convert import convert
from dataset_tools.convert_options import ConvertError, ConvertOptions, default_val_dir
from dataset_tools.sources import open_source
from dataset_tools.split import holdout_count, stratified_holdout
from dataset_tools.stores import manifest as mf
from dataset_tools.stores.layout import open_store
from dataset_tools.verify import VerifyError, read_beton, verify_store

pytestmark = pytest.mark.filterwarnings(
    # numba finalizers of FFCV-compiled functions complain at garbage collection
    "ignore::pytest.PytestUnraisableExceptionWarning")

CONVERT = Path(__file__).resolve().parents[2] / "dataset_tools" / "convert.py"


def run_convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------ the split rule

def test_rule_exact_per_class_counts_and_partition():
    # class sizes 1, 2, 3, 4, 7, 10, 20, interleaved (not grouped) in source order
    sizes = {0: 1, 1: 2, 2: 3, 3: 4, 4: 7, 5: 10, 6: 20}
    labels = np.array([c for c, n in sizes.items() for _ in range(n)])
    labels = labels[np.random.default_rng(5).permutation(len(labels))]
    train, val = stratified_holdout(labels, 0.25, seed=0)
    # round(0.25 * n) with Python's round, >= 1 for n >= 2, never all, 0 for n == 1
    expected = {0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 5}
    assert {c: int(np.sum(labels[val] == c)) for c in sizes} == expected
    assert {c: holdout_count(n, 0.25) for c, n in sizes.items()} == expected
    for part in (train, val):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    assert not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(len(labels)))
    assert holdout_count(10, 0.99) == 9 and holdout_count(10, 0.01) == 1


def test_rule_follows_documented_permutation_and_seed():
    labels = np.repeat(np.arange(10), 20)
    train, val = stratified_holdout(labels, 0.25, seed=7)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        pick = members[np.random.default_rng([7, c]).permutation(20)[:5]]
        assert np.array_equal(np.sort(pick), val[labels[val] == c])
    again = stratified_holdout(labels, 0.25, seed=7)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = stratified_holdout(labels, 0.25, seed=8)[1]
    assert len(other) == len(val) and not np.array_equal(other, val)
    for c in range(10):  # a different seed changes the choice within (almost) every class
        assert np.sum(labels[other] == c) == 5
    assert sum(not np.array_equal(other[labels[other] == c], val[labels[val] == c])
               for c in range(10)) >= 8


def test_rule_zero_fraction_and_bad_arguments():
    labels = np.repeat(np.arange(3), 4)
    train, val = stratified_holdout(labels, 0.0, seed=0)
    assert np.array_equal(train, np.arange(12)) and len(val) == 0
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"fraction .* must be in \[0, 1\)"):
            stratified_holdout(labels, bad, seed=0)
    with pytest.raises(ValueError, match="seed"):
        stratified_holdout(labels, 0.5, seed=-1)


def test_default_val_dir():
    assert default_val_dir(Path("/d/cifar/train")) == Path("/d/cifar/val")
    assert default_val_dir(Path("/d/store")) == Path("/d/store-val")
    assert default_val_dir("rel/trainset") == Path("rel/trainset-val")


# ------------------------------------------------------------ a real conversion via the CLI

def _source_oracle(src: Path):
    """Per listed source item, independently of the converter: sha256 of the
    file's bytes, the label, and the digest of the PIL-decoded pixels."""
    s = open_source(src)
    sha = [hashlib.sha256(Path(it.ref).read_bytes()).hexdigest() for it in s.items]
    labels = np.array([it.label for it in s.items])
    pixels = [mf.sample_pixel_digest(np.asarray(Image.open(it.ref).convert("RGB")))
              for it in s.items]
    return s.classes, sha, labels, pixels


def _read_tars(store) -> tuple[list[str], list[int]]:
    """(sha256 member, cls member) of every webdataset sample, in key order."""
    sha, cls = [], []
    for tar_path, _ in store.dali_shards():
        with tarfile.open(tar_path) as tf:
            for m in tf:
                if m.name.endswith(".sha256"):
                    sha.append(tf.extractfile(m).read().decode())
                elif m.name.endswith(".cls"):
                    cls.append(int(tf.extractfile(m).read()))
    return sha, cls


@pytest.fixture(scope="module")
def split_run(cifar_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("valsplit")
    r = run_convert(cifar_subset, root / "train", "--val-fraction", "0.25", "--val-seed", "3",
                    "--split-name", "train", "--write-mode", "raw", "--student-resolution", "16",
                    "--samples-per-shard", "64", "--workers", "2")
    assert r.returncode == 0, r.stderr
    return root, r


def test_cli_writes_train_and_default_val_dir(split_run):
    root, r = split_run
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]  # no staging left
    assert sorted(p.name for p in (root / "val").iterdir()) == [
        "manifest.json", "val.beton", "val_lowres.beton", "val_wds"]
    assert "150 images (train part)" in r.stdout and "50 images (val part)" in r.stdout
    train, val = open_store(root / "train"), open_store(root / "val")
    assert (train.role, val.role) == ("train", "val")
    assert (train.split, val.split) == ("train", "val")


def test_parts_are_disjoint_cover_the_source_and_hold_what_they_say(split_run, cifar_subset):
    root, _ = split_run
    classes, sha, labels, pixels = _source_oracle(cifar_subset)
    assert len(sha) == 200 and len(set(sha)) == 200  # distinct files, so sets are meaningful
    held: dict[str, set[str]] = {}
    for role in ("train", "val"):
        store = open_store(root / role)
        pos = store.holdout["source_positions"]
        tar_sha, tar_cls = _read_tars(store)
        # the webdataset samples are the source files at the recorded positions, in order
        assert tar_sha == [sha[p] for p in pos]
        assert tar_cls == labels[pos].tolist()
        # FFCV: labels, indices and decoded pixels equal the PIL decode of those files
        blabels, bidx, bpixels, _ = read_beton(store.path("ffcv"))
        assert blabels.tolist() == labels[pos].tolist()
        assert bidx.tolist() == list(range(len(pos)))
        expect = mf.PixelDigest()
        for p in pos:
            expect.update(pixels[p])
        assert bpixels == expect.hexdigest()
        lo_labels = read_beton(store.path("ffcv_lowres"))[0]
        assert lo_labels.tolist() == labels[pos].tolist()
        # same class list (indices) as the source in both parts
        assert store.manifest["classes"] == {c: i for i, c in enumerate(classes)}
        held[role] = set(tar_sha)
    assert not held["train"] & held["val"]
    assert held["train"] | held["val"] == set(sha)


def test_manifests_record_the_split(split_run, cifar_subset):
    root, _ = split_run
    labels = np.array([it.label for it in open_source(cifar_subset).items])
    want_train, want_val = stratified_holdout(labels, 0.25, 3)
    for role, want, per_class in (("train", want_train, 15), ("val", want_val, 5)):
        m = json.loads((root / role / "manifest.json").read_text())
        h = m["holdout"]
        assert h == {"role": role, "val_fraction": 0.25, "seed": 3, "source": str(cifar_subset),
                     "source_positions": want.tolist()}
        assert m["num_samples"] == len(want) and m["class_counts"] == [per_class] * 10
        assert "val_fraction" not in m["options"] and m["split"] == role


def test_both_parts_verify_and_verify_checks_the_record(split_run, tmp_path):
    root, _ = split_run
    for role in ("train", "val"):
        lines = verify_store(root / role)
        assert any(line.startswith(f"holdout: {role} part") for line in lines)
    bad = shutil.copytree(root / "val", tmp_path / "val")
    m = json.loads((bad / "manifest.json").read_text())
    m["holdout"]["source_positions"] = m["holdout"]["source_positions"][:-1]
    (bad / "manifest.json").write_text(mf.dumps(m))
    with pytest.raises(VerifyError, match="holdout: 49 source positions, manifest says 50"):
        verify_store(bad)


# ------------------------------------------------------------ Python API, edge cases

def _small_source(cifar_subset: Path, dst: Path, per_class: dict[str, int]) -> Path:
    for i, (name, n) in enumerate(per_class.items()):
        src_dir = sorted(cifar_subset.iterdir())[i]
        (dst / name).mkdir(parents=True)
        for f in sorted(src_dir.iterdir())[:n]:
            shutil.copyfile(f, dst / name / f.name)
    return dst


def _opts(**kw) -> ConvertOptions:
    return ConvertOptions(**{"formats": ("dali",), "workers": 1, **kw})


def test_api_default_sibling_and_single_image_class(cifar_subset, tmp_path):
    src = _small_source(cifar_subset, tmp_path / "src", {"a": 1, "b": 4, "c": 2})
    res = convert(src, tmp_path / "store", _opts(val_fraction=0.5, val_seed=1), progress=False)
    assert res.val is not None and res.val.out_dir == tmp_path / "store-val"
    train, val = open_store(tmp_path / "store"), open_store(tmp_path / "store-val")
    # the single image of class a stays in train; a keeps index 0 in the val part
    assert train.manifest["class_counts"] == [1, 2, 1]
    assert val.manifest["class_counts"] == [0, 2, 1]
    assert val.manifest["classes"] == train.manifest["classes"] == {"a": 0, "b": 1, "c": 2}
    tpos, vpos = train.holdout["source_positions"], val.holdout["source_positions"]
    assert 0 in tpos and not set(tpos) & set(vpos) and sorted(tpos + vpos) == list(range(7))
    assert val.split == "src-val"  # split names: NAME-val unless NAME is train
    verify_store(tmp_path / "store")
    verify_store(tmp_path / "store-val")


def test_api_explicit_val_out_and_whole_store_has_no_record(cifar_subset, tmp_path):
    src = _small_source(cifar_subset, tmp_path / "src", {"a": 3, "b": 3})
    res = convert(src, tmp_path / "t", _opts(val_fraction=0.3, val_out=str(tmp_path / "v")),
                  progress=False)
    assert res.val.out_dir == tmp_path / "v" and open_store(tmp_path / "v").role == "val"
    assert not (tmp_path / "t-val").exists()
    whole = convert(src, tmp_path / "w", _opts(), progress=False)
    assert whole.val is None and "holdout" not in whole.manifest
    assert open_store(tmp_path / "w").role == "whole"
    assert not any(k.startswith("val") for k in whole.manifest["options"])


def test_api_bad_file_in_either_part_writes_neither(cifar_subset, tmp_path):
    src = _small_source(cifar_subset, tmp_path / "src", {"a": 4, "b": 4})
    for f in (src / "a").iterdir():  # every file of class a is bad: it is in both parts
        f.write_bytes(b"")
    with pytest.raises(ConvertError, match="nothing was written"):
        convert(src, tmp_path / "train", _opts(val_fraction=0.5), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_api_nothing_to_hold_out(cifar_subset, tmp_path):
    src = _small_source(cifar_subset, tmp_path / "src", {"a": 1, "b": 1})
    with pytest.raises(ConvertError, match=r"--val-fraction 0.5: no class .* has 2 or more"):
        convert(src, tmp_path / "train", _opts(val_fraction=0.5), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------ bad options via the CLI

@pytest.mark.parametrize("args,message", [
    (["--val-fraction", "1.0"], r"--val-fraction 1.0: must be in [0, 1)"),
    (["--val-fraction", "-0.1"], r"--val-fraction -0.1: must be in [0, 1)"),
    (["--val-fraction", "1.5"], r"--val-fraction 1.5: must be in [0, 1)"),
    (["--val-fraction", "nan"], r"--val-fraction nan: must be in [0, 1)"),
    (["--val-seed", "-2", "--val-fraction", "0.2"], "--val-seed -2: must be an integer >= 0"),
    (["--val-out", "{tmp}/v"], "--val-out {tmp}/v needs --val-fraction F (0 < F < 1)"),
    (["--val-fraction", "0.2", "--val-out", "{tmp}/out"],
     "--val-out {tmp}/out: the same folder as OUT_DIR {tmp}/out"),
    (["--val-fraction", "0.2", "--val-out", "{tmp}/out/v"],
     "--val-out {tmp}/out/v: inside OUT_DIR {tmp}/out"),
])
def test_cli_bad_val_options(cifar_subset, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = run_convert(cifar_subset, tmp_path / "out", *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"convert: error: {message.replace('{tmp}', str(tmp_path))}" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
