"""Resumable conversion (dataset_tools/resume.py): a conversion killed with
``kill -9`` (or Ctrl-C) at several points and rerun gives, file by file,
the bytes of an uninterrupted conversion (the oracle), for every format, with
and without --val-fraction, whatever the worker counts of the two runs; the
progress bar says how much was resumed; partial work made with other options
or another source, or whose files no longer match it, is discarded with a
message saying why."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dataset_tools.part_writer as part_writer
from dataset_tools.convert import convert, main
from dataset_tools.convert_options import ConvertOptions, default_val_dir
from dataset_tools.records import DELAY_ENV
from dataset_tools.resume import RESUME_DIR
from dataset_tools.verify import verify_store

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "dataset_tools" / "convert.py"
EVERY = 20  # source items per checkpoint in these tests (200 items: 10 chunks)
OPTS = dict(write_mode="raw", student_resolution=16, samples_per_shard=16, checkpoint_every=EVERY)
CLI_OPTS = ["--write-mode", "raw", "--student-resolution", "16", "--samples-per-shard", "16",
            "--checkpoint-every", str(EVERY)]

pytestmark = pytest.mark.filterwarnings(
    # numba finalizers of FFCV-compiled functions complain at garbage collection
    "ignore::pytest.PytestUnraisableExceptionWarning")


def file_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(got: Path, want: Path) -> None:
    a, b = file_digests(got), file_digests(want)
    assert sorted(a) == sorted(b), f"file lists differ: {sorted(set(a) ^ set(b))}"
    assert [f for f in a if a[f] != b[f]] == [], "files with other bytes"


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".partial-*"))


def tail_positions(staging: Path) -> list[int]:
    """Source positions of the finished checkpoints in a staging directory."""
    tails = sorted((staging / RESUME_DIR).glob("tail-*.npz"))
    return [(int(re.search(r"(\d+)", t.name)[1]) + 1) * EVERY for t in tails]


@pytest.fixture(scope="module")
def reference(cifar_subset, tmp_path_factory) -> Path:
    """The uninterrupted conversion (one worker)."""
    out = tmp_path_factory.mktemp("resume_ref") / "store"
    convert(cifar_subset, out, ConvertOptions(workers=1, **OPTS), progress=False)
    return out


def kill_after(cmd: list[str], staging_of: Path, finished: int) -> list[int]:
    """Run ``cmd``, ``kill -9`` it once its staging directory holds ``finished``
    checkpoints (0: right after it started writing); -> the checkpoints left."""
    env = {**os.environ, DELAY_ENV: "0.05"}  # 200 items x 50 ms / 2 workers: ~5 s of work
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            st = staging_dirs(staging_of)
            if st and (st[0] / RESUME_DIR / "key.json").is_file() and \
                    max(tail_positions(st[0]), default=0) >= finished * EVERY:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"run ended before the kill: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its orphaned decode workers, if any
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    assert not staging_of.exists()  # nothing that looks like a store
    (st,) = staging_dirs(staging_of)
    return tail_positions(st)


@pytest.mark.parametrize("finished", [0, 2, 8], ids=["no-chunk", "some-chunks", "most-chunks"])
def test_kill9_then_rerun_equals_uninterrupted(cifar_subset, reference, tmp_path, capsys,
                                               finished):
    out = tmp_path / "store"
    left = kill_after([sys.executable, str(SCRIPT), str(cifar_subset), str(out),
                       "--workers", "2", "--no-progress", *CLI_OPTS], out, finished)
    if finished:
        assert left and max(left) >= finished * EVERY
    expected = max(left, default=0)

    rerun = convert(cifar_subset, out, ConvertOptions(workers=1, **OPTS), progress=True)
    err = capsys.readouterr().err
    assert rerun.resumed == expected and rerun.discarded is None
    if expected:
        assert f"resumed {expected:,} of 200 from finished chunks" in err
    else:
        assert "resumed" not in err
    assert staging_dirs(out) == []
    assert_same_files(out, reference)
    assert not (out / RESUME_DIR).exists()
    verify_store(out)


def test_kill9_val_fraction_resumes_both_parts(cifar_subset, tmp_path, capsys):
    opts = ConvertOptions(workers=1, val_fraction=0.2, val_seed=3, split_name="train", **OPTS)
    ref = convert(cifar_subset, tmp_path / "ref" / "train", opts, progress=False)
    out = tmp_path / "run" / "train"
    left = kill_after([sys.executable, str(SCRIPT), str(cifar_subset), str(out),
                       "--workers", "2", "--val-fraction", "0.2", "--val-seed", "3",
                       "--split-name", "train", *CLI_OPTS], out, 3)
    assert staging_dirs(default_val_dir(out)), "the val part's staging directory is kept too"
    rc = main([str(cifar_subset), str(out), "--workers", "1", "--val-fraction", "0.2",
               "--val-seed", "3", "--split-name", "train", *CLI_OPTS])
    captured = capsys.readouterr()
    assert rc == 0
    assert f"resumed {max(left):,} of 200 from finished chunks" in captured.err
    assert f"resumed {max(left):,} source items" in captured.out
    assert_same_files(out, ref.out_dir)
    assert_same_files(default_val_dir(out), ref.val.out_dir)
    assert staging_dirs(out) == [] and staging_dirs(default_val_dir(out)) == []


class Interrupted(KeyboardInterrupt):
    pass


def interrupt_at(monkeypatch, n_added: int) -> None:
    """Ctrl-C while the ``n_added``-th sample is appended."""
    real, calls = part_writer.PartWriter.add, []

    def add(self, pos, res):
        calls.append(pos)
        if len(calls) == n_added:
            raise Interrupted
        return real(self, pos, res)

    monkeypatch.setattr(part_writer.PartWriter, "add", add)


@pytest.mark.parametrize("source,extra,stop", [
    ("cifar", dict(formats=("ffcv",)), 95),
    ("cifar", dict(formats=("dali",), write_mode="proportion", val_fraction=0.25), 150),
    ("imagenette", dict(write_mode="jpg", val_fraction=0.3, student_resolution=None), 50),
])
def test_ctrl_c_keeps_partial_work_and_rerun_equals_uninterrupted(
        cifar_subset, imagenette_subset, tmp_path, monkeypatch, source, extra, stop):
    """Every format and write mode (in-process, Ctrl-C instead of kill -9: the
    writers' abort flushes a page and closes a shard past the checkpoint,
    which the resumed run must cut off again)."""
    src = cifar_subset if source == "cifar" else imagenette_subset
    opts = ConvertOptions(workers=1, **{**OPTS, **extra})
    ref = convert(src, tmp_path / "ref" / "train", opts, progress=False)
    out = tmp_path / "run" / "train"
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        with pytest.raises(Interrupted):
            convert(src, out, opts, progress=False)
    assert len(staging_dirs(out)) == 1 and not out.exists()
    rerun = convert(src, out, ConvertOptions(**{**opts.__dict__, "workers": 2}), progress=False)
    assert 0 < rerun.resumed < (80 if source == "imagenette" else 200)
    assert_same_files(out, ref.out_dir)
    if ref.val is not None:
        assert_same_files(rerun.val.out_dir, ref.val.out_dir)


def interrupted_run(src: Path, out: Path, opts: ConvertOptions, monkeypatch,
                    stop: int = 130) -> None:
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        with pytest.raises(Interrupted):
            convert(src, out, opts, progress=False)


def test_other_options_discard_partial_work_and_say_why(cifar_subset, tmp_path, monkeypatch,
                                                        capsys):
    out = tmp_path / "store"
    interrupted_run(cifar_subset, out, ConvertOptions(workers=1, **OPTS), monkeypatch)
    new = ConvertOptions(workers=1, **{**OPTS, "write_mode": "jpg", "jpeg_quality": 80})
    rerun = convert(cifar_subset, out, new, progress=True)
    err = capsys.readouterr().err
    assert rerun.resumed == 0
    for text in ("discarded the partial work in", "other options or another source",
                 "options.jpeg_quality: 90 -> 80", "options.write_mode: 'raw' -> 'jpg'",
                 "starting over"):
        assert text in rerun.discarded and text in err
    assert "resumed" not in err
    fresh = convert(cifar_subset, tmp_path / "fresh", new, progress=False)
    assert_same_files(out, fresh.out_dir)


def test_changed_source_discards_partial_work(cifar_subset, tmp_path, monkeypatch, capsys):
    src = shutil.copytree(cifar_subset, tmp_path / "src")
    out = tmp_path / "store"
    opts = ConvertOptions(workers=1, **OPTS)
    interrupted_run(src, out, opts, monkeypatch)
    first = sorted((src / "apple").iterdir())[0]  # an image the killed run already stored
    other = sorted((src / "apple").iterdir())[1]
    first.write_bytes(other.read_bytes())  # same name, other content
    rc = main([str(src), str(out), "--workers", "1", "--no-progress", *CLI_OPTS])
    err = capsys.readouterr().err
    assert rc == 0
    assert "discarded the partial work" in err
    assert "source files (names, labels, sizes or modification times)" in err
    fresh = convert(src, tmp_path / "fresh", opts, progress=False)
    assert_same_files(out, fresh.out_dir)


def test_files_that_do_not_match_the_checkpoint_are_discarded(cifar_subset, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "store"
    opts = ConvertOptions(workers=1, **OPTS)
    interrupted_run(cifar_subset, out, opts, monkeypatch)
    (st,) = staging_dirs(out)
    beton = st / f"{cifar_subset.name}.beton"
    os.truncate(beton, 100)  # shorter than any checkpoint recorded
    rerun = convert(cifar_subset, out, opts, progress=False)
    assert rerun.resumed == 0
    assert "its files do not match its checkpoint" in rerun.discarded
    assert f"{beton.name}: 100 bytes, shorter than" in rerun.discarded
    fresh = convert(cifar_subset, tmp_path / "fresh", opts, progress=False)
    assert_same_files(out, fresh.out_dir)


def test_bad_file_failure_still_leaves_nothing(cifar_subset, tmp_path):
    """--on-error fail stops with no partial work kept (the fix changes the source anyway)."""
    src = shutil.copytree(cifar_subset, tmp_path / "src")
    good = sorted((src / "apple").iterdir())[0]
    (src / "apple" / "zz_truncated.png").write_bytes(good.read_bytes()[:40])
    out = tmp_path / "store"
    assert main([str(src), str(out), "--workers", "1", "--no-progress", *CLI_OPTS]) == 1
    assert staging_dirs(out) == [] and not out.exists()
