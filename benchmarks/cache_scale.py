"""The teacher cache at ImageNet scale: fill a synthetic top-k cache of the
full ImageNet-1k shape (1,281,167 samples x 8 views x 1,000 classes) on
disk through the trainer's own fill (:func:`trainer.distill.teacher_cache.fill_teacher_cache`,
resumable part files and all), then report:

* its size on disk next to the dense cache's (computed: the dense logits are
  never materialised, 20.5 GB in float16);
* its error against the dense logits on a sample of rows (whole generated
  chunks, regenerated after the fill, looked up through ``TopKCache.lookup``):
  KL(dense || compact) at T = 1 and 4, top-1 agreement, the Hinton KD loss
  and its gradient for a random student (logits N(0, 1)) with dense vs
  compact targets, the tail-mass estimate's error and how often the truth lies
  within its bounds; plus the same errors for other k computed in memory
  on the sample, to choose ``distill.cache_topk``; and the fill's own
  record (mean / max KL over every row);
* lookups per second (batches of 256 random (sample, view) rows, each turned
  into the [256, C] reconstructed logits at T = 4), cold (the file's pages
  dropped from the page cache with ``posix_fadvise``) and warm;
* peak RSS (:class:`benchmarks.common.PeakRSS`) of the fill and of the
  lookups (run in a fresh process that only opens the cache), and the
  anonymous (non file-backed) share: the memory map's pages count in RSS but
  are page cache the kernel can drop.

The synthetic teacher (:class:`SyntheticTeacher`) is shaped like a trained
ImageNet ResNet-50: the top class is the label 76 % of the time (ResNet-50's
top-1), else a class of the same group of 10 (WordNet-like siblings) or any
class; its logit is N(11, 2.5^2), the bulk N(0, 1.5^2) and the top class's
group gets +N(3, 1). The measured shape (mean top-1 probability, entropy,
logit spread, mass beyond the top-k at T = 1 and 4) is reported, so
the claim can be checked; no real ImageNet teacher was available here, so
the tail's shape is an assumption, and every real fill records its own
error in its ``meta.json``.

    python -m benchmarks.cache_scale [--quick] [--dir runs/bench_cache_scale] [--json out.json]

The full size needs ~3 GB of free disk (parts + cache) and ~20 min on 2
cores; ``--quick`` (50,000 x 2 views) takes about a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import PeakRSS, machine_info
from trainer.distill.cache_sizes import dense_nbytes, topk_nbytes
from trainer.distill.kd import kd_loss
from trainer.distill.logit_cache import CacheKey
from trainer.distill.teacher_cache import fill_teacher_cache, open_teacher_cache
from trainer.distill.topk_cache import reconstruct_logits, summarize_rows, tail_log_mass

IMAGENET = dict(samples=1_281_167, views=8, classes=1000)


@dataclass(frozen=True)
class SyntheticTeacher:
    """Deterministic teacher logits, generated in chunks of ``chunk`` rows
    seeded by (seed, view, chunk), so any chunk can be regenerated later."""

    classes: int = 1000
    chunk: int = 16384
    seed: int = 0
    accuracy: float = 0.76  # P(top class = label): ResNet-50's ImageNet top-1
    sibling_share: float = 0.6  # of the errors, the share within the label's group
    group: int = 10
    top_mean: float = 11.0
    top_std: float = 2.5
    bulk_std: float = 1.5
    group_boost: float = 3.0

    def chunk_rows(self, num_samples: int, c: int) -> tuple[int, int]:
        return c * self.chunk, min(num_samples, (c + 1) * self.chunk)

    def logits(self, num_samples: int, view: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [n, C] float32, labels [n])`` of chunk ``c`` of view ``view``."""
        start, stop = self.chunk_rows(num_samples, c)
        n, C, G = stop - start, self.classes, self.group
        labels = torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(self.seed * 7919 + c))
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + view) * 1_000_003) + c)
        u = torch.rand(n, generator=g)
        sibling = (labels // G) * G + torch.randint(0, G, (n,), generator=g)
        top = torch.where(u < self.accuracy, labels,
                          torch.where(u < self.accuracy + (1 - self.accuracy) * self.sibling_share, sibling,
                                      torch.randint(0, C, (n,), generator=g)))
        z = torch.randn(n, C, generator=g) * self.bulk_std
        members = (top // G)[:, None] * G + torch.arange(G)[None]
        z.scatter_add_(1, members, self.group_boost + torch.randn(n, G, generator=g))
        z[torch.arange(n), top] = self.top_mean + self.top_std * torch.randn(n, generator=g)
        return z, labels


class AnonPeak:
    """Peak anonymous RSS (``RssAnon`` of /proc/self/status: memory that is
    not a file's page cache) of this process, polled by a thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.now())

    def __enter__(self):
        self.peak_bytes = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.now())


def fill(teacher: SyntheticTeacher, path: Path, samples: int, views: int, topk: int, dtype: str) -> dict:
    chunks = -(-samples // teacher.chunk)

    def view_batches(v):
        for c in range(chunks):
            start, stop = teacher.chunk_rows(samples, c)
            yield np.arange(start, stop), (lambda c=c: teacher.logits(samples, v, c)[0].numpy())

    key = CacheKey(teacher_hash=f"synthetic:{json.dumps(asdict(teacher), sort_keys=True)}",
                   data_fingerprint=f"synthetic:{samples}", views={"num_views": views}, teacher_resolution=224)
    t0 = time.perf_counter()
    with PeakRSS() as rss, AnonPeak() as anon:
        fill_teacher_cache("topk", path, key, samples, teacher.classes, views, view_batches, dtype=dtype,
                           topk=topk)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows_per_sec": samples * views / seconds,
            "peak_rss_mb": rss.peak_mb, "peak_anon_rss_mb": anon.peak_bytes / 2**20}


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(1)


def _summary(x: torch.Tensor) -> dict:
    x = x.double()
    return {"mean": x.mean().item(), "p50": x.quantile(0.5).item(), "p99": x.quantile(0.99).item(),
            "max": x.max().item()}


TEMPERATURES = (0.5, 1.0, 2.0, 4.0)  # KL / KD / gradient errors are measured at each


def errors(cache, teacher: SyntheticTeacher, samples: int, views: int, sample_rows: int, other_k: list[int],
           dtype: str, seed: int = 1) -> dict:
    """Compact vs dense on whole regenerated chunks drawn at random."""
    chunks = -(-samples // teacher.chunk)
    rng = np.random.default_rng(seed)
    pairs = [(v, c) for v in range(views) for c in range(chunks)]
    n_pick = min(len(pairs), max(1, -(-sample_rows // teacher.chunk)))
    picked = [pairs[i] for i in rng.choice(len(pairs), n_pick, replace=False)]
    per_t = {t: {"kl": [], "kd_dense": [], "kd_compact": [], "grad": []} for t in TEMPERATURES}
    shape = {k: [] for k in ("agree", "conf", "ent", "label_top1", "std", "zmax", "tail1", "tail4")}
    mass = {t: {"err": [], "inside": [], "width": []} for t in (0.5, 1.0, 2.0, 4.0, 8.0)}
    by_k = {k: {1.0: [], 4.0: []} for k in other_k}
    g = torch.Generator().manual_seed(seed)
    for v, c in picked:
        z, labels = teacher.logits(samples, v, c)
        start, _ = teacher.chunk_rows(samples, c)
        for s in range(0, len(z), 4096):
            zb = z[s:s + 4096]
            idx = torch.arange(start + s, start + s + len(zb))
            vid = torch.full_like(idx, v)
            student = torch.randn(zb.shape, generator=g)  # a random student's logits
            for t, acc in per_t.items():
                approx = cache.lookup(idx, vid, t)
                p_log, q_log = torch.log_softmax(zb / t, 1), torch.log_softmax(approx / t, 1)
                p, q = p_log.exp(), q_log.exp()
                acc["kl"].append(_kl(p_log, q_log))
                acc["kd_dense"].append(kd_loss(student, p, t).reshape(1))
                acc["kd_compact"].append(kd_loss(student, q, t).reshape(1))
                # the KD gradient wrt the student's logits is T (q_s - p) / B
                acc["grad"].append(((q - p).norm() / (torch.softmax(student / t, 1) - p).norm()).reshape(1))
                if t == 1.0:
                    shape["agree"].append((approx.argmax(1) == zb.argmax(1)).float())
            p = torch.softmax(zb, 1)
            shape["conf"].append(p.max(1).values)
            shape["ent"].append(-(p * p.clamp_min(1e-30).log()).sum(1))
            shape["label_top1"].append((zb.argmax(1) == labels[s:s + 4096]).float())
            shape["std"].append(zb.std(1))
            shape["zmax"].append(zb.max(1).values)
            shape["tail1"].append(1 - p.topk(cache.topk, 1).values.sum(1))
            shape["tail4"].append(1 - torch.softmax(zb / 4, 1).topk(cache.topk, 1).values.sum(1))
            values, classes, tail = summarize_rows(zb, cache.topk)
            rest = zb.scatter(1, classes, float("-inf"))
            for t, m in mass.items():
                truth = torch.logsumexp(rest.double() / t, 1).float()
                est, lo, hi = tail_log_mass(tail, teacher.classes - cache.topk, t)
                m["err"].append(est - truth)
                m["inside"].append(((lo <= truth + 1e-4) & (truth <= hi + 1e-4)).float())
                m["width"].append(hi - lo)
            for k in other_k:
                vk, ck, tk = summarize_rows(zb, k)
                vk = vk.to(getattr(torch, dtype)).float()
                for t, kls in by_k[k].items():
                    q_log = torch.log_softmax(reconstruct_logits(vk, ck, tk, teacher.classes, t) / t, 1)
                    kls.append(_kl(torch.log_softmax(zb / t, 1), q_log))
    cat = {k: torch.cat(v) for k, v in shape.items()}
    out = {"rows": int(cat["agree"].numel()), "chunks": n_pick, "top1_agreement": cat["agree"].mean().item()}
    for t, acc in per_t.items():
        d, c = torch.cat(acc["kd_dense"]), torch.cat(acc["kd_compact"])
        out[f"T{t:g}"] = {"kl": _summary(torch.cat(acc["kl"])),
                          "kd_dense": d.mean().item(), "kd_compact": c.mean().item(),
                          "kd_mean_abs_diff": (c - d).abs().mean().item(),
                          "kd_relative_diff": ((c - d).abs() / d).mean().item(),
                          "gradient_relative_error": torch.cat(acc["grad"]).mean().item()}
    out["tail_log_mass"] = {f"T{t:g}": {"mean_abs_error": torch.cat(m["err"]).abs().mean().item(),
                                        "max_abs_error": torch.cat(m["err"]).abs().max().item(),
                                        "mean_bound_width": torch.cat(m["width"]).mean().item(),
                                        "within_bounds": torch.cat(m["inside"]).mean().item()}
                            for t, m in mass.items()}
    out["teacher_shape"] = {"mean_top1_prob": cat["conf"].mean().item(), "mean_entropy": cat["ent"].mean().item(),
                            "top1_is_label": cat["label_top1"].mean().item(),
                            "mean_logit_std": cat["std"].mean().item(), "mean_max_logit": cat["zmax"].mean().item(),
                            "tail_mass_T1": cat["tail1"].mean().item(),
                            "tail_mass_T4": cat["tail4"].mean().item()}
    out["other_k"] = {str(k): {"kl_T1_mean": torch.cat(v[1.0]).mean().item(),
                               "kl_T4_mean": torch.cat(v[4.0]).mean().item(),
                               "imagenet_bytes": topk_nbytes(IMAGENET["samples"], IMAGENET["views"], k, dtype)}
                      for k, v in by_k.items()}
    return out


def _drop_page_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def _warm_page_cache(path: Path) -> None:
    buf = bytearray(8 << 20)  # reused: reading the file must not grow the process
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def lookups(cache, batch: int, batches: int, temperature: float = 4.0, seed: int = 2) -> dict:
    """Batches per second of ``cache.lookup`` (gather + reconstruction to [B, C])
    on uniformly random rows, after dropping the file from the page cache
    (cold) and after reading it once (warm), and of the gather alone (warm)."""
    g = torch.Generator().manual_seed(seed)

    def draws():
        return [(torch.randint(0, cache.num_samples, (batch,), generator=g),
                 torch.randint(0, cache.num_views, (batch,), generator=g)) for _ in range(batches)]

    def rate(fn, work):
        t0 = time.perf_counter()
        for idx, vid in work:
            fn(idx, vid)
        dt = time.perf_counter() - t0
        return {"batches_per_sec": len(work) / dt, "rows_per_sec": len(work) * batch / dt,
                "ms_per_batch": 1e3 * dt / len(work)}

    rows_file = cache.path / "rows.npy"
    out = {"batch": batch, "batches": batches, "temperature": temperature,
           "rss_before_mb": PeakRSS().sample() / 2**20, "anon_rss_before_mb": AnonPeak.now() / 2**20}
    with PeakRSS() as rss, AnonPeak() as anon:
        dropped = _drop_page_cache(rows_file)
        out["cold"] = {**rate(lambda i, v: cache.lookup(i, v, temperature), draws()), "page_cache_dropped": dropped}
        _warm_page_cache(rows_file)
        out["warm"] = rate(lambda i, v: cache.lookup(i, v, temperature), draws())
        out["warm_gather_only"] = rate(cache.rows_at, draws())
    out.update(peak_rss_mb=rss.peak_mb, peak_anon_rss_mb=anon.peak_bytes / 2**20)
    return out


def lookups_in_fresh_process(path: Path, batch: int, batches: int) -> dict:
    """:func:`lookups` in a new process that only opens the cache, so its RSS
    is the lookups' own (this process still holds the fill's and the error
    pass's freed-but-kept heap)."""
    cmd = [sys.executable, "-m", "benchmarks.cache_scale", "--lookups-of", str(path), "--batch", str(batch),
           "--lookup-batches", str(batches), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(samples: int, views: int, classes: int, topk: int, directory: Path, dtype: str = "float16",
        chunk: int = 16384, sample_rows: int = 131072, lookup_batches: int = 2000, batch: int = 256,
        other_k=(8, 16, 64), keep: bool = False) -> dict:
    teacher = SyntheticTeacher(classes=classes, chunk=chunk)
    path = directory / f"synthetic_N{samples}_K{views}_C{classes}_top{topk}.topk"
    if path.exists():
        shutil.rmtree(path)  # a previous run's cache: the fill is what is measured
    directory.mkdir(parents=True, exist_ok=True)
    result = {"shape": {"samples": samples, "views": views, "classes": classes, "topk": topk, "dtype": dtype},
              "teacher": asdict(teacher), "machine": machine_info(),
              "baseline_rss_mb": PeakRSS().sample() / 2**20, "baseline_anon_rss_mb": AnonPeak.now() / 2**20}
    try:
        result["fill"] = fill(teacher, path, samples, views, topk, dtype)
        on_disk = sum(f.stat().st_size for f in path.iterdir())
        result["size"] = {"on_disk_bytes": on_disk, "dense_float16_bytes": dense_nbytes(samples, views, classes),
                          "ratio_to_dense": on_disk / dense_nbytes(samples, views, classes)}
        cache = open_teacher_cache(path)
        result["fill_record"] = cache.meta["reconstruction_kl"]
        result["errors"] = errors(cache, teacher, samples, views, sample_rows,
                                  [k for k in other_k if k < classes], dtype)
        del cache
        result["lookups"] = lookups_in_fresh_process(path, batch, lookup_batches)
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(Path(str(path) + ".parts"), ignore_errors=True)
    return result


def report(r: dict) -> str:
    s, e, lk = r["shape"], r["errors"], r["lookups"]
    gbs = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    lines = [
        f"# teacher cache at {s['samples']:,} x {s['views']} views x {s['classes']} classes, "
        f"top-{s['topk']} {s['dtype']}",
        f"RSS before the fill {r['baseline_rss_mb']:.0f} MB (anonymous {r['baseline_anon_rss_mb']:.0f} MB: "
        f"Python, torch and its mapped libraries)",
        f"size on disk {gbs(r['size']['on_disk_bytes'])} (dense float16 {gbs(r['size']['dense_float16_bytes'])}, "
        f"{r['size']['ratio_to_dense']:.3f}x)",
        f"fill {r['fill']['seconds']:.0f} s ({r['fill']['rows_per_sec']:,.0f} rows/s), peak RSS "
        f"{r['fill']['peak_rss_mb']:.0f} MB (anonymous {r['fill']['peak_anon_rss_mb']:.0f} MB)",
        f"error on {e['rows']:,} rows: top-1 agreement {e['top1_agreement']:.4f}; fill record over all "
        f"rows: KL T=1 mean {r['fill_record']['T1']['mean']:.4f}, T=4 mean {r['fill_record']['T4']['mean']:.4f}",
    ]
    for t in TEMPERATURES:
        x = e[f"T{t:g}"]
        lines.append(f"T={t:g}: KL(dense||compact) mean {x['kl']['mean']:.4f} p99 {x['kl']['p99']:.4f} max "
                     f"{x['kl']['max']:.4f}; KD loss (random student) dense {x['kd_dense']:.4f} compact "
                     f"{x['kd_compact']:.4f} ({100 * x['kd_relative_diff']:.2f} %); KD gradient relative "
                     f"error {100 * x['gradient_relative_error']:.2f} %")
    lines.append("tail log-mass |error| (mean / max, within bounds): " + "; ".join(
        f"T={t[1:]}: {m['mean_abs_error']:.4f} / {m['max_abs_error']:.4f}, {100 * m['within_bounds']:.1f} %"
        for t, m in e["tail_log_mass"].items()))
    lines.append("other k (KL T=1 / T=4 mean, ImageNet size): " + "; ".join(
        f"k={k}: {v['kl_T1_mean']:.4f} / {v['kl_T4_mean']:.4f}, {gbs(v['imagenet_bytes'])}"
        for k, v in e["other_k"].items()))
    sh = e["teacher_shape"]
    lines.append(f"teacher shape: top-1 prob {sh['mean_top1_prob']:.3f}, entropy {sh['mean_entropy']:.3f}, "
                 f"top-1 = label {sh['top1_is_label']:.3f}, logit std {sh['mean_logit_std']:.2f}, max logit "
                 f"{sh['mean_max_logit']:.2f}, mass beyond the top-{s['topk']} T=1 {sh['tail_mass_T1']:.4f} "
                 f"T=4 {sh['tail_mass_T4']:.4f}")
    lines.append(f"lookups (batch {lk['batch']}, T={lk['temperature']:g}): cold {lk['cold']['batches_per_sec']:,.0f} "
                 f"batches/s, warm {lk['warm']['batches_per_sec']:,.0f} batches/s "
                 f"({lk['warm']['rows_per_sec']:,.0f} rows/s, {lk['warm']['ms_per_batch']:.2f} ms), gather only "
                 f"{lk['warm_gather_only']['batches_per_sec']:,.0f} batches/s; a fresh process: RSS "
                 f"{lk['rss_before_mb']:.0f} MB after opening the cache, peak {lk['peak_rss_mb']:.0f} MB "
                 f"(anonymous {lk['anon_rss_before_mb']:.0f} -> peak {lk['peak_anon_rss_mb']:.0f} MB)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="50,000 samples x 2 views (a smoke run)")
    p.add_argument("--samples", type=int, default=IMAGENET["samples"])
    p.add_argument("--views", type=int, default=IMAGENET["views"])
    p.add_argument("--classes", type=int, default=IMAGENET["classes"])
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--chunk", type=int, default=16384, help="rows per generated chunk / part file")
    p.add_argument("--sample-rows", type=int, default=131072, help="rows compared with the dense logits")
    p.add_argument("--lookup-batches", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dir", type=Path, default=Path("runs/bench_cache_scale"))
    p.add_argument("--keep", action="store_true", help="keep the filled cache")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--lookups-of", type=Path, help=argparse.SUPPRESS)  # the fresh lookup process
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.lookups_of:
        print(json.dumps(lookups(open_teacher_cache(a.lookups_of), a.batch, a.lookup_batches)))
        return 0
    if a.quick:
        a.samples, a.views, a.sample_rows, a.lookup_batches, a.chunk = 50_000, 2, 16384, 200, 8192
    r = run(a.samples, a.views, a.classes, a.topk, a.dir, a.dtype, a.chunk, a.sample_rows, a.lookup_batches,
            a.batch, keep=a.keep)
    r["command"] = "python -m benchmarks.cache_scale " + " ".join(sys.argv[1:] if argv is None else argv)
    r["torch_threads"] = torch.get_num_threads()
    print(report(r))
    if a.json:
        from dataset_tools.atomic import write_json_atomic

        write_json_atomic(a.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
