"""Benchmark suite entry point.

    python -m benchmarks run [loaders step convert e2e] --out FILE.json [--quick] [--threads N]
    python -m benchmarks compare BASE.json NEW.json [--threshold 5%] [--allow-missing]

``run`` runs each suite (default: all) in its own process and writes one JSON:
``{"machine": {...}, "config": {...}, "benchmarks": {suite: {figure: {median,
spread, repeats, unit, peak_rss_mb, higher_is_better, scope}}}, "suites":
{suite: {report, seconds}}}``. ``--quick`` shrinks every suite to a few
minutes in total on 2 CPU cores (use it in CI); without it the suites run at
their full sizes. ``compare`` prints base/new/change per figure and exits 1
when a gated figure regresses beyond the threshold or a suite/figure of
BASE is missing from NEW (``--allow-missing`` only lists those; the gating
rule is printed with the table; see benchmarks/compare.py). Bad input files
and other user-facing errors print ``error: ...`` and exit 2
(``CQKD_DEBUG=1`` shows the traceback).

The suites alone: ``python -m benchmarks.loaders|step|convert|e2e --help``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.suite import SUITES
from dataset_tools.errors import CqkdError, debug_enabled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run suites, write one JSON")
    r.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: all)")
    r.add_argument("--out", type=Path, required=True, help="JSON file to write")
    r.add_argument("--quick", action="store_true", help="a few minutes in total on 2 cores (CI)")
    r.add_argument("--threads", type=int, help="torch/OpenMP threads per suite (default: all cores)")
    r.add_argument("--data", type=Path, help="datasets folder (default: $CQKD_DATA or ../shared/datasets)")
    r.add_argument("--timeout", type=float, default=3600, help="seconds per suite (3600)")
    c = sub.add_parser("compare", help="compare two result files; exit 1 on a regression or "
                       "a suite/figure missing from NEW")
    c.add_argument("base", type=Path)
    c.add_argument("new", type=Path)
    c.add_argument("--threshold", default="5%", help="allowed change in the bad direction (5%%)")
    c.add_argument("--allow-missing", action="store_true",
                   help="list suites/figures of BASE missing from NEW but do not fail on them")
    a = p.parse_args(argv)
    try:
        if a.command == "run":
            unknown = [s for s in a.suites if s not in SUITES]
            if unknown:
                p.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
            from benchmarks.suite import run_all
            return run_all(a.suites or list(SUITES), a.out, a.quick, a.threads, a.data, a.timeout)

        from benchmarks.compare import main as compare_main
        return compare_main(a.base, a.new, a.threshold, allow_missing=a.allow_missing)
    except CqkdError as e:  # CompareError (bad input files) and the rest of the family
        if debug_enabled():
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
