"""Loader throughput: every backend and variant on the same data and output.

    python -m benchmarks.loaders --data DIR --resolution 32 --batch-size 256 --json

DIR is a converted store (an OUT_DIR of dataset_tools/convert.py) or an
ImageFolder (``DIR/<class>/<image>``, or ``DIR/<split>/<class>/<image>``), which
is converted once into a cache folder (``--write-mode jpg`` by default, so FFCV
decodes JPEGs too, and ``--student-resolution`` so the low-res store exists).
Every variant produces the same thing: a train epoch of ``resolution``-pixel
random-resized crops + flips (fresh views each epoch), normalized float
batches on the training device. ``ffcv_stock*`` are FFCV's own decoders on
the same files (:mod:`benchmarks.stock_ffcv`) and ``dali_stock`` DALI's own
reader and operators on the same shards (:mod:`benchmarks.stock_dali`); each
of our FFCV variants also reports ``ratio_to_stock_ffcv``, our DALI variants
``ratio_to_stock_dali``. On CPU, ``dali`` decodes JPEGs at a reduced DCT
scale (:mod:`pipelines.dali.scaled_decode`) and ``dali_exact`` with DALI's
own decoder at full size, as ``ffcv`` and ``ffcv_exact`` do.
``torchvision_stock`` is ImageFolder + torchvision transforms + DataLoader on
the source folder (:mod:`benchmarks.stock_torchvision`, a user's usual
starting point); every variant reports ``ratio_to_torchvision_stock`` when it
ran.

Each variant runs in a fresh subprocess, so its peak memory (process + worker
processes, see :class:`benchmarks.common.PeakRSS`) is its own and a crash or
a missing library is reported as ``"error"`` instead of dropping the variant.
Throughput is images/sec over whole epochs, after ``--warmup`` epochs (JIT
compilation, worker start-up, page cache): the median of ``--repeats`` timed
windows (times ``--rounds`` interleaved rounds), each window as many whole
epochs as fill ``--min-seconds`` (a fast loader finishes a small dataset's
epoch in ~20 ms, where one scheduler hiccup moves a single-epoch figure by
tens of percent; per-epoch start-up stays inside the timing).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import PeakRSS, machine_info, summarize

# name -> (backend, LoaderConfig overrides, what is read)
VARIANTS = {
    "reference": ("reference", {"reduced_decode": False}, "jpeg"),
    "reference_draft": ("reference", {"reduced_decode": True}, "jpeg"),
    "ffcv": ("ffcv", {"reduced_decode": True}, "jpeg"),
    "ffcv_exact": ("ffcv", {"reduced_decode": False}, "jpeg"),
    "ffcv_lowres": ("ffcv", {"lowres": True}, "lowres"),
    "dali": ("dali", {"reduced_decode": True}, "jpeg"),  # CPU: scaled JPEG decode
    "dali_exact": ("dali", {"reduced_decode": False}, "jpeg"),  # DALI's own decoder
    # FFCV's own decoders on the same files (benchmarks/stock_ffcv.py)
    "ffcv_stock": ("ffcv_stock", {}, "jpeg"),
    "ffcv_stock_lowres": ("ffcv_stock", {"lowres": True}, "lowres"),
    # DALI's stock operators on the same shards (benchmarks/stock_dali.py)
    "dali_stock": ("dali_stock", {}, "jpeg"),
    # ImageFolder + torchvision transforms + DataLoader (benchmarks/stock_torchvision.py)
    "torchvision_stock": ("torchvision_stock", {}, "jpeg"),
}
# our variant -> the same library's stock pipeline on the same file
STOCK_OF = {"ffcv": "ffcv_stock", "ffcv_exact": "ffcv_stock", "ffcv_lowres": "ffcv_stock_lowres",
            "dali": "dali_stock", "dali_exact": "dali_stock"}
TV_STOCK = "torchvision_stock"  # every variant also reports its ratio to this one
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def stock_ratio_key(name: str) -> str:
    """``ratio_to_stock_ffcv`` / ``ratio_to_stock_dali``: the field holding a
    variant's ratio to its library's stock pipeline (:data:`STOCK_OF`)."""
    return "ratio_to_stock_" + VARIANTS[STOCK_OF[name]][0].removesuffix("_stock")


def _is_image_folder(d: Path) -> bool:
    classes = [c for c in d.iterdir() if c.is_dir()] if d.is_dir() else []
    return bool(classes) and any(f.suffix.lower() in _IMAGE_SUFFIXES
                                 for f in classes[0].iterdir())


def resolve_store(data: Path, split: str, resolution: int, cache_dir: Path, workers: int,
                  write_mode: str = "jpg") -> Path:
    """A store directory for ``data``, converting an ImageFolder first if needed."""
    if (data / "manifest.json").is_file():
        return data
    src = data / split if _is_image_folder(data / split) else data
    if not _is_image_folder(src):
        raise SystemExit(f"{data}: neither a converted store (no manifest.json) nor an ImageFolder "
                         f"(DIR/<class>/<image> or DIR/{split}/<class>/<image>)")
    key = hashlib.sha256(f"{src.resolve()}|{resolution}|{write_mode}".encode()).hexdigest()[:12]
    out = cache_dir / f"{src.parent.name}_{src.name}_{write_mode}_r{resolution}_{key}"
    if not (out / "manifest.json").is_file():
        from dataset_tools.convert import main as convert  # lazy: only when converting
        print(f"converting {src} -> {out}", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the report
            rc = convert([str(src), str(out), "--formats", "ffcv,dali", "--split-name", split,
                          "--write-mode", write_mode, "--student-resolution", str(resolution),
                          "--workers", str(workers)])
        if rc not in (None, 0):
            raise SystemExit(f"conversion of {src} failed (exit {rc})")
    return out


def describe_source(manifest: dict, backend: str, lowres: bool) -> str:
    """What a variant decodes: the FFCV file's storage, or the shards' images."""
    if lowres:
        return "lowres"
    if backend.startswith("ffcv"):
        mode = manifest["options"]["write_mode"]
    else:  # reference and dali read the webdataset shards (source JPEGs kept as they are;
        # torchvision_stock reads the same images from the source folder)
        mode = manifest["stores"]["dali"]["image_ext"]
    return mode.replace("jpg", "jpeg")


def run_variant(name: str, store: str, resolution: int, batch_size: int, workers: int,
                warmup: int, repeats: int, min_seconds: float) -> dict:
    """Measure one variant in this process (called in the child)."""
    import torch

    from pipelines.loader import LoaderConfig, create_loader

    backend, overrides, _ = VARIANTS[name]
    cfg = LoaderConfig(backend=backend, store=store, batch_size=batch_size, num_workers=workers,
                       shuffle=True, seed=0, drop_last=True, student_resolution=resolution,
                       train=True, num_views=0, flip=True, **overrides)
    sync = torch.cuda.synchronize if cfg.resolve_device().type == "cuda" else (lambda: None)
    windows, epoch, per_epoch = [], 0, 0

    def run_epoch(loader) -> int:
        nonlocal epoch
        loader.set_epoch(epoch)
        epoch += 1
        n = sum(len(batch) for batch in loader)
        sync()
        return n

    with PeakRSS() as mem:
        if backend == "ffcv_stock":
            from benchmarks.stock_ffcv import StockFFCVLoader
            loader = StockFFCVLoader(cfg)
        elif backend == "dali_stock":
            from benchmarks.stock_dali import StockDALILoader
            loader = StockDALILoader(cfg)
        elif backend == TV_STOCK:
            from benchmarks.stock_torchvision import StockTorchvisionLoader
            loader = StockTorchvisionLoader(cfg)
        else:
            loader = create_loader(cfg)
        try:
            for _ in range(warmup):
                run_epoch(loader)
            for _ in range(repeats):
                t0, n = time.perf_counter(), 0
                while True:
                    per_epoch = run_epoch(loader)
                    n += per_epoch
                    if per_epoch == 0 or time.perf_counter() - t0 >= min_seconds:
                        break
                windows.append((time.perf_counter() - t0, n))
        finally:
            loader.close()
    source = describe_source(loader.store.manifest, backend, cfg.lowres)
    if per_epoch == 0:
        raise RuntimeError(f"{name}: an epoch yielded no images (batch size > dataset?)")
    rates = [n / s for s, n in windows]
    ips = summarize(rates)
    return {"images_per_sec": ips["median"], "images_per_sec_spread": ips["spread"],
            "window_rates": rates, "window_seconds": [s for s, _ in windows],
            "images_per_epoch": per_epoch, "epochs_timed": epoch - warmup,
            "peak_rss_mb": mem.peak_mb, "source": source, "backend": backend,
            "device": str(cfg.resolve_device())}


def measure_in_subprocess(name: str, args, store: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.loaders", "--_variant", name, "--data", str(store),
           "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s", "source": VARIANTS[name][2]}
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {p.returncode}: {tail}", "source": VARIANTS[name][2]}
    return json.loads(lines[-1])


def combine_rounds(runs: list[dict]) -> dict:
    """One variant's result over rounds: median of all timed epochs, worst peak
    memory; the first error if any round failed."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    rates = [x for r in runs for x in r["window_rates"]]
    ips = summarize(rates)
    return {**runs[0], "images_per_sec": ips["median"], "images_per_sec_spread": ips["spread"],
            "window_rates": rates, "window_seconds": [s for r in runs for s in r["window_seconds"]],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "rounds": len(runs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="converted store or ImageFolder")
    ap.add_argument("--split", default="train", help="split folder/name when converting")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--write-mode", choices=("jpg", "raw"), default="jpg",
                    help="FFCV image storage when converting an ImageFolder (default jpg)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                    help="loader workers/threads (default: usable cores)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows")
    ap.add_argument("--min-seconds", type=float, default=2.0,
                    help="each timed window runs whole epochs until this long")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run all variants this many times, interleaved (a fresh process each "
                         "time), so load from other work on a shared machine hits all alike")
    ap.add_argument("--backends", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    metavar="VARIANT", help=f"variants to run (default: all of {list(VARIANTS)})")
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    ap.add_argument("--cache-dir", type=Path, default=cache_home / "cqkd" / "bench_stores")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    ap.add_argument("--_variant", help=argparse.SUPPRESS)  # child mode: measure one variant
    args = ap.parse_args(argv)

    if args._variant:
        res = run_variant(args._variant, str(args.data), args.resolution, args.batch_size,
                          args.workers, args.warmup, args.repeats, args.min_seconds)
        print(json.dumps(res))
        return 0

    store = resolve_store(args.data, args.split, args.resolution, args.cache_dir, args.workers,
                          args.write_mode)
    names = sorted(set(args.backends) | {"reference"}, key=list(VARIANTS).index)  # ratio needs it
    runs, load_before = {name: [] for name in names}, os.getloadavg()[0]
    for r in range(args.rounds):
        for name in names:
            print(f"round {r + 1}/{args.rounds}: measuring {name} ...", file=sys.stderr)
            runs[name].append(measure_in_subprocess(name, args, store))
    results = {name: combine_rounds(rs) for name, rs in runs.items()}
    ref = results["reference"].get("images_per_sec")
    tv = results.get(TV_STOCK, {}).get("images_per_sec")
    for r in results.values():
        if "images_per_sec" in r:
            r["ratio_to_reference"] = r["images_per_sec"] / ref if ref else None
            if tv:
                r["ratio_to_torchvision_stock"] = r["images_per_sec"] / tv
    for name, stock in STOCK_OF.items():
        if "images_per_sec" in results.get(name, {}) and "images_per_sec" in results.get(stock, {}):
            results[name][stock_ratio_key(name)] = (results[name]["images_per_sec"]
                                                    / results[stock]["images_per_sec"])
    machine = {**machine_info(), "load_avg_1m_before": load_before,
               "load_avg_1m_after": os.getloadavg()[0]}  # other work on the machine skews numbers
    report = {"results": results, "machine": machine,
              "settings": {"store": str(store), "resolution": args.resolution,
                           "batch_size": args.batch_size, "workers": args.workers,
                           "warmup_epochs": args.warmup, "timed_windows": args.repeats,
                           "min_seconds_per_window": args.min_seconds,
                           "rounds": args.rounds}}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'variant':18s} {'source':7s} {'img/s':>9s} {'x ref':>7s} {'x tv':>7s} "
              f"{'peak MB':>8s}")
        for name, r in results.items():
            if "error" in r:
                print(f"{name:18s} {r['source']:7s} ERROR {r['error']}")
            else:
                tv_ratio = r.get("ratio_to_torchvision_stock")
                print(f"{name:18s} {r['source']:7s} {r['images_per_sec']:9.0f} "
                      f"{r['ratio_to_reference']:7.2f} "
                      f"{'' if tv_ratio is None else format(tv_ratio, '7.2f'):>7s} "
                      f"{r['peak_rss_mb']:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
