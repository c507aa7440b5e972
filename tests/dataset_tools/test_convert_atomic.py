"""Atomic conversion: kill -9 midway, bad files, stale staging directories."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dataset_tools.atomic import LOCK_NAME, Staging
from dataset_tools.convert import convert, main
from dataset_tools.convert_options import ConvertOptions
from dataset_tools.records import DELAY_ENV
from dataset_tools.stores.layout import open_store
from dataset_tools.verify import verify_store

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "dataset_tools" / "convert.py"
OPTS = dict(write_mode="raw", student_resolution=16, samples_per_shard=16)
CLI_OPTS = ["--write-mode", "raw", "--student-resolution", "16", "--samples-per-shard", "16"]

pytestmark = pytest.mark.filterwarnings(
    # numba finalizers of FFCV-compiled functions complain at garbage collection
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _file_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".partial-*"))


def test_kill9_midway_leaves_nothing_complete_and_rerun_is_identical(cifar_subset, tmp_path):
    out = tmp_path / "store"
    env = {**os.environ, DELAY_ENV: "0.03"}  # 200 items x 30 ms / 2 workers = ~3 s of work
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(cifar_subset), str(out),
                             "--workers", "2", "--no-progress", *CLI_OPTS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        # Kill once the run is visibly mid-write: staging dir with >= 2 closed shards.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            st = _staging_dirs(out)
            if st and len(list(st[0].glob("*_wds/*.idx"))) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before the kill: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its orphaned decode workers, if any
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    stale = _staging_dirs(out)
    assert len(stale) == 1 and not (stale[0] / "manifest.json").exists()
    assert not out.exists()  # nothing that looks like a store

    rerun = convert(cifar_subset, out, ConvertOptions(workers=2, **OPTS), progress=False)
    assert _staging_dirs(out) == []  # the dead run's staging dir was cleaned
    ref = convert(cifar_subset, tmp_path / "reference", ConvertOptions(workers=1, **OPTS),
                  progress=False)
    assert rerun.manifest == ref.manifest
    assert _file_digests(out) == _file_digests(ref.out_dir)
    assert open_store(out).num_samples == 200


def _with_bad_file(subset: Path, dst: Path) -> tuple[Path, Path]:
    root = shutil.copytree(subset, dst)
    good = sorted((root / "apple").iterdir())[0]
    bad = root / "apple" / "zz_truncated.png"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header survives, pixel data cut
    return root, bad


def test_bad_file_fail_writes_nothing_skip_lists_it(cifar_subset, tmp_path, capsys):
    src, bad = _with_bad_file(cifar_subset, tmp_path / "src")
    out = tmp_path / "out"
    rc = main([str(src), str(out), "--workers", "2", "--no-progress", *CLI_OPTS])
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "--on-error skip" in err
    assert not out.exists() and _staging_dirs(out) == []

    # an existing store stays untouched by a failing run
    convert(cifar_subset, out, ConvertOptions(workers=1, **OPTS), progress=False)
    before = _file_digests(out)
    assert main([str(src), str(out), "--workers", "1", "--no-progress", *CLI_OPTS]) == 1
    assert _file_digests(out) == before and _staging_dirs(out) == []

    rc = main([str(src), str(out), "--workers", "2", "--no-progress", "--on-error", "skip",
               *CLI_OPTS])
    assert rc == 0
    m = open_store(out).manifest
    assert m["num_samples"] == 200
    assert [s["file"] for s in m["skipped"]] == [str(bad)]
    assert "truncated" in m["skipped"][0]["reason"]
    verify_store(out)  # the .beton sized for 201 samples holds 200 and reads back fine


def test_refuses_outputs_that_would_delete_data(cifar_subset, tmp_path):
    from dataset_tools.convert_options import ConvertError

    opts = ConvertOptions(workers=1, **OPTS)
    for out in (cifar_subset, cifar_subset.parent, cifar_subset / "apple" / "store"):
        with pytest.raises(ConvertError, match="outside the source"):
            convert(cifar_subset, out, opts, progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(ConvertError, match="not a converted store"):
        convert(cifar_subset, precious, opts, progress=False)
    assert (precious / "thesis.tex").read_text() == "keep me"
    assert not (cifar_subset / "apple" / "store").exists()


_HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
""")


def test_stale_staging_cleaned_live_one_kept(tmp_path):
    out = tmp_path / "store"
    dead = tmp_path / "store.partial-999999"  # lock file present but nobody holds it
    dead.mkdir()
    (dead / LOCK_NAME).touch()
    old = tmp_path / "store.old-999998"  # a swap interrupted after moving OUT_DIR aside
    old.mkdir()
    live = tmp_path / "store.partial-1"
    live.mkdir()
    (live / LOCK_NAME).touch()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(live / LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Staging(out) as st:
            (st.path / "x").write_text("1")
            st.commit()
        assert not dead.exists() and not old.exists()
        assert live.exists()  # another live run's staging is left alone
        assert (out / "x").read_text() == "1" and not (out / LOCK_NAME).exists()
        with Staging(out) as st:  # replacing an existing OUT_DIR
            (st.path / "y").write_text("2")
            st.commit()
        assert sorted(p.name for p in out.iterdir()) == ["y"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "store.partial-1"]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(180)
def test_workers_start_clean_after_opencv_threads_ran(cifar_subset, tmp_path):
    """A caller that already used OpenCV's thread pool (a notebook, a test
    session) must not hang the workers: with fork they inherited the pool's
    locks, and worker_init's cv2.setNumThreads waited on them forever."""
    import cv2
    import numpy as np

    cv2.setNumThreads(2)
    big = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    cv2.GaussianBlur(big, (31, 31), 5)  # runs on the pool's threads
    out = tmp_path / "store"
    convert(cifar_subset, out, ConvertOptions(workers=2, **OPTS), progress=False)
    verify_store(out)  # raises on any problem
