"""Mixed-target fidelity: how far cached teacher targets are from the online
teacher on the same mixed batches.

With cached targets the teacher never sees the mixed image. For mixup and
CutMix batches of the real training loader (full-resolution teacher views of
the student's crops), this runs the online teacher on the mixed image and
compares its distribution at temperature T with each cached approximation,
computed by the product's own :class:`trainer.distill.targets.CachedTargets`
on cache rows made here from the same views (by the fill's
:func:`trainer.distill.teacher_cache.teacher_rows`, stored in the cache dtype
float16):

* ``probs``: the per-sample cached distributions mixed like the labels
  (``distill.cached_mix: probs``);
* ``logits``: the cached logits mixed, then softened
  (``distill.cached_mix: logits``). For a model whose head is linear on the
  pooled embedding this is also what mixing cached embeddings gives;
* ``spatial`` (CutMix only): the teacher's last feature map of each source
  view, area-pooled to ``grid x grid`` cells (what the cache stores with
  ``distill.cache_spatial``), composed cell by cell with the fraction of each
  cell the CutMix box covers, pooled and passed through the teacher's head
  (:mod:`trainer.distill.spatial`; ``distill.cached_mix: spatial``, and what
  ``auto`` does when the cache has the maps).

Reported per mixing kind, temperature and approximation: mean
KL(online || approximation) and top-1 agreement, plus each approximation's
cost per batch (the ``CachedTargets`` call: lookup, mixing or composition,
softmax) and the extra cache size of ``spatial``.

``python -m benchmarks.mix_fidelity --config configs/demo_cpu.yaml`` after
``make demo`` (it needs the run's teacher checkpoint; the cache rows are
recomputed here from the same views, so no cache file is read).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

APPROXIMATIONS = ("probs", "logits", "spatial")


def batch_cache(teacher, views: torch.Tensor, grid: int):
    """The cache rows of ``views`` (one per sample, view 0), as the fill
    makes them, in an in-memory :class:`~trainer.distill.logit_cache.LogitCache`
    stored in float16 (the default cache dtype)."""
    from trainer.distill.logit_cache import LogitCache
    from trainer.distill.teacher_cache import teacher_rows

    logits, emb, cells = (torch.from_numpy(a).half()[:, None]
                          for a in teacher_rows(teacher, views, teacher.feature_dim, grid))
    return LogitCache(Path("<this batch>"), None, logits, 0.0, emb, 0.0, cells, 0.0)


def measure(cfg, batches: int, temperatures, grid: int) -> dict:
    from pipelines.loader import create_loader
    from pipelines.mixing import Mixer, MixConfig
    from trainer.data import loader_config
    from trainer.distill.spatial import SpatialHead
    from trainer.distill.targets import CachedTargets
    from trainer.teacher import load_teacher

    device = torch.device("cpu")
    online_cfg = replace(cfg, distill=replace(cfg.distill, targets="online"))
    lc = loader_config(online_cfg, "train", device, role="student")
    results, costs = {}, {}
    with create_loader(lc, world_size=1, rank=0) as loader:
        teacher, _ = load_teacher(cfg, loader.store.num_classes, device)
        head = SpatialHead(teacher) if not teacher.spatial_unavailable() else None
        for kind, mix_cfg in (("mixup", MixConfig(p_mixup=1.0)), ("cutmix", MixConfig(p_cutmix=1.0))):
            approximations = [a for a in APPROXIMATIONS if a != "spatial" or (kind == "cutmix" and head)]
            mixer = Mixer(mix_cfg, cfg.run.seed)
            acc = {(t, a): {"kl": [], "agree": []} for t in temperatures for a in approximations}
            cost = {a: [] for a in approximations}
            loader.set_epoch(0)
            for step, batch in enumerate(loader):
                if step >= batches:
                    break
                with torch.no_grad():
                    cache = batch_cache(teacher, batch.teacher, grid if head else 0)
                    mixed = mixer(batch, step)  # the teacher view is mixed like the student view
                    z_on = teacher(mixed.teacher)
                rows = SimpleNamespace(indices=torch.arange(len(batch)), view_ids=torch.zeros(len(batch),
                                       dtype=torch.long), mix=mixed.mix)
                for t in temperatures:
                    p_on = torch.softmax(z_on / t, 1)
                    for a in approximations:
                        targets = CachedTargets(cache, t, a, head=head if a == "spatial" else None)
                        t0 = time.perf_counter()
                        q, _ = targets(rows)
                        cost[a].append(time.perf_counter() - t0)
                        kl = (p_on * (p_on.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1)
                        acc[(t, a)]["kl"].append(kl.mean().item())
                        acc[(t, a)]["agree"].append((q.argmax(1) == p_on.argmax(1)).float().mean().item())
            results[kind] = {f"T{t:g}": {a: {"kl": statistics.fmean(v["kl"]), "top1_agreement":
                                             statistics.fmean(v["agree"])}
                                         for (tt, a), v in acc.items() if tt == t and v["kl"]}
                             for t in temperatures}
            costs[kind] = {a: statistics.median(v) * 1e3 for a, v in cost.items() if v}
        channels = teacher.spatial_channels if head else 0
        feature_dim = teacher.feature_dim
    return {"results": results, "cost_ms_per_batch": costs, "batches": batches,
            "batch_size": cfg.data.batch_size, "grid": grid,
            "spatial_cache_floats_per_row": grid * grid * channels,
            "embedding_cache_floats_per_row": feature_dim}


def main(argv=None) -> int:
    from trainer.recipe import Config
    from trainer.yaml_config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--grid", type=int, default=4, help="cells per side of the cached spatial map")
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(Config, args.config, args.overrides)
    torch.manual_seed(0)
    out = measure(cfg, args.batches, args.temperatures, args.grid)
    print(f"{'mix':7s} {'T':>3s} {'approximation':13s} {'KL(online||approx)':>19s} {'top-1 agree':>12s}")
    for kind, by_t in out["results"].items():
        for t, by_a in by_t.items():
            for a, r in by_a.items():
                print(f"{kind:7s} {t[1:]:>3s} {a:13s} {r['kl']:19.4f} {r['top1_agreement']:12.3f}")
    print("cost per batch (ms): " + json.dumps(out["cost_ms_per_batch"]))
    if args.json:
        from dataset_tools.atomic import write_json_atomic

        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
