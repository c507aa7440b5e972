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
             "| objective | calibrated teacher | T | val top-1 | val ECE | val NLL |", "|---|---|---|---|---|---|"]
    for r in sw["runs"]:
        star = " **(chosen)**" if r["tag"] == ch["tag"] else ""
        lines.append(f"| {r['objective']}{star} | {r['calibrated']} | {r['temperature']:g} | "
                     f"{r['val_top1']:.3f} | {r['val_ece']:.3f} | {r.get('val_nll', float('nan')):.3f} |")
    return lines + ["", f"Rule: {sw['rule']}." if sw.get("rule") else ""]


def write_report(root: Path, summary: dict) -> Path:
    """``root/report.md`` and its figures; the sweep's part only when the
    summary has a sweep."""
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
    nan = float("nan")
    lines += ["| model | seeds | top-1 | ECE | ECE floor | ECE if val-TS | NLL | Brier | train img/s | "
              "loop efficiency | eval img/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r.get('seeds', 1)} | {_cell(r, 'top1')} | {_cell(r, 'ece')} | "
                     f"{r.get('ece_floor', nan):.3f} | {r.get('posthoc_ece', nan):.3f} | "
                     f"{r['nll']:.3f} | {r['brier']:.3f} | {r.get('train_images_per_sec', nan):.0f} | "
                     f"{r.get('loop_efficiency', nan):.2f} | {r['eval_images_per_sec']:.0f} |")
    lines += ["", "ECE floor: the ECE a perfectly calibrated model with the same confidences shows on this "
              "many test images (labels drawn from its own confidences): sampling noise alone; ECEs near "
              "it, and differences below it, say nothing about calibration. ECE if val-TS: after a "
              "temperature fitted on the validation split (post hoc, for reference; the recommended "
              "student has its own folded in: `distill.calibrate_student`)."]
    lines += ["", f"Teacher temperature scaling on the validation split: T = {c['temperature']:.2f}, "
              f"ECE {c['ece_before']:.3f} -> {c['ece_after_crossfit']:.3f} (2-fold cross-fitted).", "",
              f"Student loader alone: {summary['loader_images_per_sec']:.0f} images/sec. Loop efficiency = "
              f"training images/sec over a plain PyTorch loop of the same model, batch and resolution on "
              f"random in-memory tensors (benchmarks/loop_efficiency.py), measured after the runs by "
              f"benchmarks.loop_pairs on this recipe: {loop_efficiency_line(summary)}.", "",
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


def headline(v: dict) -> str:
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    return (f"recommended vs supervised low-res: top-1 {v['top1_gain_over_supervised'] * 100:+.1f} pt "
            f"(>= +1 pt: {yes(v['top1_at_least_1pt_above_supervised'])}); ECE {v['ece_recommended']:.3f} vs "
            f"{v['ece_supervised']:.3f} (not above: {yes(v['ece_not_above_supervised'])}); vs plain KD "
            f"{v['ece_kd']:.3f} (at most half: {yes(v['ece_at_most_half_of_kd'])}); the supervised student "
            f"temperature-scaled on val would have ECE {v.get('ece_supervised_after_val_ts', float('nan')):.3f}")


def loop_efficiency_line(summary: dict) -> str:
    """Each job kind's paired loop efficiency (median, range over rounds) and
    its plain loop's images/sec."""
    eff, plain = summary["loop_efficiency"], summary["plain_loop_images_per_sec"]
    pairing = {"steps": "each step paired", "epochs": "epochs paired"}
    return "; ".join(f"{kind} {e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f} over {e['rounds']} rounds, "
                     f"{pairing.get(e['pairing'], e['pairing'])}; plain loop {plain[kind]:.0f} img/s)"
                     for kind, e in eff.items())


def print_table(summary: dict) -> None:
    n = summary["seeds"]
    rows = [("model", "seeds", "top-1", "ECE", "ECE floor", "ECE if val-TS", "NLL", "Brier", "train img/s",
             "loop eff.", "eval img/s")]
    nan = float("nan")
    for name, r in summary["results"].items():
        rows.append((name, str(r["seeds"]), f"{r['top1']:.3f} ±{r['top1_std']:.3f}",
                     f"{r['ece']:.3f} ±{r['ece_std']:.3f}", f"{r.get('ece_floor', nan):.3f}",
                     f"{r.get('posthoc_ece', nan):.3f}",
                     f"{r['nll']:.3f}", f"{r['brier']:.3f}",
                     f"{r['train_images_per_sec']:.0f}", f"{r['loop_efficiency']:.2f}",
                     f"{r['eval_images_per_sec']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\ntest split; students: mean ± std over {n} seed(s); 'ECE floor': the ECE a perfectly "
          f"calibrated model shows on this many images (sampling noise); 'ECE if val-TS': after a "
          f"temperature fitted on the validation split (post hoc, for reference)")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    c, sw = summary["calibration"], summary["sweep"]
    print(f"\nteacher temperature T={c['temperature']:.2f} fitted on the validation split: ECE "
          f"{c['ece_before']:.3f} -> {c['ece_after_crossfit']:.3f} (2-fold cross-fitted on val)")
    ch = sw["choice"]
    cost = sw["cost"]
    online = cost.get("online_teacher_seconds_estimate")
    print(f"sweep ({len(sw['runs'])} students on val): T={ch['temperature']:g}, {ch['objective']}, calibrated "
          f"teacher {'on' if ch['calibrated'] else 'off'}; cost {cost['seconds']:.0f} s from the cache"
          + (f" vs ~{online:.0f} s with the online teacher" if online else ""))
    print("HEADLINE: " + headline(summary["verdict"]))
    print(f"student loader alone: {summary['loader_images_per_sec']:.0f} images/sec; loop eff. (job over "
          f"a plain PyTorch loop, benchmarks.loop_pairs): {loop_efficiency_line(summary)}")
    print("wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items()))
    print(f"wall time: {summary['wall_seconds']:.0f} s")
