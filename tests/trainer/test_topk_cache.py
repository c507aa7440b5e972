"""The compact (top-k + tail summary) teacher cache: the tail-mass estimate
and its bounds against hand-computed cases, the documented KL decomposition,
round trip, the temperature applied at loss time for both formats, resumable
fill equal to an uninterrupted one, the too-big error, the automatic choice."""
from __future__ import annotations

import math
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from trainer.distill import logit_cache
from trainer.distill.kd import kd_loss
from trainer.distill.logit_cache import CacheError, CacheTooLargeError, LogitCache, fill_cache
from trainer.distill.targets import CachedTargets
from trainer.distill.teacher_cache import (fill_teacher_cache, open_teacher_cache, plan_fill, resolve_format,
                                           stores_features)
from trainer.distill.topk_cache import (TopKCache, fill_time_kl, fill_topk_cache, reconstruct_logits,
                                        reconstruction_kl, summarize_rows, tail_log_mass)

from cache_helpers import FakeTeacher, Interrupt, interrupted_at

N, K, C, B, D, TOPK = 40, 3, 12, 8, 5, 4

TEACHER = FakeTeacher(n=N, views=K, classes=C, batch=B, dim=D, scale=4.0)
key, true_logits, true_features = TEACHER.key, TEACHER.true_logits, TEACHER.true_features
batches, fbatches = TEACHER.batches, TEACHER.fbatches


def softmax(z, t=1.0):
    e = np.exp((z - z.max()) / t)
    return e / e.sum()


# ------------------------------------------------------------ the tail math
def test_tail_estimate_on_a_hand_computed_row():
    # logits of 5 classes, k = 2: the top two are classes 3 (5.0) and 0 (3.0);
    # the tail is {1.0, 0.0, -1.0}: m = 3, mean 0, max 1, F1 = log(e + 1 + 1/e)
    z = torch.tensor([[3.0, 1.0, -1.0, 5.0, 0.0]])
    values, classes, tail = summarize_rows(z, 2)
    assert classes.tolist() == [[3, 0]] and values.tolist() == [[5.0, 3.0]]
    f1 = math.log(math.e + 1 + 1 / math.e)
    torch.testing.assert_close(tail, torch.tensor([[0.0, f1, 1.0]]))
    # T = 1: exact (the stored log-sum-exp)
    est, lo, hi = tail_log_mass(tail, 3, 1.0)
    assert est.item() == pytest.approx(f1, abs=1e-6) and lo.item() == pytest.approx(hi.item(), abs=1e-6)
    # T = 2 (b = 1/2): log 3 + 0 + c / 4 with c = F1 - log 3; the truth is log(e^.5 + 1 + e^-.5)
    est, lo, hi = tail_log_mass(tail, 3, 2.0)
    want = math.log(3) + (f1 - math.log(3)) / 4
    truth = math.log(math.exp(0.5) + 1 + math.exp(-0.5))
    assert est.item() == pytest.approx(want, abs=1e-6)
    assert lo.item() == pytest.approx(math.log(3), abs=1e-6)  # the tangent at 0 binds
    assert hi.item() == pytest.approx((math.log(3) + f1) / 2, abs=1e-6)  # the chord
    assert lo.item() <= truth <= hi.item() and abs(est.item() - truth) < 0.005
    # T = 1/2 (b = 2): between the largest term alone (b M = 2) and F1 + (b - 1) M = F1 + 1
    est, lo, hi = tail_log_mass(tail, 3, 0.5)
    truth = math.log(math.exp(2) + 1 + math.exp(-2))
    assert (lo.item(), hi.item()) == (pytest.approx(2.0, abs=1e-6), pytest.approx(f1 + 1, abs=1e-6))
    assert est.item() == pytest.approx((2 + f1 + 1) / 2, abs=1e-6)
    assert lo.item() <= truth <= hi.item() and abs(est.item() - truth) < 0.07
    # the reconstructed distribution at T = 1: top two exact, the tail's exact mass split evenly
    p = torch.softmax(reconstruct_logits(values, classes, tail, 5, 1.0), 1)[0].numpy()
    dense = softmax(z[0].numpy())
    np.testing.assert_allclose(p[[3, 0]], dense[[3, 0]], rtol=1e-5)
    np.testing.assert_allclose(p[[1, 2, 4]], dense[[1, 2, 4]].sum() / 3, rtol=1e-5)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "flat", "skewed"])
def test_true_tail_mass_always_lies_within_the_bounds(kind):
    g = torch.Generator().manual_seed(0)
    z = {"gaussian": torch.randn(200, 100, generator=g) * 2,
         "heavy": torch.distributions.StudentT(2.0).sample((200, 100)) * 2,
         "flat": torch.rand(200, 100, generator=g) * 0.01,
         "skewed": torch.randn(200, 100, generator=g).exp() * 3}[kind]
    values, classes, tail = summarize_rows(z, 10)
    rest = z.scatter(1, classes, float("-inf"))
    for t in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 100.0):
        truth = torch.logsumexp(rest.double() / t, 1).float()
        est, lo, hi = tail_log_mass(tail, 90, t)
        tol = 1e-4 * (1 + truth.abs())
        assert (lo <= truth + tol).all() and (truth <= hi + tol).all(), (kind, t)
        assert ((est - truth).abs() <= (hi - lo) * (1 if t >= 1 else 0.5) + tol).all()


def test_a_gaussian_tail_is_estimated_nearly_exactly():
    """The quadratic is exact for an ideal Gaussian tail; a sampled one (its top
    cut off) comes within 2.5 % of the mass, far inside the convexity bounds."""
    z = torch.randn(50, 5000, generator=torch.Generator().manual_seed(1)) * 1.5
    values, classes, tail = summarize_rows(z, 8)
    rest = z.scatter(1, classes, float("-inf"))
    for t in (1.5, 2.0, 4.0, 8.0):
        truth = torch.logsumexp(rest / t, 1)
        est, lo, hi = tail_log_mass(tail, 4992, t)
        assert (est - truth).abs().max() < 0.025, t
        assert ((est - truth).abs() < 0.2 * (hi - lo)).all(), t


def test_kl_decomposition_documented_in_the_module():
    """KL(dense || compact) = log(1 - P + P e^d) - P d + P (log m - H(r))."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20, 30, generator=g) * 3
    values, classes, tail = summarize_rows(z, 5)
    for t in (1.0, 3.0):
        approx = reconstruct_logits(values, classes, tail, 30, t)
        p, q = torch.softmax(z.double() / t, 1), torch.softmax(approx.double() / t, 1)
        kl = (p * (p.log() - q.log())).sum(1)
        in_tail = torch.ones_like(z, dtype=torch.bool).scatter(1, classes, False)
        big_p = (p * in_tail).sum(1)
        r = torch.where(in_tail, p, 0) / big_p[:, None]
        h_r = -(r * r.clamp_min(1e-300).log()).sum(1)
        d = (q * in_tail).sum(1).log() - big_p.log() + (p * ~in_tail).sum(1).log() - (q * ~in_tail).sum(1).log()
        want = torch.log(1 - big_p + big_p * d.exp()) - big_p * d + big_p * (math.log(25) - h_r)
        torch.testing.assert_close(kl, want, atol=1e-6, rtol=1e-5)


def test_the_fill_time_kl_equals_the_direct_one_on_hard_rows():
    g = torch.Generator().manual_seed(3)
    z = torch.cat([torch.randn(30, 50, generator=g) * 3,
                   torch.zeros(2, 50),  # flat: every class tied
                   torch.full((2, 50), -5.0).index_fill_(1, torch.tensor([7]), 200.0),  # one-hot-like
                   torch.randn(30, 50, generator=g).exp() * 4])  # heavy upper tail
    values, classes, tail = summarize_rows(z, 6)
    kept = values.half().float()
    for t in (0.25, 1.0, 4.0, 20.0):
        direct = reconstruction_kl(z, reconstruct_logits(kept, classes, tail, 50, t), t)
        torch.testing.assert_close(fill_time_kl(z, values, kept, classes, tail, t), direct.clamp_min(0),
                                   atol=2e-5, rtol=1e-3)


# ------------------------------------------------------------ the cache
def test_round_trip_lookup_and_measured_errors(tmp_path):
    path = fill_topk_cache(tmp_path / "c.topk", key(), N, C, K, fbatches, topk=TOPK, feature_dim=D)
    cache = open_teacher_cache(path, key())
    assert isinstance(cache, TopKCache) and not (tmp_path / "c.topk.parts").exists()
    assert (cache.num_samples, cache.num_views, cache.num_classes, cache.feature_dim) == (N, K, C, D)
    assert cache.rows.shape == (K, N) and cache.rows.itemsize == TOPK * 4 + 12
    idx, vid = torch.tensor([0, 5, 39, 5, 17]), torch.tensor([0, 2, 1, 1, 2])
    exact = np.stack([true_logits(v)[i] for i, v in zip(idx.tolist(), vid.tolist())])
    values, classes, _ = cache.rows_at(idx, vid)
    top = np.argsort(-exact, axis=1)[:, :TOPK]
    np.testing.assert_array_equal(classes.numpy(), top)
    err = np.abs(values.numpy() - np.take_along_axis(exact, top, 1)).max()
    assert err <= cache.fp16_max_abs_error and cache.fp16_max_abs_error <= np.abs(exact).max() * 2 ** -11
    feats = cache.lookup_features(idx, vid)
    want = np.stack([true_features(v)[i] for i, v in zip(idx.tolist(), vid.tolist())])
    assert np.abs(feats.numpy() - want).max() <= cache.features_fp16_max_abs_error + 1e-9
    # the recorded reconstruction error is the mean KL over all rows at T = 1 and 4
    z_all = torch.from_numpy(np.stack([true_logits(v) for v in range(K)]).reshape(-1, C))
    v_all, i_all = torch.arange(K).repeat_interleave(N), torch.arange(N).repeat(K)
    for t in (1.0, 4.0):
        p = torch.softmax(z_all.double() / t, 1)
        q = torch.softmax(cache.lookup(i_all, v_all, t).double() / t, 1)
        kl = (p * (p.log() - q.log())).sum(1)
        assert cache.meta["reconstruction_kl"][f"T{t:g}"]["mean"] == pytest.approx(kl.mean().item(), rel=1e-3)
        assert cache.meta["reconstruction_kl"][f"T{t:g}"]["max"] == pytest.approx(kl.max().item(), rel=1e-3)


def _batch(idx, vid):
    return SimpleNamespace(indices=torch.tensor(idx), view_ids=torch.tensor(vid), mix=None)


def test_temperature_is_applied_at_loss_time_for_both_formats(tmp_path):
    dense = LogitCache.open(fill_cache(tmp_path / "d.h5", key(), N, C, K, batches, dtype="float32"))
    topk = open_teacher_cache(fill_topk_cache(tmp_path / "c.topk", key(), N, C, K, batches, topk=TOPK,
                                              dtype="float32"))
    idx, vid = [3, 7, 7, 30], [0, 0, 2, 1]
    exact = np.stack([true_logits(v)[i] for i, v in zip(idx, vid)])
    student = torch.randn(4, C, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 4.0):
        p_dense, _ = CachedTargets(dense, t)(_batch(idx, vid))
        p_topk, _ = CachedTargets(topk, t)(_batch(idx, vid))
        want = np.stack([softmax(row, t) for row in exact])
        np.testing.assert_allclose(p_dense.numpy(), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p_topk.sum(1), torch.ones(4))
        for row, p in zip(exact, p_topk.numpy()):
            top = np.argsort(-row)[:TOPK]
            # the top-k keep their ratios at T: p_i / p_j = exp((z_i - z_j) / T)
            np.testing.assert_allclose(p[top] / p[top[0]], np.exp((row[top] - row[top[0]]) / t), rtol=1e-5)
            tail = np.setdiff1d(np.arange(C), top)
            np.testing.assert_allclose(p[tail], p[tail].mean(), rtol=1e-6)  # spread evenly
            if t == 1.0:  # the tail mass is stored exactly for T = 1
                np.testing.assert_allclose(p[top], softmax(row)[top], rtol=1e-5)
        kd_d, kd_t = kd_loss(student, p_dense, t).item(), kd_loss(student, p_topk, t).item()
        assert kd_t == pytest.approx(kd_d, rel=0.2) and kd_t != kd_d


@pytest.mark.parametrize("stop_view,stop_batch", [(0, 0), (0, 3), (1, 2), (2, 4)])
def test_resumed_fill_equals_an_uninterrupted_one(tmp_path, stop_view, stop_batch):
    path = tmp_path / "c.topk"

    with pytest.raises(Interrupt):
        fill_topk_cache(path, key(), N, C, K, interrupted_at(fbatches, stop_view, stop_batch),
                        topk=TOPK, feature_dim=D)
    assert not path.exists()
    calls = []
    fill_topk_cache(path, key(), N, C, K, lambda v: fbatches(v, calls), topk=TOPK, feature_dim=D)
    per_view = -(-N // B)
    assert len(calls) == K * per_view - (stop_view * per_view + stop_batch)  # finished parts reused
    ref = fill_topk_cache(tmp_path / "ref.topk", key(), N, C, K, fbatches, topk=TOPK, feature_dim=D)
    for name in ("rows.npy", "features.npy", "meta.json"):
        assert (path / name).read_bytes() == (ref / name).read_bytes(), name


def test_parts_of_another_format_or_k_are_discarded(tmp_path):
    path = tmp_path / "c.topk"

    with pytest.raises(Interrupt):
        fill_topk_cache(path, key(), N, C, K, interrupted_at(batches, 0, 2), topk=TOPK + 1)
    calls = []
    fill_topk_cache(path, key(), N, C, K, lambda v: batches(v, calls), topk=TOPK)
    assert len(calls) == K * -(-N // B)
    assert open_teacher_cache(path).topk == TOPK


def test_stale_missing_and_featureless_caches_are_clear_errors(tmp_path):
    path = fill_teacher_cache("topk", tmp_path / "c.topk", key(), N, C, K, batches, topk=TOPK)
    with pytest.raises(CacheError, match="teacher_hash"):
        open_teacher_cache(path, key(teacher_hash="sha256:other"))
    with pytest.raises(CacheError, match="distill.cache_features=always") as e:
        open_teacher_cache(path).lookup_features(torch.tensor([0]), torch.tensor([0]))
    assert str(path) in str(e.value)
    with pytest.raises(CacheError, match="not found"):
        open_teacher_cache(tmp_path / "nope.topk")
    with pytest.raises(CacheError, match="cache_format=dense"):
        fill_topk_cache(tmp_path / "x.topk", key(), N, C, K, batches, topk=C)


# ------------------------------------------------------------ too big, and the choice
def _tiny_memory(monkeypatch, cpu_bytes=10**12, gpu_bytes=10**12):
    def available(device):
        gpu = torch.device(device).type == "cuda"
        return (gpu_bytes, 2 * gpu_bytes, f"GPU memory on {device}") if gpu else (cpu_bytes, 2 * cpu_bytes, "RAM")
    monkeypatch.setattr(logit_cache, "available_memory", available)


def test_a_dense_cache_too_big_for_ram_is_refused_before_loading(tmp_path, monkeypatch):
    path = fill_cache(tmp_path / "c.h5", key(), N, C, K, batches)
    _tiny_memory(monkeypatch, cpu_bytes=1000)

    def no_read(*a, **kw):
        raise AssertionError("the dense cache was read before the size check")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_read)
    with pytest.raises(CacheTooLargeError) as e:
        open_teacher_cache(path, key())
    msg = str(e.value)
    size = N * K * C * 2 / 1e9
    assert str(path) in msg and f"dense cache is {size:.2f} GB" in msg and "RAM available" in msg
    assert "distill.cache_format=topk" in msg and "python -m trainer cache" in msg
    calls = []  # filling refuses too, before any teacher batch runs
    with pytest.raises(CacheTooLargeError, match="be assembled"):
        fill_cache(tmp_path / "d.h5", key(), N, C, K, lambda v: batches(v, calls))
    assert calls == []
    with pytest.raises(CacheTooLargeError):
        plan_fill("dense", tmp_path / "d.h5", N, K, C)


def test_a_dense_cache_too_big_for_the_gpu_names_it(tmp_path, monkeypatch):
    _tiny_memory(monkeypatch, gpu_bytes=1000)
    logit_cache.ensure_dense_fits(tmp_path / "c.h5", (N, K, C), 2, 0, "cpu")  # the host is fine
    with pytest.raises(CacheTooLargeError, match="GPU memory on cuda:0"):
        logit_cache.ensure_dense_fits(tmp_path / "c.h5", (N, K, C), 2, 0, "cuda:0")


def test_imagenet_shape_message_names_the_size_and_the_fix(monkeypatch):
    _tiny_memory(monkeypatch, cpu_bytes=24 * 2**30)
    with pytest.raises(CacheTooLargeError) as e:
        logit_cache.ensure_dense_fits("runs/x/logits.h5", (1_281_167, 8, 1000), 2, 0, "cpu")
    msg = str(e.value)
    assert msg.startswith("runs/x/logits.h5: dense cache is 20.5 GB") and "25.8 GB of RAM" in msg
    assert "distill.cache_format=topk" in msg and "1.43 GB" in msg


def test_the_automatic_choice():
    assert resolve_format("auto", 50_000, 4, 100) == "dense"  # CIFAR-100: 40 MB
    assert resolve_format("auto", 1_281_167, 8, 1000) == "topk"  # ImageNet-1k: 20.5 GB
    assert resolve_format("auto", 1_281_167, 8, 1000, dense_max_gb=32) == "dense"
    assert resolve_format("auto", 10**8, 8, 10, topk=32) == "dense"  # k covers every class
    assert resolve_format("dense", 1_281_167, 8, 1000) == "dense"
    assert resolve_format("topk", 100, 1, 100) == "topk"
    with pytest.raises(ValueError, match="cache_format"):
        resolve_format("sparse", 1, 1, 1)
    assert stores_features("dense", "auto", False) and not stores_features("topk", "auto", False)
    assert stores_features("topk", "auto", True) and not stores_features("dense", "never", True)
    assert stores_features("topk", "always", False)


def test_recipe_keys_paths_and_validation():
    from trainer.data import teacher_cache_format, teacher_cache_path
    from trainer.recipe import Config, DistillSection

    cfg = Config()
    cifar = SimpleNamespace(num_samples=50_000, num_classes=100)
    imagenet = SimpleNamespace(num_samples=1_281_167, num_classes=1000)
    assert teacher_cache_format(cfg, cifar) == "dense" and teacher_cache_path(cfg, cifar) == cfg.cache_path
    assert teacher_cache_format(cfg, imagenet) == "topk"
    assert teacher_cache_path(cfg, imagenet).name == "logits_K4_r32_top32.topk"
    cfg.distill = DistillSection(cache_format="topk", cache_topk=16)
    assert teacher_cache_path(cfg, cifar).name == "logits_K4_r32_top16.topk"
    for bad in (dict(cache_format="sparse"), dict(cache_topk=0), dict(cache_features="maybe"),
                dict(cache_dense_max_gb=-1)):
        with pytest.raises(ValueError, match="distill.cache_"):
            DistillSection(**bad)


def test_the_fill_checks_the_disk_first(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=0, free=10**6))
    with pytest.raises(CacheError) as e:
        plan_fill("topk", tmp_path / "runs" / "c.topk", 1_281_167, 8, 1000, feature_dim=2048)
    msg = str(e.value)
    assert "1.43 GB" in msg and "teacher features 42.0 GB" in msg and "0.00 GB free" in msg
    assert "distill.cache_features=never" in msg
    monkeypatch.undo()
    plan = plan_fill("topk", tmp_path / "c.topk", N, K, C, topk=TOPK)
    assert plan["logits_bytes"] == N * K * (TOPK * 4 + 12) and plan["features_bytes"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (lookups landing on the GPU)")
def test_lookup_lands_on_the_gpu(tmp_path):
    cache = open_teacher_cache(fill_topk_cache(tmp_path / "c.topk", key(), N, C, K, fbatches, topk=TOPK,
                                               feature_dim=D), device="cuda")
    idx, vid = torch.tensor([1, 2], device="cuda"), torch.tensor([0, 1], device="cuda")
    cpu = open_teacher_cache(cache.path)
    torch.testing.assert_close(cache.lookup(idx, vid, 2.0).cpu(), cpu.lookup(idx.cpu(), vid.cpu(), 2.0))
    assert cache.lookup_features(idx, vid).device.type == "cuda"


def test_topk_cache_through_the_cache_job_and_the_trainer(teacher_run, tmp_path):
    """``python -m trainer cache`` with ``distill.cache_format=topk`` and a
    cached-targets student: at T = 1 the top-k probabilities are the online
    teacher's, the tail classes share its tail mass evenly, and the cached
    embeddings (stored because RKD is on) are the online ones."""
    from dataclasses import replace

    from trainer import jobs
    from trainer.engine import Trainer

    cfg, *_ = teacher_run
    tcfg = replace(cfg, run=replace(cfg.run, name="topk", out_dir=str(tmp_path)),
                   distill=replace(cfg.distill, cache_format="topk", cache_topk=TOPK, cache_dtype="float32",
                                   teacher_checkpoint=str(cfg.teacher_checkpoint)),
                   loss=replace(cfg.loss, kd=1.0, rkd=1.0, temperature=1.0))
    out = jobs.run_cache(tcfg)
    assert out["format"] == "topk" and out["path"].endswith(f"_top{TOPK}.topk") and out["feature_dim"] > 0
    assert out["topk"] == TOPK and 0 <= out["reconstruction_kl"]["T1"]["mean"] <= out["reconstruction_kl"]["T1"]["max"]
    assert not tcfg.cache_path.exists()  # no dense file was written
    cached = Trainer(tcfg, "student")
    online = Trainer(replace(tcfg, distill=replace(tcfg.distill, targets="online")), "student")
    try:
        assert isinstance(cached.targets.cache, TopKCache)
        online.train_loader.set_epoch(1)
        batch = next(iter(online.train_loader))
        p_online, e_online = online.targets(batch)
        p_cached, e_cached = cached.targets(batch)
        top = p_online.topk(TOPK, 1).indices
        torch.testing.assert_close(p_cached.gather(1, top), p_online.gather(1, top), atol=1e-5, rtol=1e-4)
        tail = torch.ones_like(p_online, dtype=torch.bool).scatter(1, top, False)
        m = p_online.shape[1] - TOPK
        even = (p_online * tail).sum(1, keepdim=True) / m
        torch.testing.assert_close(torch.where(tail, p_cached, even), even.expand_as(p_cached),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(e_cached, e_online, atol=1e-4, rtol=1e-4)
    finally:
        cached.close()
        online.close()


def test_the_demo_finds_the_cache_of_the_resolved_format(teacher_run, tmp_path):
    from dataclasses import replace

    from benchmarks.demo import cache_is_current
    from trainer_helpers import copy_run_with_cache

    cfg, *_ = teacher_run
    copy = copy_run_with_cache(cfg, tmp_path)
    assert cache_is_current(copy)  # auto resolves to dense on this small store
    assert not cache_is_current(replace(copy, distill=replace(copy.distill, cache_format="topk")))
    assert copy.cache_path.is_file()  # a missing top-k cache removes nothing
