"""``runs/<name>/report.md``: the demo's table, reliability diagrams and a
throughput plot (matplotlib, written atomically)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

from dataset_tools.atomic import atomic_write_bytes  # noqa: E402


def throughput_plot(summary: dict, path: Path) -> Path:
    names = list(summary["results"])
    train = [summary["results"][n].get("train_images_per_sec", 0.0) for n in names]
    evals = [summary["results"][n]["eval_images_per_sec"] for n in names]
    eces = [summary["results"][n]["ece"] for n in names]
    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax, ax2 = fig.subplots(1, 2)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], train, width=0.4, label="training step (student loop)")
    ax.bar([i + 0.2 for i in x], evals, width=0.4, label="evaluation")
    ax.axhline(summary["loader_images_per_sec"], color="k", ls="--", lw=1, label="student loader alone")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("images / sec")
    ax.legend(fontsize=7)
    ax2.scatter(train, eces)
    for n, a, b in zip(names, train, eces):
        ax2.annotate(n, (a, b), fontsize=7)
    ax2.set_xlabel("training images / sec")
    ax2.set_ylabel("ECE (lower is better)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path


def write_report(root: Path, summary: dict) -> Path:
    root = Path(root)
    plot = throughput_plot(summary, root / "throughput.png")
    m, c = summary["machine"], summary["calibration"]
    lines = [f"# CQKD demo report: `{root.name}`", "",
             f"Machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores, GPU: {m.get('gpu') or 'none'}; "
             f"commit {m.get('git_commit')}. Recipe: `{summary['config']}`.", "",
             "| model | top-1 | ECE | NLL | Brier | train img/s | eval img/s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['top1']:.3f} | {r['ece']:.3f} | {r['nll']:.3f} | {r['brier']:.3f} | "
                     f"{r.get('train_images_per_sec', float('nan')):.0f} | {r['eval_images_per_sec']:.0f} |")
    lines += ["", f"Teacher temperature scaling: T = {c['temperature']:.2f}, ECE {c['ece_before']:.3f} -> "
              f"{c['ece_after_crossfit']:.3f} (2-fold cross-fitted on the held-out split).", "",
              f"Student loader alone: {summary['loader_images_per_sec']:.0f} images/sec.", "",
              "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()),
              "", "## Throughput and calibration", "", f"![throughput]({plot.name})", "",
              "## Reliability diagrams", ""]
    for name, r in summary["results"].items():
        png = Path(r["reliability_diagram"])
        lines.append(f"**{name}** (ECE {r['ece']:.3f})  ")
        lines.append(f"![{name}]({os.path.relpath(png, root)})")
        lines.append("")
    report = root / "report.md"
    atomic_write_bytes(report, lambda f: f.write("\n".join(lines).encode()))
    return report
