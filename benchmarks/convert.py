"""Conversion throughput: images/sec of dataset_tools/convert.py, 1 vs 2 workers.

    python -m benchmarks.convert [--data DIR] [--repeats N] [--limit N] [--workers 1,2]

Datasets: imagenette-224 train (JPEG sources, ``--write-mode jpg``, low-res
companion for 64 px students) and CIFAR-100 train (PNG sources, ``--write-mode
raw``, low-res companion for 16 px students, as in ``make demo``); both write
the FFCV .beton and the webdataset shards. By default each dataset is limited
to a class-balanced subset of ``--limit`` images (symlinks in a temporary
folder, so the files read are the originals) so the whole run takes a few
minutes on 2 cores; ``--limit 0`` converts the full splits.

Throughput = images / wall time of ``convert()`` (listing, decode, encode,
hashing, writing, index files, manifest), after one warm-up run per
configuration (imports, numba JIT, page cache), median of ``--repeats`` runs.
Peak RSS is this process plus its decode workers (see benchmarks.common.PeakRSS).
JSON goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import PeakRSS, machine_info, summarize

DATASETS = {
    # name: (path under the datasets folder, convert options)
    "imagenette-224/train": ("imagenette-224/train",
                             {"write_mode": "jpg", "jpeg_quality": 90, "student_resolution": 64}),
    "cifar100/train": ("cifar100/train", {"write_mode": "raw", "student_resolution": 16}),
}


def balanced_subset(src: Path, dst: Path, limit: int) -> tuple[Path, int]:
    """Symlink the first ceil(limit / classes) files of every class (sorted)."""
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = math.ceil(limit / len(classes))
    n = 0
    for c in classes:
        (dst / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:per_class]:
            (dst / c.name / f.name).symlink_to(f.resolve())
            n += 1
    return dst, n


def run_config(src: Path, opts: dict, workers: int, repeats: int, scratch: Path) -> dict:
    from dataset_tools.convert import convert
    from dataset_tools.convert_options import ConvertOptions

    options = ConvertOptions(workers=workers, **opts)
    rates, peaks = [], []
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        out = scratch / f"out_w{workers}_{rep}"
        with PeakRSS() as mem:
            res = convert(src, out, options, progress=False)
        shutil.rmtree(out)
        if rep:
            rates.append(res.images_per_sec)
            peaks.append(mem.peak_mb)
        print(f"  workers={workers} run {rep}{' (warm-up)' if rep == 0 else ''}: "
              f"{res.images_per_sec:.0f} images/s, peak RSS {mem.peak_mb:.0f} MiB",
              file=sys.stderr)
    return {"workers": workers, "images_per_sec": summarize(rates),
            "peak_rss_mb": round(max(peaks), 1), "num_samples": res.manifest["num_samples"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="datasets folder (default: $CQKD_DATA or "
                   "../shared/datasets)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (3)")
    p.add_argument("--limit", type=int, default=2000,
                   help="images per dataset, class-balanced (2000; 0 = the full split)")
    p.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    args = p.parse_args(argv)
    if args.data is None:
        from dataset_tools.locate import shared_datasets_dir
        args.data = shared_datasets_dir()
    worker_counts = [int(w) for w in args.workers.split(",")]

    results, load_before = {}, os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cqkd-bench-convert-") as tmp:
        scratch = Path(tmp)
        for name, (rel, opts) in DATASETS.items():
            src = args.data / rel
            if not src.is_dir():
                print(f"{src}: missing, skipped", file=sys.stderr)
                results[name] = {"error": f"{src} not found"}
                continue
            if args.limit:
                src, _ = balanced_subset(src, scratch / name.replace("/", "_") / "src", args.limit)
            print(f"{name}: {'subset of ' if args.limit else ''}{src}", file=sys.stderr)
            runs = [run_config(src, opts, w, args.repeats, scratch) for w in worker_counts]
            results[name] = {"options": opts, "runs": runs}
    report = {
        "benchmark": "dataset conversion (dataset_tools/convert.py)",
        "note": (f"class-balanced subset of about {args.limit} images per dataset (--limit); "
                 f"pass --limit 0 for the full splits" if args.limit else "full splits"),
        "method": f"images/sec of convert() wall time, 1 warm-up run excluded, median of "
                  f"{args.repeats}; peak RSS includes worker processes",
        "machine": machine_info(),
        # other work on the machine slows every number down; this says how busy it was
        "load_average_1m": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
