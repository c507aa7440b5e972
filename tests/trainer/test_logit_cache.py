"""Teacher-target cache: round trip (logits and features), fingerprint mismatch,
old-format caches, resume after kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
import torch

from trainer.distill.logit_cache import CacheError, LogitCache, fill_cache

from cache_helpers import FakeTeacher, Interrupt, interrupted_at

N, K, C, B, D = 50, 3, 7, 8, 5

TEACHER = FakeTeacher(n=N, views=K, classes=C, batch=B, dim=D, scale=5.0)
key, true_logits, true_features = TEACHER.key, TEACHER.true_logits, TEACHER.true_features
batches, fbatches = TEACHER.batches, TEACHER.fbatches


def exact(fn):
    return torch.from_numpy(np.stack([fn(v) for v in range(K)], axis=1))


def test_round_trip_and_lookup(tmp_path):
    path = fill_cache(tmp_path / "c.h5", key(), N, C, K, batches, dtype="float32")
    cache = LogitCache.open(path, key())
    assert cache.logits.shape == (N, K, C)
    idx = torch.tensor([0, 5, 49, 5])
    vid = torch.tensor([0, 2, 1, 1])
    got = cache.lookup(idx, vid)
    want = torch.stack([torch.from_numpy(true_logits(v)[i]) for i, v in zip(idx.tolist(), vid.tolist())])
    assert torch.equal(got, want)
    assert cache.fp16_max_abs_error == 0.0
    assert not (tmp_path / "c.h5.parts").exists()


def test_float16_error_is_measured_and_bounded(tmp_path):
    path = fill_cache(tmp_path / "c.h5", key(), N, C, K, batches, dtype="float16")
    cache = LogitCache.open(path, key())
    exact = torch.from_numpy(np.stack([true_logits(v) for v in range(K)], axis=1))
    err = (cache.logits.float() - exact).abs().max().item()
    assert err == pytest.approx(cache.fp16_max_abs_error)
    # float16 has 11 significant bits: relative error <= 2^-11 of the magnitude
    assert 0 < err <= exact.abs().max().item() * 2 ** -11


def test_features_round_trip_and_lookup(tmp_path):
    path = fill_cache(tmp_path / "c.h5", key(), N, C, K, fbatches, dtype="float32", feature_dim=D)
    cache = LogitCache.open(path, key())
    assert cache.feature_dim == D and cache.features.shape == (N, K, D)
    assert cache.features_fp16_max_abs_error == 0.0
    assert cache.require_features() is cache
    idx = torch.tensor([0, 5, 49, 5])
    vid = torch.tensor([0, 2, 1, 1])
    got = cache.lookup_features(idx, vid)
    assert got.dtype == torch.float32 and got.shape == (4, D)
    want = torch.stack([torch.from_numpy(true_features(v)[i]) for i, v in zip(idx.tolist(), vid.tolist())])
    assert torch.equal(got, want)
    assert torch.equal(cache.logits, exact(true_logits))  # logits unaffected by storing features
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 3 and f.attrs["feature_dim"] == D
        assert f["features"].shape == (N, K, D) and f["features"].dtype == np.float32


def test_features_float16_error_is_measured_and_bounded(tmp_path):
    path = fill_cache(tmp_path / "c.h5", key(), N, C, K, fbatches, feature_dim=D)
    cache = LogitCache.open(path, key())
    assert cache.features.dtype == torch.float16
    want = exact(true_features)
    err = (cache.features.float() - want).abs().max().item()
    assert err == pytest.approx(cache.features_fp16_max_abs_error)
    assert 0 < err <= want.abs().max().item() * 2 ** -11
    idx, vid = torch.arange(N), torch.arange(N) % K
    rows = cache.lookup_features(idx, vid)
    assert (rows - want[idx, vid]).abs().max().item() <= cache.features_fp16_max_abs_error
    logit_err = (cache.logits.float() - exact(true_logits)).abs().max().item()
    assert logit_err == pytest.approx(cache.fp16_max_abs_error)


def test_cache_without_features(tmp_path):
    path = fill_cache(tmp_path / "c.h5", key(), N, C, K, batches)
    cache = LogitCache.open(path, key())
    assert cache.features is None and cache.feature_dim == 0
    with h5py.File(path, "r") as f:
        assert "features" not in f and f.attrs["feature_dim"] == 0
    with pytest.raises(CacheError, match="re-run 'python -m trainer cache --config"):
        cache.lookup_features(torch.tensor([0]), torch.tensor([0]))


def test_old_format_cache_opens_without_features(tmp_path):
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as h:  # format 1: logits only
        h.create_dataset("logits", data=exact(true_logits).numpy().astype(np.float16))
        h.attrs["format_version"] = 1
        h.attrs["key"] = key().to_json()
        h.attrs["fp16_max_abs_error"] = 0.001
        h.attrs["dtype"] = "float16"
    cache = LogitCache.open(path, key())
    assert cache.logits.shape == (N, K, C) and cache.fp16_max_abs_error == 0.001
    assert cache.features is None and cache.feature_dim == 0
    with pytest.raises(CacheError) as e:
        cache.require_features()
    msg = str(e.value)
    assert str(path) in msg and "no teacher features" in msg
    assert "delete" in msg and "python -m trainer cache --config" in msg


def test_feature_shape_and_return_type_errors(tmp_path):
    with pytest.raises(CacheError, match="feature_dim"):
        fill_cache(tmp_path / "a.h5", key(), N, C, K, fbatches, feature_dim=D + 1)
    with pytest.raises(CacheError, match=r"must return \(logits"):
        fill_cache(tmp_path / "b.h5", key(), N, C, K, batches, feature_dim=D)
    with pytest.raises(CacheError, match="pass feature_dim"):
        fill_cache(tmp_path / "c.h5", key(), N, C, K, fbatches)


def test_parts_of_another_feature_dim_are_discarded(tmp_path):
    path = tmp_path / "c.h5"

    with pytest.raises(Interrupt):
        fill_cache(path, key(), N, C, K, interrupted_at(batches, 0, 2))  # logits-only parts on disk
    calls = []
    fill_cache(path, key(), N, C, K, lambda v: fbatches(v, calls), dtype="float32", feature_dim=D)
    assert len(calls) == K * -(-N // B)  # nothing reused: those parts had no features
    assert torch.equal(LogitCache.open(path).features, exact(true_features))


@pytest.mark.parametrize("field,value", [("teacher_hash", "sha256:other"),
                                         ("data_fingerprint", "sha256:x"),
                                         ("views", {"seed": 1, "num_views": K}),
                                         ("teacher_resolution", 64)])
def test_mismatch_is_a_clear_error(tmp_path, field, value):
    path = fill_cache(tmp_path / "c.h5", key(), N, C, K, batches)
    with pytest.raises(CacheError, match=field):
        LogitCache.open(path, key(**{field: value}))


def test_missing_cache_and_wrong_class_count(tmp_path):
    with pytest.raises(CacheError, match="not found"):
        LogitCache.open(tmp_path / "nope.h5", key())
    with pytest.raises(CacheError, match="class count"):
        fill_cache(tmp_path / "c.h5", key(), N, C + 1, K, batches)


def test_resume_skips_finished_parts(tmp_path):
    path = tmp_path / "c.h5"

    with pytest.raises(Interrupt):
        fill_cache(path, key(), N, C, K, interrupted_at(fbatches, 1, 3), feature_dim=D)
    assert not path.exists()  # nothing that looks complete
    calls = []
    fill_cache(path, key(), N, C, K, lambda v: fbatches(v, calls), feature_dim=D)
    batches_per_view = -(-N // B)
    assert len(calls) == K * batches_per_view - (batches_per_view + 3)  # view 0 + 3 batches reused
    ref = fill_cache(tmp_path / "ref.h5", key(), N, C, K, fbatches, feature_dim=D)
    assert torch.equal(LogitCache.open(path).logits, LogitCache.open(ref).logits)
    assert torch.equal(LogitCache.open(path).features, LogitCache.open(ref).features)
    assert path.read_bytes() == ref.read_bytes()


def test_stale_parts_of_another_key_are_discarded(tmp_path):
    path = tmp_path / "c.h5"
    parts = tmp_path / "c.h5.parts"
    parts.mkdir()
    (parts / "key.json").write_text(key(teacher_hash="sha256:old").to_json())
    np.savez(parts / "v0000-b0000000.npz", indices=np.arange(B), logits=np.zeros((B, C), np.float32))
    fill_cache(path, key(), N, C, K, batches, dtype="float32")
    assert torch.equal(LogitCache.open(path).logits[:, 0], torch.from_numpy(true_logits(0)))


FILL_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path[:0] = [{tests!r}, {root!r}]
    from test_logit_cache import key, batches, N, C, K, D
    from trainer.distill.logit_cache import fill_cache
    slow = sys.argv[2] == "slow"
    def vb(v):
        for idx, compute in batches(v, features=True):
            def c(compute=compute):
                if slow:
                    time.sleep(0.05)
                return compute()
            yield idx, c
    fill_cache(sys.argv[1], key(), N, C, K, vb, feature_dim=D)
""")


def test_kill_9_then_rerun_gives_identical_contents(tmp_path):
    script = tmp_path / "fill.py"
    script.write_text(FILL_SCRIPT.format(tests=os.path.dirname(__file__), root=os.path.dirname(os.path.dirname(__file__))))
    path = tmp_path / "c.h5"
    proc = subprocess.Popen([sys.executable, str(script), str(path), "slow"])
    parts = tmp_path / "c.h5.parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("*.npz"))) < 4:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(parts.glob("*.npz"))) >= 4, "the fill never got going"
    assert not path.exists()
    subprocess.run([sys.executable, str(script), str(path), "fast"], check=True)
    ref = tmp_path / "ref.h5"
    subprocess.run([sys.executable, str(script), str(ref), "fast"], check=True)
    a, b = LogitCache.open(path, key()), LogitCache.open(ref, key())
    assert torch.equal(a.logits, b.logits)
    assert a.feature_dim == D and torch.equal(a.features, b.features)
    assert path.read_bytes() == ref.read_bytes()


# ------------------------------------------------ sharded fill (torchrun ranks)
def rank_batches(v, rank, world, calls=None):
    """Rank ``rank``'s DistributedSampler shard of view ``v`` (no shuffle,
    padded by repeating the first samples), in batches of B."""
    order = np.resize(np.arange(N), -(-N // world) * world)[rank::world]
    table, ftable = true_logits(v), true_features(v)
    for s in range(0, len(order), B):
        idx = order[s:s + B]

        def compute(idx=idx, s=s):
            if calls is not None:
                calls.append((rank, v, s))
            return table[idx], ftable[idx]
        yield idx, compute


def sharded_fill(path, world, make_batches=rank_batches):
    """``fill_cache`` as ``world`` torchrun ranks run it: one thread per rank,
    meeting at a barrier; returns each rank's exception (or None)."""
    barrier = threading.Barrier(world, timeout=60)
    errors = [None] * world

    def run(rank):
        try:
            fill_cache(path, key(), N, C, K, lambda v: make_batches(v, rank, world), feature_dim=D,
                       rank=rank, world_size=world, barrier=barrier.wait)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors[rank] = e
            barrier.abort()  # the others stop waiting, as torchrun stops them

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_sharded_fill_equals_one_process(tmp_path):
    ref = fill_cache(tmp_path / "ref.h5", key(), N, C, K, fbatches, feature_dim=D)
    path = tmp_path / "c.h5"
    assert sharded_fill(path, 3) == [None] * 3  # 50 samples over 3 ranks: one padded repeat
    assert path.read_bytes() == ref.read_bytes()
    assert not (tmp_path / "c.h5.parts").exists()


def test_sharded_fill_resumes_its_ranks_parts(tmp_path):
    path, parts = tmp_path / "c.h5", tmp_path / "c.h5.parts"

    def interrupted(v, rank, world):
        for i, item in enumerate(rank_batches(v, rank, world)):
            if rank == 1 and v == 1 and i == 1:
                raise Interrupt
            yield item

    errors = sharded_fill(path, 2, interrupted)
    assert isinstance(errors[1], Interrupt) and not path.exists()
    names = sorted(p.name for p in parts.glob("*.npz"))
    assert any("-r0000-" in n for n in names) and any("-r0001-" in n for n in names)
    calls = []
    assert sharded_fill(path, 2, lambda v, r, w: rank_batches(v, r, w, calls)) == [None, None]
    done_by_1 = -(-25 // B) + 1  # rank 1 had finished view 0 and one batch of view 1
    per_rank = K * -(-25 // B)
    assert len([c for c in calls if c[0] == 1]) == per_rank - done_by_1
    assert len([c for c in calls if c[0] == 0]) <= per_rank  # rank 0 may have run ahead
    ref = fill_cache(tmp_path / "ref.h5", key(), N, C, K, fbatches, feature_dim=D)
    assert path.read_bytes() == ref.read_bytes()


def test_parts_of_another_process_count_are_discarded(tmp_path):
    path = tmp_path / "c.h5"

    def interrupted(v, rank, world):
        if v == 2:
            raise RuntimeError("killed")
        yield from rank_batches(v, rank, world)

    sharded_fill(path, 2, interrupted)
    calls = []
    fill_cache(path, key(), N, C, K, lambda v: fbatches(v, calls), feature_dim=D)  # one process
    assert len(calls) == K * -(-N // B)  # started over
    ref = fill_cache(tmp_path / "ref.h5", key(), N, C, K, fbatches, feature_dim=D)
    assert path.read_bytes() == ref.read_bytes()
