"""``python -m benchmarks compare BASE.json NEW.json [--threshold 5%] [--allow-missing]``.

Prints one row per figure (base, new, change) and exits 1 when a *gated*
figure got worse by more than the threshold in its bad direction (down for
higher-is-better figures, up for lower-is-better ones such as ECE, latency
and memory). Which figures gate (see :mod:`benchmarks.suite` for scopes):

* ``relative`` (ratios to a reference measured in the same run) and
  ``quality`` (val ECE, top-1) figures gate whatever the machines;
  ``quality`` figures must also move by more than their ``min_change``;
* ``absolute`` figures (images/sec, ms, MiB) gate only when both files come
  from the same machine: same CPU model, core count and GPU;
* nothing in a suite gates when the two runs used different settings
  (``--quick`` vs full, a different thread count): they measured different things.

A suite or figure of BASE that vanished from NEW fails the gate too (exit 1,
each one named): a suite that crashed or a figure no longer measured must not
pass silently. ``--allow-missing`` lists them but lets them pass. Figures and
suites new in NEW are listed, never an error.
A regression whose repeats spread wider than the threshold is still one, but
is flagged "noisy": on a shared or busy machine rerun before believing it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dataset_tools.errors import CqkdError

RULE = ("gating rule: ratio ('relative') and calibration/accuracy ('quality') figures gate on "
        "any machines; absolute figures (images/s, ms, MiB) gate only when both files come from "
        "the same machine (CPU model + cores + GPU); no figure of a suite gates when its run "
        "settings differ (--quick, --threads)")


class CompareError(CqkdError, ValueError):
    pass


def parse_threshold(text: str) -> float:
    """'5%' -> 0.05; a bare number >= 1 is percent ('5' -> 0.05), < 1 a fraction ('0.05')."""
    t = str(text).strip()
    try:
        v = float(t.rstrip("%"))
    except ValueError:
        raise CompareError(f"--threshold {text!r}: expected a percentage such as 5% or 0.05") from None
    frac = v / 100 if t.endswith("%") or v >= 1 else v
    if not 0 <= frac < 10:
        raise CompareError(f"--threshold {text!r}: out of range")
    return frac


def load_results(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CompareError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not JSON ({e}); expected the output of "
                           f"'python -m benchmarks run --out FILE.json'") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise CompareError(f"{path}: no 'benchmarks' object; expected the output of "
                           f"'python -m benchmarks run --out FILE.json'")
    return data


def machine_key(result: dict) -> tuple:
    m = result.get("machine") or {}
    return (m.get("cpu"), m.get("usable_cores") or m.get("logical_cores"), m.get("gpu"))


def settings_key(result: dict) -> tuple:
    c = result.get("config") or {}
    return (c.get("quick"), c.get("threads"))


@dataclass
class Row:
    figure: str
    unit: str = ""
    base: Optional[float] = None
    new: Optional[float] = None
    change: Optional[float] = None  # (new - base) / |base|
    status: str = ""
    regressed: bool = False


def _relative_width(f: dict) -> float:
    lo, hi = f.get("spread", [f["median"], f["median"]])
    return (hi - lo) / abs(f["median"]) if f["median"] else 0.0


def compare_figure(name: str, b: dict, n: dict, threshold: float, same_machine: bool,
                   same_settings: bool) -> Row:
    row = Row(name, n.get("unit", b.get("unit", "")), b["median"], n["median"])
    base, new = b["median"], n["median"]
    if base == 0 or not (math.isfinite(base) and math.isfinite(new)):
        row.status = "not comparable (zero or non-finite base)"
        return row
    row.change = (new - base) / abs(base)
    higher = n.get("higher_is_better", b.get("higher_is_better", True))
    worse = -row.change if higher else row.change  # > 0: moved in the bad direction
    scope = n.get("scope", b.get("scope", "absolute"))
    min_change = n.get("min_change", b.get("min_change", 0.0)) or 0.0
    if not same_settings:
        row.status = "shown only (settings differ)"
    elif scope == "absolute" and not same_machine:
        row.status = "shown only (absolute, other machine)"
    elif worse > threshold and abs(new - base) > min_change:
        row.status, row.regressed = "REGRESSION", True
        width = max(_relative_width(b), _relative_width(n))
        if width > threshold:  # still gates, but say that the repeats disagreed this much
            row.status += f" (noisy: repeats span {100 * width:.0f}% of the median)"
    elif worse < -threshold and abs(new - base) > min_change:
        row.status = "improved"
    else:
        row.status = "ok"
    return row


def compare(base: dict, new: dict, threshold: float) -> tuple[list[Row], dict]:
    same_machine = machine_key(base) == machine_key(new)
    same_settings = settings_key(base) == settings_key(new)
    rows = []
    suites = list(dict.fromkeys([*base["benchmarks"], *new["benchmarks"]]))
    for suite in suites:
        bf, nf = base["benchmarks"].get(suite), new["benchmarks"].get(suite)
        if bf is None or nf is None:
            why = (new if nf is None else base).get("suites", {}).get(suite, {}).get("error")
            side = "NEW" if nf is None else "BASE"
            rows.append(Row(f"{suite}/*", status=f"suite missing in {side}" + (f" ({why})" if why else "")))
            continue
        for name in dict.fromkeys([*bf, *nf]):
            full = f"{suite}/{name}"
            if name not in nf:
                rows.append(Row(full, bf[name].get("unit", ""), base=bf[name]["median"],
                                status="missing in NEW"))
            elif name not in bf:
                rows.append(Row(full, nf[name].get("unit", ""), new=nf[name]["median"],
                                status="new figure (not in BASE)"))
            else:
                rows.append(compare_figure(full, bf[name], nf[name], threshold, same_machine,
                                           same_settings))
    return rows, {"same_machine": same_machine, "same_settings": same_settings}


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"


def format_table(rows: list[Row]) -> str:
    width = max([len(r.figure) for r in rows] + [6])
    lines = [f"{'figure':{width}s} {'unit':>12s} {'base':>10s} {'new':>10s} {'change':>8s}  status"]
    for r in rows:
        ch = "-" if r.change is None else f"{100 * r.change:+.1f}%"
        lines.append(f"{r.figure:{width}s} {r.unit[:12]:>12s} {_fmt(r.base):>10s} "
                     f"{_fmt(r.new):>10s} {ch:>8s}  {r.status}")
    return "\n".join(lines)


def main(base_path, new_path, threshold_text: str = "5%", allow_missing: bool = False) -> int:
    threshold = parse_threshold(threshold_text)
    base, new = load_results(base_path), load_results(new_path)
    rows, info = compare(base, new, threshold)
    print(format_table(rows))
    print()
    print(RULE)
    print(f"threshold {100 * threshold:g}%; same machine: {'yes' if info['same_machine'] else 'no'} "
          f"(BASE {machine_key(base)}, NEW {machine_key(new)}); same settings: "
          f"{'yes' if info['same_settings'] else 'no'} (quick, threads: BASE {settings_key(base)}, "
          f"NEW {settings_key(new)})")
    vanished = [r.figure for r in rows
                if r.status == "missing in NEW" or r.status.startswith("suite missing in NEW")]
    only_new = [r.figure for r in rows if r.status.startswith("suite missing in BASE")]
    if only_new:
        print(f"suites only in NEW (not gated): {', '.join(only_new)}")
    failed = False
    if vanished:
        if allow_missing:
            print(f"missing in NEW (allowed by --allow-missing): {', '.join(vanished)}")
        else:
            print(f"MISSING in NEW (in BASE, vanished; pass --allow-missing to accept): "
                  f"{', '.join(vanished)}")
            failed = True
    bad = [r for r in rows if r.regressed]
    if bad:
        print("REGRESSED beyond the threshold: " + ", ".join(
            f"{r.figure} ({100 * r.change:+.1f}%)" for r in bad))
        failed = True
    elif not failed:
        print("no gated figure regressed beyond the threshold")
    return 1 if failed else 0
