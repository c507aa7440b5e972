"""Teacher-logit cache: round trip, fingerprint mismatch, resume after kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from trainer.distill.logit_cache import CacheError, CacheKey, LogitCache, fill_cache

N, K, C, B = 50, 3, 7, 8


def key(**kw):
    base = dict(teacher_hash="sha256:t", data_fingerprint="sha256:d",
                views={"seed": 0, "num_views": K}, teacher_resolution=32)
    base.update(kw)
    return CacheKey(**base)


def true_logits(v):
    g = np.random.default_rng(v)
    return (g.standard_normal((N, C)) * 5).astype(np.float32)


def batches(v, calls=None):
    order = np.random.default_rng(100 + v).permutation(N)  # any deterministic order works
    table = true_logits(v)
    for s in range(0, N, B):
        idx = order[s:s + B]

        def compute(idx=idx):
            if calls is not None:
                calls.append((v, s))
            return table[idx]
        yield idx, compute


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

    class Interrupt(Exception):
        pass

    def interrupted(v):
        for i, item in enumerate(batches(v)):
            if v == 1 and i == 3:
                raise Interrupt
            yield item

    with pytest.raises(Interrupt):
        fill_cache(path, key(), N, C, K, interrupted)
    assert not path.exists()  # nothing that looks complete
    calls = []
    fill_cache(path, key(), N, C, K, lambda v: batches(v, calls))
    batches_per_view = -(-N // B)
    assert len(calls) == K * batches_per_view - (batches_per_view + 3)  # view 0 + 3 batches reused
    ref = fill_cache(tmp_path / "ref.h5", key(), N, C, K, batches)
    assert torch.equal(LogitCache.open(path).logits, LogitCache.open(ref).logits)


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
    sys.path.insert(0, {tests!r})
    from test_logit_cache import key, batches, N, C, K
    from trainer.distill.logit_cache import fill_cache
    slow = sys.argv[2] == "slow"
    def vb(v):
        for idx, compute in batches(v):
            def c(compute=compute):
                if slow:
                    time.sleep(0.05)
                return compute()
            yield idx, c
    fill_cache(sys.argv[1], key(), N, C, K, vb)
""")


def test_kill_9_then_rerun_gives_identical_contents(tmp_path):
    script = tmp_path / "fill.py"
    script.write_text(FILL_SCRIPT.format(tests=os.path.dirname(__file__)))
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
    assert torch.equal(LogitCache.open(path, key()).logits, LogitCache.open(ref, key()).logits)
