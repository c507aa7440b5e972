"""Mixed-target fidelity: how far cached teacher targets are from the online
teacher on the same mixed batches.

With cached targets the teacher never sees the mixed image. For mixup and
CutMix batches of the real training loader (full-resolution teacher views of
the student's crops), this runs the online teacher on the mixed image and
compares its distribution at temperature T with each cached approximation:

* ``probs``: the per-sample cached distributions mixed like the labels
  (``distill.cached_mix: probs``, the default);
* ``logits``: the cached logits mixed, then softened
  (``distill.cached_mix: logits``). For a model whose head is linear on the
  pooled embedding this is also what mixing cached embeddings gives;
* ``spatial`` (CutMix only): the teacher's last feature map of each source
  view, area-pooled to ``grid x grid`` cells (what a cache would store per
  row), composed cell by cell with the fraction of each cell the CutMix box
  covers, globally pooled and passed through the teacher's head.

Reported per mixing kind, temperature and approximation: mean
KL(online || approximation) and top-1 agreement, plus the approximation's
cost per batch next to the student's training step time (from the run's
log), and the extra cache size of ``spatial``.

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

import torch
import torch.nn.functional as F

APPROXIMATIONS = ("probs", "logits", "spatial")


def _spatial_hook(model):
    """Capture the input of the model's global pool (its last feature map)."""
    pool = getattr(model, "avgpool", None)
    if pool is None:
        return None, None
    store = {}
    handle = pool.register_forward_hook(lambda m, inp, out: store.__setitem__("map", inp[0].detach()))
    return store, handle


def compose_cutmix_map(maps: torch.Tensor, perm: torch.Tensor, pasted: torch.Tensor, grid: int) -> torch.Tensor:
    """``maps`` [B, D, h, w] -> area-pooled to ``grid x grid``, then each cell
    mixes its own and its partner's features by the fraction of the cell
    the partner fills (``pasted``: bool [B, 1, H, W] at image resolution);
    returns the globally pooled embedding [B, D]."""
    cells = F.adaptive_avg_pool2d(maps.float(), grid)
    frac = F.adaptive_avg_pool2d(pasted.float(), grid)
    composed = (1 - frac) * cells + frac * cells[perm]
    return composed.mean(dim=(2, 3))


def measure(cfg, batches: int, temperatures, grid: int) -> dict:
    from pipelines.loader import create_loader
    from pipelines.mixing import Mixer, MixConfig, box_edges, box_mask
    from trainer.data import loader_config
    from trainer.teacher import load_teacher

    device = torch.device("cpu")
    online_cfg = replace(cfg, distill=replace(cfg.distill, targets="online"))
    lc = loader_config(online_cfg, "train", device, role="student")
    results, costs = {}, {}
    with create_loader(lc, world_size=1, rank=0) as loader:
        teacher, _ = load_teacher(cfg, loader.store.num_classes, device)
        hook_store, handle = _spatial_hook(teacher)
        for kind, mix_cfg in (("mixup", MixConfig(p_mixup=1.0)), ("cutmix", MixConfig(p_cutmix=1.0))):
            mixer = Mixer(mix_cfg, cfg.run.seed)
            acc = {(t, a): {"kl": [], "agree": []} for t in temperatures for a in APPROXIMATIONS}
            cost = {a: [] for a in APPROXIMATIONS}
            loader.set_epoch(0)
            for step, batch in enumerate(loader):
                if step >= batches:
                    break
                with torch.no_grad():
                    z_src = teacher(batch.teacher)  # what the cache holds for these views
                    src_map = hook_store["map"] if hook_store is not None else None
                    # the teacher view is mixed like the student view (same boxes, its own grid)
                    mixed = mixer(batch, step)
                    z_on = teacher(mixed.teacher)
                m = mixed.mix
                for t in temperatures:
                    p_on = F.softmax(z_on / t, 1)
                    approx = {}
                    t0 = time.perf_counter()
                    approx["probs"] = m.mix_targets(F.softmax(z_src / t, 1))
                    cost["probs"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    approx["logits"] = F.softmax(m.mix_targets(z_src) / t, 1)
                    cost["logits"].append(time.perf_counter() - t0)
                    if kind == "cutmix" and src_map is not None:
                        t0 = time.perf_counter()
                        h, w = mixed.teacher.shape[-2:]
                        grid_hw = tuple(batch.student.shape[-2:])
                        pasted = box_mask(box_edges(m.boxes, grid_hw, (h, w)), h, w)
                        emb = compose_cutmix_map(src_map, m.perm, pasted, grid)
                        with torch.no_grad():
                            approx["spatial"] = F.softmax(teacher.head(emb) / t, 1)
                        cost["spatial"].append(time.perf_counter() - t0)
                    for a, q in approx.items():
                        kl = (p_on * (p_on.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1)
                        acc[(t, a)]["kl"].append(kl.mean().item())
                        acc[(t, a)]["agree"].append((q.argmax(1) == p_on.argmax(1)).float().mean().item())
            results[kind] = {f"T{t:g}": {a: {"kl": statistics.fmean(v["kl"]), "top1_agreement":
                                             statistics.fmean(v["agree"])}
                                         for (tt, a), v in acc.items() if tt == t and v["kl"]}
                             for t in temperatures}
            costs[kind] = {a: statistics.median(v) * 1e3 for a, v in cost.items() if v}
        if handle is not None:
            handle.remove()
        feature_dim = teacher.feature_dim
    return {"results": results, "cost_ms_per_batch": costs, "batches": batches,
            "batch_size": cfg.data.batch_size, "grid": grid,
            "spatial_cache_floats_per_row": grid * grid * feature_dim,
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
