"""Spatial CutMix targets from cached teacher maps: the composition against
hand-computed values and the pooled box mask, no change without CutMix,
closer to the online teacher than mixing cached probabilities or logits on
real batches, the cache with maps (round trip, fp16 error, resumable and
sharded fill), the ``auto`` choices, the model API and the clear errors."""
from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.batch import MixParams
from pipelines.mixing import MixConfig, draw_params
from trainer.distill.logit_cache import CacheError, CacheKey, LogitCache, fill_cache
from trainer.distill.spatial import SpatialHead, cell_fractions, compose_cutmix, mix_fractions
from trainer.distill.targets import CachedTargets
from trainer.distill.teacher_cache import plan_fill, stores_spatial
from trainer.models import create_model
from trainer.models.base import DistillModel, SpatialFeaturesUnavailable


class MapTeacher(DistillModel):
    """A teacher whose feature map is its input: ``head`` = a linear layer of
    known weights, so every target can be computed by hand."""

    def __init__(self, weight, bias=None):
        super().__init__()
        weight = torch.tensor(weight, dtype=torch.float32)
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(torch.tensor(bias) if bias is not None else torch.zeros(weight.shape[0]))
        self.feature_dim = weight.shape[1]

    def features_map(self, x):
        return x

    def head(self, emb):
        return self.fc(emb)


def memory_cache(logits, features, spatial) -> LogitCache:
    """One view per sample, held in memory (what LogitCache.open returns)."""
    return LogitCache(Path("<memory>"), None, logits[:, None], 0.0,
                      None if features is None else features[:, None], 0.0, spatial[:, None], 0.0)


def rows(n, mix=None):
    return SimpleNamespace(indices=torch.arange(n), view_ids=torch.zeros(n, dtype=torch.long), mix=mix)


def softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------- the composition
@pytest.mark.parametrize("side", [16, 12, 10])
def test_cell_fractions_are_the_box_area_in_each_cell(side):
    """Oracle: the student-grid box mask drawn by the mixer, upsampled by the
    grid so each cell is whole pixels, area-pooled per cell."""
    params = draw_params(MixConfig(p_cutmix=1.0), seed=3, step=7, batch_size=32, height=side, width=side)
    fine = params.mask.float().repeat_interleave(4, 2).repeat_interleave(4, 3)  # side*4 divides by 4
    torch.testing.assert_close(cell_fractions(params.boxes, 4), F.adaptive_avg_pool2d(fine, 4))
    if side % 4 == 0:  # the student grid divides by the cell grid: the pooled mask itself
        torch.testing.assert_close(cell_fractions(params.boxes, 4), F.adaptive_avg_pool2d(params.mask.float(), 4))
    # what the targets use (the pooled mask where the grid divides, else the box formula)
    torch.testing.assert_close(mix_fractions(params, 4), F.adaptive_avg_pool2d(fine, 4))
    no_mask = MixParams("cutmix", params.perm, params.lam, params.boxes)
    torch.testing.assert_close(mix_fractions(no_mask, 4), F.adaptive_avg_pool2d(fine, 4))


def test_composed_targets_equal_a_hand_computation():
    # two samples, two channels, 2x2 cells; channel 1 = -channel 0
    c0 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    cells = torch.stack([c0, -c0], dim=1)
    # sample 0 gets sample 1's top-left cell; sample 1 gets half of sample 0's right column
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 0.5, 0.5]])
    mix = MixParams("cutmix", perm=torch.tensor([1, 0]), lam=torch.tensor([0.75, 0.75]), boxes=boxes)
    teacher = MapTeacher([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]], bias=[0.5, 0.0, -0.5])
    emb0 = (5 + 2 + 3 + 4) / 4  # composed channel 0 of sample 0: [[5, 2], [3, 4]]
    emb1 = (5 + (6 + 2) / 2 + 7 + (8 + 4) / 2) / 4  # sample 1: [[5, 4], [7, 6]]
    t = 2.0
    want = torch.tensor([softmax([e + 0.5, -e, 2 * e - 0.5], t) for e in (emb0, emb1)])
    cache = memory_cache(torch.zeros(2, 3), torch.zeros(2, 2), cells)
    probs, emb = CachedTargets(cache, t, "spatial", need_features=True, head=SpatialHead(teacher))(rows(2, mix))
    torch.testing.assert_close(probs, want)
    torch.testing.assert_close(emb, torch.tensor([[emb0, -emb0], [emb1, -emb1]]))  # the pooled composed map
    torch.testing.assert_close(compose_cutmix(cells, mix.perm, mix_fractions(mix, 2))[0, 0],
                               torch.tensor([[5.0, 2.0], [3.0, 4.0]]))


def test_without_cutmix_the_targets_are_the_plain_cached_ones():
    g = torch.Generator().manual_seed(0)
    n, c, ch = 8, 5, 3
    logits, feats = torch.randn(n, c, generator=g) * 3, torch.randn(n, ch, generator=g)
    cache = memory_cache(logits, feats, torch.randn(n, ch, 4, 4, generator=g))
    teacher = MapTeacher(torch.randn(c, ch, generator=g).tolist())
    spatial = CachedTargets(cache, 4.0, "auto", need_features=True, head=SpatialHead(teacher))
    plain = CachedTargets(cache, 4.0, "logits", need_features=True)
    none = draw_params(MixConfig(), seed=1, step=2, batch_size=n, height=16, width=16)
    assert none.mode == "none"
    for batch in (rows(n), rows(n, none)):  # no mixing: the cached rows themselves
        p, e = spatial(batch)
        torch.testing.assert_close(p, torch.softmax(logits / 4.0, 1), rtol=0, atol=0)
        assert torch.equal(e, feats)
    for mode in ("mixup", "cutout"):  # auto mixes logits, as distill.cached_mix=logits does
        mix = draw_params(MixConfig(**{"p_" + mode: 1.0}), seed=1, step=2, batch_size=n, height=16, width=16)
        p, e = spatial(rows(n, mix))
        p0, e0 = plain(rows(n, mix))
        assert mix.mode == mode and torch.equal(p, p0) and torch.equal(e, e0)


def test_spatial_cutmix_targets_are_closer_to_the_online_teacher(teacher_run):
    """Real CutMix batches of the trained teacher's cache (filled by the cache
    job, maps stored by ``auto``): the composed targets are closer (KL at
    T = 1 and 4, and the embedding) to the teacher run on the mixed image than
    mixing the cached probabilities or logits."""
    from pipelines.mixing import Mixer
    from trainer.engine import Trainer

    cfg, _, _, cache_info = teacher_run
    assert cache_info["spatial_grid"] == 4 and cache_info["spatial_bytes"] > 0
    online = Trainer(replace(cfg, distill=replace(cfg.distill, targets="online"),
                             loss=replace(cfg.loss, rkd=1.0)), "student")
    cached = {m: Trainer(replace(cfg, distill=replace(cfg.distill, cached_mix=m),
                                 mix=replace(cfg.mix, p_cutmix=1.0), loss=replace(cfg.loss, rkd=1.0)), "student")
              for m in ("probs", "logits", "spatial")}
    try:
        assert cached["spatial"].targets.head is not None and cached["logits"].targets.head is None
        mixer = Mixer(MixConfig(p_cutmix=1.0), seed=5)
        kl = {(m, t): [] for m in cached for t in (1.0, 4.0)}
        emb_err = {m: [] for m in cached}
        online.train_loader.set_epoch(0)
        for step, batch in enumerate(online.train_loader):
            mixed = mixer(batch, step)
            for t in (1.0, 4.0):
                online.targets.temperature = t
                p_on, e_on = online.targets(mixed)
                for m, trainer in cached.items():
                    trainer.targets.temperature = t
                    q, e = trainer.targets(mixed)
                    kl[(m, t)].append((p_on * (p_on.log() - q.clamp_min(1e-12).log())).sum(1).mean().item())
                    if t == 1.0:
                        emb_err[m].append((e - e_on).pow(2).sum(1).mean().item())
        mean = {k: sum(v) / len(v) for k, v in kl.items()}
        for t in (1.0, 4.0):
            assert mean[("spatial", t)] < mean[("logits", t)] < mean[("probs", t)], mean
        assert sum(emb_err["spatial"]) < sum(emb_err["logits"]), emb_err  # logits/probs: the same linear mix
    finally:
        online.close()
        for trainer in cached.values():
            trainer.close()


# ---------------------------------------------------------- the cache with maps
N, K, C, D, CH, G, B = 30, 2, 6, 3, 4, 2, 8


def key():
    return CacheKey(teacher_hash="sha256:t", data_fingerprint="sha256:d", views={"seed": 0, "num_views": K},
                    teacher_resolution=32)


def true_rows(v):
    g = np.random.default_rng(v)
    return ((g.standard_normal((N, C)) * 4).astype(np.float32), g.random((N, D)).astype(np.float32),
            (g.random((N, CH, G, G)) * 3).astype(np.float32))


def map_batches(v, calls=None, features=True, rank=0, world=1):
    order = np.resize(np.arange(N), -(-N // world) * world)[rank::world]
    logits, feats, maps = true_rows(v)
    for s in range(0, len(order), B):
        idx = order[s:s + B]

        def compute(idx=idx, s=s):
            if calls is not None:
                calls.append((rank, v, s))
            return logits[idx], (feats[idx] if features else None), maps[idx]
        yield idx, compute


def fill(path, make=map_batches, **kw):
    return fill_cache(path, key(), N, C, K, make, feature_dim=D, spatial_channels=CH, spatial_grid=G, **kw)


def test_cache_round_trip_with_maps(tmp_path):
    path = fill(tmp_path / "c.h5", dtype="float32")
    cache = LogitCache.open(path, key())
    assert cache.spatial_grid == G and cache.spatial.shape == (N, K, CH, G, G)
    idx, vid = torch.tensor([0, 7, 29, 7]), torch.tensor([1, 0, 1, 1])
    want = torch.stack([torch.from_numpy(true_rows(v)[2][i]) for i, v in zip(idx.tolist(), vid.tolist())])
    assert torch.equal(cache.lookup_spatial(idx, vid), want)
    want_logits = torch.stack([torch.from_numpy(true_rows(v)[0][i]) for i, v in zip(idx.tolist(), vid.tolist())])
    assert torch.equal(cache.lookup(idx, vid), want_logits) and cache.spatial_fp16_max_abs_error == 0.0
    with h5py.File(path, "r") as f:
        assert (f.attrs["format_version"], f.attrs["spatial_grid"], f.attrs["spatial_channels"]) == (3, G, CH)
    # float16: the rounding error is measured
    half = LogitCache.open(fill(tmp_path / "h.h5"), key())
    exact = torch.from_numpy(np.stack([true_rows(v)[2] for v in range(K)], axis=1))
    err = (half.spatial.float() - exact).abs().max().item()
    assert half.spatial.dtype == torch.float16 and err == pytest.approx(half.spatial_fp16_max_abs_error)
    assert 0 < err <= 3 * 2 ** -11
    # maps without features
    bare = LogitCache.open(fill_cache(tmp_path / "b.h5", key(), N, C, K, lambda v: map_batches(v, features=False),
                                      spatial_channels=CH, spatial_grid=G), key())
    assert bare.features is None and bare.spatial_grid == G


def test_resumable_fill_with_maps_equals_an_uninterrupted_one(tmp_path):
    ref = fill(tmp_path / "ref.h5")
    path = tmp_path / "c.h5"

    def interrupted(v):
        for i, item in enumerate(map_batches(v)):
            if v == 1 and i == 2:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        fill(path, interrupted)
    calls = []
    fill(path, lambda v: map_batches(v, calls))
    per_view = -(-N // B)
    assert len(calls) == per_view - 2  # view 0 and two batches of view 1 were on disk
    assert path.read_bytes() == ref.read_bytes()
    # parts of a fill without maps are another layout: discarded, not mixed in
    plain = tmp_path / "p.h5"

    def logits_only_then_killed(v):
        if v == 1:
            raise KeyboardInterrupt
        for idx, compute in map_batches(v):
            yield idx, (lambda compute=compute: compute()[0])

    with pytest.raises(KeyboardInterrupt):
        fill_cache(plain, key(), N, C, K, logits_only_then_killed)
    calls = []
    fill(plain, lambda v: map_batches(v, calls))
    assert len(calls) == K * per_view and plain.read_bytes() == ref.read_bytes()


def test_sharded_fill_with_maps_equals_one_process(tmp_path):
    ref = fill(tmp_path / "ref.h5")
    path, world = tmp_path / "c.h5", 3
    barrier, errors = threading.Barrier(world, timeout=60), [None] * world

    def run(rank):
        try:
            fill(path, lambda v: map_batches(v, rank=rank, world=world), rank=rank, world_size=world,
                 barrier=barrier.wait)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert errors == [None] * world and path.read_bytes() == ref.read_bytes()


# ------------------------------------------------------------ choices, errors
def test_auto_stores_maps_for_a_dense_cache_of_a_teacher_with_a_map_within_the_budget():
    assert stores_spatial("dense", "auto", None, nbytes=10 ** 9, max_gb=4.0)
    assert not stores_spatial("dense", "auto", None, nbytes=5 * 10 ** 9, max_gb=4.0)  # too large
    assert not stores_spatial("topk", "auto", None, nbytes=1, max_gb=4.0)
    assert not stores_spatial("dense", "auto", "a ViT has no map", nbytes=1, max_gb=4.0)
    assert not stores_spatial("dense", "never", None, nbytes=1)
    assert stores_spatial("dense", "always", None, nbytes=5 * 10 ** 9, max_gb=4.0)
    with pytest.raises(CacheError, match="distill.cache_format=dense"):
        stores_spatial("topk", "always", None, nbytes=1)
    with pytest.raises(CacheError, match="no spatial feature map"):
        stores_spatial("dense", "always", "a ViT has no map", nbytes=1)
    with pytest.raises(ValueError, match="cache_spatial"):
        stores_spatial("dense", "sometimes", None, nbytes=1)
    with pytest.raises(CacheError, match="top-k"):
        plan_fill("topk", "/tmp/x.topk", N, K, C, spatial_channels=CH, spatial_grid=G)
    plan = plan_fill("dense", "/tmp/x.h5", N, K, C, spatial_channels=CH, spatial_grid=G)
    assert plan["spatial_bytes"] == N * K * CH * G * G * 2 and "spatial maps" in plan["summary"]


def test_the_engine_composes_cutmix_only_when_it_can(teacher_run, tmp_path):
    """``auto`` loads the teacher's head when the recipe draws CutMix and the
    cache has maps; a cache without maps falls back to logits under ``auto``
    and is a clear error under ``spatial``."""
    from trainer import jobs
    from trainer.engine import Trainer

    cfg, *_ = teacher_run

    def head_of(c):
        trainer = Trainer(c, "student")
        try:
            return trainer.targets.head
        finally:
            trainer.close()

    cutmix = replace(cfg, mix=replace(cfg.mix, p_cutmix=0.5, p_mixup=0.5))
    head = head_of(cutmix)
    assert isinstance(head, SpatialHead) and [type(m).__name__ for m in head.used] == ["Linear"]
    assert head_of(cfg) is None  # no CutMix batch is ever drawn
    assert head_of(replace(cutmix, distill=replace(cutmix.distill, cached_mix="logits"))) is None
    bare = replace(cutmix, run=replace(cfg.run, name="bare", out_dir=str(tmp_path)),
                   distill=replace(cutmix.distill, cache_spatial="never",
                                   teacher_checkpoint=str(cfg.teacher_checkpoint)))
    assert jobs.run_cache(bare)["spatial_grid"] == 0
    assert head_of(bare) is None
    with pytest.raises(CacheError, match="distill.cache_spatial=always"):
        head_of(replace(bare, distill=replace(bare.distill, cached_mix="spatial")))


def test_topk_cache_and_mapless_teachers_refuse_spatial_clearly(tmp_path):
    from trainer.distill.topk_cache import TopKCache

    fake = SimpleNamespace(path=tmp_path / "c.topk")
    with pytest.raises(CacheError, match="cached_mix=auto or logits"):
        TopKCache.require_spatial(fake)
    cache = LogitCache(tmp_path / "c.h5", None, torch.zeros(2, 1, 3), 0.0)
    with pytest.raises(CacheError, match="cache_spatial=always"):
        CachedTargets(cache, 1.0, "spatial", head=None)
    vit = create_model("timm/vit_tiny_patch16_224", 10)
    assert "global pools" in vit.spatial_unavailable()
    with pytest.raises(SpatialFeaturesUnavailable, match="distill.cache_spatial=never"):
        vit.features_map(torch.zeros(1, 3, 224, 224))
    with pytest.raises(SpatialFeaturesUnavailable, match="between its global pool and its classifier"):
        create_model("torchvision/mobilenet_v3_small", 10).features_map(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "resnet18",
                                  "mobilenet_v3_small", "timm/resnet18", "timm/convnext_atto",
                                  "torchvision/resnet18", "torchvision/efficientnet_b0"])
def test_every_model_family_splits_at_its_global_pool(name):
    """``embed == pool_features(features_map)`` and the area-pooled cells pool
    to the same embedding; the spatial head holds exactly what pooling and
    the classifier use (converted alone to float64, it still runs)."""
    model = create_model(name, 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap, emb, logits = model.forward_spatial(x)
        torch.testing.assert_close(emb, model.embed(x))
        torch.testing.assert_close(logits, model(x))
        cells = F.adaptive_avg_pool2d(fmap, 2)  # every map here has even sides
        torch.testing.assert_close(model.pool_features(cells), emb, atol=1e-5, rtol=1e-4)
        head = SpatialHead(model).to(torch.float64)
        e64, z64 = head(cells.double())
    assert z64.dtype == torch.float64
    torch.testing.assert_close(z64.float(), logits, atol=1e-4, rtol=1e-4)
    assert any(p.dtype == torch.float32 for p in model.parameters())  # the backbone was not touched


def test_the_demo_refills_a_cache_whose_maps_differ_from_what_a_fill_stores(teacher_run, tmp_path):
    from benchmarks.demo import cache_is_current
    from trainer_helpers import copy_run_with_cache

    cfg, *_ = teacher_run
    copy = copy_run_with_cache(cfg, tmp_path)
    assert cache_is_current(copy)  # auto: the maps it has are the ones a fill stores
    assert not cache_is_current(replace(copy, distill=replace(copy.distill, cache_spatial="never")))
    assert not copy.cache_path.exists()  # removed, to be refilled without maps
