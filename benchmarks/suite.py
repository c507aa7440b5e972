"""``python -m benchmarks run``: every suite in its own process, one JSON out.

Each suite module prints its own report (JSON on stdout); this module runs it
in a subprocess (so a suite's peak memory and any crash are its own) and
turns the report into *figures*: flat, comparable numbers

    {"median": x, "spread": [min, max], "repeats": n, "unit": "...",
     "peak_rss_mb": y, "higher_is_better": bool, "scope": "relative" | "absolute" | "quality"}

``scope`` says how :mod:`benchmarks.compare` may gate on the figure:
``relative`` figures are ratios to a reference measured in the same run
(loader x reference, kd_cached / ce, ...) and gate across machines;
``absolute`` figures (images/sec, milliseconds, MiB) gate only between files
from the same machine; ``quality`` figures (val ECE, top-1) do not depend on
the machine's speed and gate everywhere, but only beyond ``min_change``
(absolute units) as well as the relative threshold, because a few points of
a small ECE are noise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.loaders import STOCK_OF, TV_STOCK, stock_ratio_key
from dataset_tools.atomic import write_json_atomic as _write_json_atomic

SUITES = ("loaders", "step", "convert", "e2e")


# ----------------------------------------------------------------- figures
def figure(median, lo=None, hi=None, repeats=1, unit="", higher=True, scope="absolute",
           peak_rss_mb=None, **extra) -> dict:
    f = {"median": float(median), "spread": [float(median if lo is None else lo),
                                             float(median if hi is None else hi)],
         "repeats": int(repeats), "unit": unit, "higher_is_better": bool(higher), "scope": scope}
    if peak_rss_mb is not None:
        f["peak_rss_mb"] = float(peak_rss_mb)
    f.update(extra)
    return f


def _from_summary(s: dict, **kw) -> dict:
    return figure(s["median"], s["min"], s["max"], s["n"], **kw)


def loaders_figures(rep: dict) -> dict:
    out = {}
    results = rep["results"]
    ref = results.get("reference", {}).get("images_per_sec")
    tv = results.get(TV_STOCK, {}).get("images_per_sec")
    for name, r in results.items():
        if "images_per_sec" not in r:
            continue
        rates = r["window_rates"]
        mem = r.get("peak_rss_mb")
        out[f"{name}.images_per_sec"] = figure(r["images_per_sec"], min(rates), max(rates), len(rates),
                                               "images/s", True, "absolute", mem)
        stock = results.get(STOCK_OF.get(name, ""), {}).get("images_per_sec")
        stock_key = stock_ratio_key(name) if stock else ""
        bases = (("ratio_to_reference", None if name == "reference" else ref, "x reference"),
                 (stock_key, stock, "x " + stock_key[len("ratio_to_"):].replace("_", " ")),
                 ("ratio_to_torchvision_stock", None if name == TV_STOCK else tv,
                  "x stock torchvision"))
        for key, base, unit in bases:
            if base:
                out[f"{name}.{key}"] = figure(
                    r["images_per_sec"] / base, min(rates) / base, max(rates) / base, len(rates),
                    unit, True, "relative", mem)
        if mem is not None:
            out[f"{name}.peak_rss_mb"] = figure(mem, unit="MiB", higher=False, peak_rss_mb=mem)
    return out


def step_figures(rep: dict) -> dict:
    out, mem = {}, rep["peak_rss_mb"]
    for name, r in rep["results"].items():
        dev = {"peak_device_mb": r["peak_device_mb"]} if "peak_device_mb" in r else {}
        if name == "teacher_forward":
            out[f"{name}.ms_per_batch"] = _from_summary(r["ms_per_step"], unit="ms", higher=False,
                                                        peak_rss_mb=mem, **dev)
            continue
        out[f"{name}.steps_per_sec"] = _from_summary(r["steps_per_sec"], unit="steps/s",
                                                     peak_rss_mb=mem, **dev)
        out[f"{name}.images_per_sec"] = _from_summary(r["images_per_sec"], unit="images/s",
                                                      peak_rss_mb=mem, **dev)
    t = rep["targets"]
    if t["kd_cached_vs_ce"]["met"] is not None:
        out["kd_cached_over_ce"] = _from_summary(
            t["kd_cached_vs_ce"]["ratio"], unit="x ce", scope="relative", peak_rss_mb=mem,
            target=">= 0.9", met=t["kd_cached_vs_ce"]["met"])
    online = t["kd_cached_vs_online"]
    if online["met"] is not None:
        # the speed-up itself depends on the hardware's teacher/student cost ratio;
        # its fraction of the ideal (t_T + t_S) / t_S, measured in the same run, does not
        out["kd_cached_speedup_over_online"] = _from_summary(
            online["speedup"], unit="x online", peak_rss_mb=mem, ideal=online["ideal"]["median"],
            required=online["required"])
        out["kd_cached_vs_online_fraction_of_ideal"] = _from_summary(
            online["fraction_of_ideal"], unit="x ideal", scope="relative", peak_rss_mb=mem,
            target=">= 0.8", met=online["met"])
    out["peak_rss_mb"] = figure(mem, unit="MiB", higher=False, peak_rss_mb=mem)
    return out


def convert_figures(rep: dict) -> dict:
    out = {}
    for ds, r in rep["results"].items():
        runs = r.get("runs", [])
        for run in runs:
            key = f"{ds}.w{run['workers']}"
            out[f"{key}.images_per_sec"] = _from_summary(run["images_per_sec"], unit="images/s",
                                                         peak_rss_mb=run["peak_rss_mb"])
            out[f"{key}.peak_rss_mb"] = figure(run["peak_rss_mb"], unit="MiB", higher=False,
                                               peak_rss_mb=run["peak_rss_mb"])
        if len(runs) >= 2:
            lo, hi = min(runs, key=lambda x: x["workers"]), max(runs, key=lambda x: x["workers"])
            out[f"{ds}.w{hi['workers']}_over_w{lo['workers']}"] = figure(
                hi["images_per_sec"]["median"] / lo["images_per_sec"]["median"],
                unit=f"x {lo['workers']} worker(s)", scope="relative",
                peak_rss_mb=max(hi["peak_rss_mb"], lo["peak_rss_mb"]))
    return out


def e2e_figures(rep: dict, min_change: float = 0.02) -> dict:
    out = {}
    res = rep["results"]
    for phase, r in res.items():
        mem = r["peak_rss_mb"]
        out[f"{phase}.images_per_sec"] = _from_summary(r["images_per_sec"], unit="images/s",
                                                       peak_rss_mb=mem)
        for metric, higher in (("val_ece", False), ("val_top1", True)):
            if metric in r:
                out[f"{phase}.{metric}"] = figure(r[metric], unit="", higher=higher, scope="quality",
                                                  peak_rss_mb=mem, min_change=min_change)
        out[f"{phase}.peak_rss_mb"] = figure(mem, unit="MiB", higher=False, peak_rss_mb=mem)
        if "loop_efficiency" in r:  # the job over the plain PyTorch loop, measured in this run
            out[f"{phase}.loop_efficiency"] = _from_summary(r["loop_efficiency"], unit="x plain loop",
                                                            scope="relative", peak_rss_mb=mem)
        if "loop_efficiency_paired" in r:  # the same, step-paired (benchmarks.loop_pairs)
            out[f"{phase}.loop_efficiency_paired"] = _from_summary(
                r["loop_efficiency_paired"], unit="x plain loop (paired)", scope="relative", peak_rss_mb=mem)
        if r.get("first_step_seconds") is not None:
            out[f"{phase}.first_step_seconds"] = figure(r["first_step_seconds"], unit="s",
                                                          higher=False, peak_rss_mb=mem)
    if "student_kd" in res and "student_kd_cutmix" in res:
        a, b = res["student_kd_cutmix"]["images_per_sec"], res["student_kd"]["images_per_sec"]
        out["student_kd_cutmix_over_kd.images_per_sec"] = figure(
            a["median"] / b["median"], unit="x student_kd", scope="relative",
            repeats=min(a["n"], b["n"]))
    return out


FIGURES = {"loaders": loaders_figures, "step": step_figures, "convert": convert_figures,
           "e2e": e2e_figures}


# ----------------------------------------------------------------- running
def _link_cifar_subset(data: Path, dst: Path, limit: int) -> Path:
    from benchmarks.convert import balanced_subset

    src, _ = balanced_subset(data / "cifar100" / "train", dst, limit)
    return src


def suite_command(name: str, quick: bool, threads: int | None, data: Path, scratch: Path) -> list[str]:
    py = [sys.executable, "-m", f"benchmarks.{name}"]
    th = ["--threads", str(threads)] if threads else []
    if name == "loaders":
        if quick:  # 2000 CIFAR images converted into the scratch folder
            src = _link_cifar_subset(data, scratch / "loaders_src" / "train", 2000)
            return py + ["--data", str(src), "--cache-dir", str(scratch / "loaders_stores"),
                         "--resolution", "32", "--batch-size", "128", "--warmup", "1",
                         "--repeats", "2", "--min-seconds", "1", "--timeout", "300", "--json"]
        return py + ["--data", str(data / "cifar100" / "train"), "--resolution", "32",
                     "--rounds", "2", "--json"]
    if name == "convert":
        return py + (["--limit", "500", "--repeats", "1"] if quick else []) + ["--data", str(data)]
    return py + (["--quick"] if quick else []) + th + ["--json"]


def parse_report(stdout: str) -> dict:
    """The JSON object a suite printed (libraries may print lines before it)."""
    start = 0 if stdout.startswith("{") else stdout.find("\n{") + 1
    if start == 0 and not stdout.startswith("{"):
        raise ValueError("no JSON object on stdout")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def run_suite(name: str, quick: bool, threads: int | None, data: Path, timeout: float) -> dict:
    """``{"figures": {...}, "report": raw report, "seconds": s}`` or ``{"error": ...}``."""
    from benchmarks.common import PeakRSS

    env = dict(os.environ)
    if threads:  # also for suites without a --threads flag (their torch/numba/OpenMP pools)
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix=f"cqkd-bench-{name}-") as tmp:
        cmd = suite_command(name, quick, threads, data, Path(tmp))
        print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0, load_before = time.perf_counter(), os.getloadavg()[0]
        try:
            with PeakRSS() as mem:  # the suite's process tree (plus this small runner)
                p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "command": cmd}
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": f"exit code {p.returncode} (its stderr is above)", "command": cmd,
                "seconds": seconds}
    try:
        report = parse_report(p.stdout)
        figures = FIGURES[name](report)
    except (ValueError, KeyError, TypeError) as e:
        return {"error": f"unreadable report ({type(e).__name__}: {e})", "command": cmd,
                "seconds": seconds}
    report.pop("machine", None)  # recorded once at the top level
    # other work on a shared machine skews the numbers: keep the evidence
    return {"figures": figures, "report": report, "seconds": seconds,
            "suite_peak_rss_mb": mem.peak_mb, "load_avg_1m_before": load_before,
            "load_avg_1m_after": os.getloadavg()[0]}


def write_json_atomic(path: Path, obj) -> None:
    _write_json_atomic(path, obj, indent=1)


def run_all(suites, out: Path, quick: bool, threads: int | None, data: Path | None,
            timeout: float) -> int:
    from benchmarks.common import machine_info

    if data is None:
        from dataset_tools.locate import shared_datasets_dir
        data = shared_datasets_dir()
    result = {"machine": machine_info(),
              "config": {"quick": quick, "threads": threads, "suites": list(suites)},
              "benchmarks": {}, "suites": {}}
    failed = []
    for name in suites:
        r = run_suite(name, quick, threads, data, timeout)
        if "error" in r:
            failed.append(name)
            print(f"== {name}: FAILED: {r['error']}", file=sys.stderr)
            result["suites"][name] = r
            continue
        result["benchmarks"][name] = r.pop("figures")
        result["suites"][name] = r
        print(f"== {name}: {len(result['benchmarks'][name])} figures in {r['seconds']:.0f} s",
              file=sys.stderr)
        write_json_atomic(out, result)  # partial results survive a later crash
    write_json_atomic(out, result)
    print(f"wrote {out}", file=sys.stderr)
    return 1 if failed else 0
