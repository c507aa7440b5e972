"""``runs/<name>/report.md``: the demo's headline and table, the reliability
curves of teacher and students overlaid in one figure (from the test logits
files evaluate writes), the sweep's validation top-1 and ECE against T (its
own plot, when there is a sweep), a throughput plot and the per-model
reliability diagrams (matplotlib, written atomically)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

from dataset_tools.atomic import atomic_write_bytes  # noqa: E402

BINS = 15


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path


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
    ax2.set_ylabel("test ECE (lower is better)")
    fig.tight_layout()
    return _save(fig, path)


def reliability_curves(summary: dict) -> dict[str, dict]:
    """Each model's reliability curve (:func:`reliability_curve`, the binning
    of the ECE in the table) from the test logits its evaluate wrote (the
    first seed of each student); models without a logits file are left out."""
    import torch

    from trainer.evaluation.calibration import reliability_curve

    curves = {}
    for name, r in summary["results"].items():
        if r.get("logits_file") and Path(r["logits_file"]).is_file():
            saved = torch.load(r["logits_file"], weights_only=True)
            curves[name] = {**reliability_curve(saved["logits"], saved["labels"], BINS), "ece": r["ece"]}
    return curves


def overlay_figure(curves: dict[str, dict]) -> Figure:
    """Accuracy against confidence, one curve per model, over the diagonal."""
    fig = Figure(figsize=(5.5, 5), dpi=110)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, c in curves.items():
        ax.plot(c["confidence"].numpy(), c["accuracy"].numpy(), "o-", ms=3,
                label=f"{name} (ECE {c['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title="reliability on the test split")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def reliability_overlay(summary: dict, path: Path) -> tuple[Path, list[str]]:
    """The overlay figure at ``path``, and the models it could not draw."""
    curves = reliability_curves(summary)
    _save(overlay_figure(curves), path)
    return path, [n for n in summary["results"] if n not in curves]


def sweep_plot(sweep: dict, root: Path) -> Path:
    """The sweep's own plot (``trainer.sweep.plot_sweep``), drawn again beside
    the report if its file is gone."""
    from trainer.sweep import plot_sweep

    path = Path(sweep.get("plot") or root / "sweep.png")
    return path if path.is_file() else plot_sweep(sweep, root / "sweep.png")


def _cell(r: dict, key: str) -> str:
    return f"{r[key]:.3f} ± {r[f'{key}_std']:.3f}" if r.get("seeds", 1) > 1 else f"{r[key]:.3f}"


def _sweep_lines(sw: dict, root: Path) -> list[str]:
    ch = sw["choice"]
    lines = ["## The temperature sweep (validation split)", "",
             f"![sweep]({os.path.relpath(sweep_plot(sw, root), root)})", "",
             "| objective | calibrated teacher | T | val top-1 | val ECE |", "|---|---|---|---|---|"]
    for r in sw["runs"]:
        star = " **(chosen)**" if r["tag"] == ch["tag"] else ""
        lines.append(f"| {r['objective']}{star} | {r['calibrated']} | {r['temperature']:g} | "
                     f"{r['val_top1']:.3f} | {r['val_ece']:.3f} |")
    return lines + [""]


def write_report(root: Path, summary: dict) -> Path:
    """``root/report.md`` and its figures; the sweep's part only when the
    summary has a sweep."""
    from benchmarks.demo import headline

    root = Path(root)
    plot = throughput_plot(summary, root / "throughput.png")
    overlay, undrawn = reliability_overlay(summary, root / "reliability_overlay.png")
    m, c, sw = summary["machine"], summary["calibration"], summary.get("sweep")
    lines = [f"# CQKD demo report: `{root.name}`", "",
             f"Machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores, GPU: {m.get('gpu') or 'none'}; "
             f"commit {m.get('git_commit')}. Recipe: `{summary['config']}`. Wall time "
             f"{summary['wall_seconds']:.0f} s.", "",
             f"**Headline** (test split, means over {summary['seeds']} seed(s)): {headline(summary['verdict'])}.",
             "",
             f"Splits: train `{summary['splits']['train']}`, validation `{summary['splits']['val']}` "
             f"({summary['splits']['val_fraction']:.0%} of each training class, held out at convert time; "
             f"everything fitted or chosen uses it), test `{summary['splits']['test']}` (this table only).", ""]
    if sw:
        ch, cost = sw["choice"], sw["cost"]
        lines += [f"The recommended student: the sweep's choice on the validation split, T = {ch['temperature']:g}, "
                  f"objective `{ch['objective']}`, calibrated teacher {'on' if ch['calibrated'] else 'off'} "
                  f"(rule: {sw['rule']}). The sweep trained {len(sw['runs'])} students from the cache in "
                  f"{cost['seconds']:.0f} s"
                  + (f"; with the online teacher the same sweep would take about "
                     f"{cost['online_teacher_seconds_estimate']:.0f} s" if cost.get('online_teacher_seconds_estimate')
                     else "") + ".", ""]
    lines += ["| model | seeds | top-1 | ECE | NLL | Brier | train img/s | loop efficiency | eval img/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r.get('seeds', 1)} | {_cell(r, 'top1')} | {_cell(r, 'ece')} | "
                     f"{r['nll']:.3f} | {r['brier']:.3f} | {r.get('train_images_per_sec', float('nan')):.0f} | "
                     f"{r.get('loop_efficiency', float('nan')):.2f} | {r['eval_images_per_sec']:.0f} |")
    lines += ["", f"Teacher temperature scaling on the validation split: T = {c['temperature']:.2f}, "
              f"ECE {c['ece_before']:.3f} -> {c['ece_after_crossfit']:.3f} (2-fold cross-fitted).", "",
              f"Student loader alone: {summary['loader_images_per_sec']:.0f} images/sec. Loop efficiency = "
              f"training images/sec over a plain PyTorch loop of the same model, batch and resolution on "
              f"random in-memory tensors (benchmarks/loop_efficiency.py): teacher "
              f"{summary['plain_loop_images_per_sec']['teacher']:.0f}, student "
              f"{summary['plain_loop_images_per_sec']['student']:.0f} images/sec.", "",
              "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()),
              "", "## Reliability of teacher and students", "", f"![reliability]({overlay.name})", ""]
    if undrawn:
        lines += [f"Not drawn (no test logits file): {', '.join(undrawn)}.", ""]
    if sw:
        lines += _sweep_lines(sw, root)
    lines += ["## Throughput and calibration", "", f"![throughput]({plot.name})", "",
              "## Reliability diagrams (first seed)", ""]
    for name, r in summary["results"].items():
        png = Path(r["reliability_diagram"])
        lines.append(f"**{name}** (ECE {r['ece']:.3f})  ")
        lines.append(f"![{name}]({os.path.relpath(png, root)})")
        lines.append("")
    report = root / "report.md"
    atomic_write_bytes(report, lambda f: f.write("\n".join(lines).encode()))
    return report
