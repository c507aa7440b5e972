"""The ImageNet-scale teacher-cache benchmark in a tiny smoke mode: its
figures exist and agree with independent computations (no speed assertions)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.cache_scale import SyntheticTeacher, main
from trainer.distill.cache_sizes import topk_nbytes


def test_the_synthetic_teacher_regenerates_any_chunk():
    t = SyntheticTeacher(classes=100, chunk=64)
    a, la = t.logits(200, 1, 2)
    b, lb = t.logits(200, 1, 2)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.shape == (64, 100)
    assert t.logits(200, 1, 3)[0].shape == (8, 100)  # the last, shorter chunk
    assert torch.equal(t.logits(200, 0, 2)[1], la) and not torch.equal(t.logits(200, 0, 2)[0], a)  # views: same labels


def test_smoke_run(tmp_path):
    out = tmp_path / "r.json"
    n, k, c, topk = 2000, 2, 100, 8
    assert main(["--samples", str(n), "--views", str(k), "--classes", str(c), "--topk", str(topk),
                 "--chunk", "512", "--sample-rows", str(n * k), "--lookup-batches", "5", "--batch", "64",
                 "--dir", str(tmp_path / "d"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert not list((tmp_path / "d").iterdir())  # the cache is removed unless --keep
    rows_bytes = topk_nbytes(n, k, topk)
    assert rows_bytes < r["size"]["on_disk_bytes"] < rows_bytes + 4096  # rows.npy + header + meta.json
    assert r["size"]["dense_float16_bytes"] == n * k * c * 2
    e = r["errors"]
    assert e["rows"] == n * k  # every row sampled: the benchmark's lookups vs the fill's own record
    for t in ("T1", "T4"):  # the fill's analytic record vs the benchmark's lookups
        assert e[t]["kl"]["mean"] == pytest.approx(r["fill_record"][t]["mean"], rel=1e-3)
    for t in ("T0.5", "T1", "T2", "T4"):
        assert 0 <= e[t]["kl"]["mean"] <= e[t]["kl"]["max"]
        assert np.isfinite(e[t]["kd_dense"]) and e[t]["kd_mean_abs_diff"] >= 0
        assert e[t]["gradient_relative_error"] >= 0
    assert e["top1_agreement"] > 0.999  # the top-1 is stored; only float16 ties can swap it
    assert all(m["within_bounds"] == 1.0 for m in e["tail_log_mass"].values())
    assert e["tail_log_mass"]["T1"]["max_abs_error"] < 1e-4  # T = 1 is stored exactly
    assert set(e["other_k"]) == {"8", "16", "64"}
    assert e["other_k"]["8"]["kl_T4_mean"] == pytest.approx(e["T4"]["kl"]["mean"], rel=1e-3)  # k = 8 in memory
    # more k, less error
    assert e["other_k"]["64"]["kl_T4_mean"] < e["other_k"]["16"]["kl_T4_mean"] < e["T4"]["kl"]["mean"]
    lk = r["lookups"]
    for phase in ("cold", "warm", "warm_gather_only"):
        assert lk[phase]["batches_per_sec"] > 0
    assert r["fill"]["peak_rss_mb"] > 0 and 0 < lk["peak_anon_rss_mb"] <= lk["peak_rss_mb"]
