"""The demo report's pictures: the reliability curves of the teacher and
every student in one figure (from the test logits files evaluate writes),
the sweep's validation top-1 and ECE against T when there is a sweep, and
the throughput plot; the report links them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from benchmarks import report
from trainer.evaluation.calibration import calibration_metrics, reliability_curve

PNG = b"\x89PNG\r\n\x1a\n"
MODELS = {"teacher": 4.0, "supervised_lowres": 1.0, "kd": 0.5, "recommended": 1.5}  # logit scale


def fake_model(root: Path, name: str, scale: float, seed: int) -> dict:
    """A model's evaluate result over saved test logits: 600 samples, 10
    classes, right 60 % of the time, confidence set by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (600,), generator=g)
    logits = torch.randn(600, 10, generator=g)
    right = torch.rand(600, generator=g) < 0.6
    logits[right, labels[right]] += 2.0
    logits *= scale
    path = root / name / "final_test_logits.pt"
    path.parent.mkdir(parents=True)
    torch.save({"logits": logits, "labels": labels}, path)
    m = calibration_metrics(logits, labels)
    return {"logits_file": str(path), "reliability_diagram": str(root / name / "final_reliability.png"),
            "seeds": 1, "train_images_per_sec": 100.0 + seed, "eval_images_per_sec": 500.0,
            "loop_efficiency": 0.8, **{k: m[k] for k in ("top1", "ece", "nll", "brier")},
            "top1_std": 0.0, "ece_std": 0.0}


def sweep_result(root: Path) -> dict:
    runs = [{"objective": o, "calibrated": c, "temperature": t, "tag": f"sweep/{o}{'_cal' if c else ''}_T{t:g}",
             "val_top1": 0.5 + 0.01 * t, "val_ece": 0.1 / t + (0.02 if c else 0.0), "val_nll": 2.0 + 0.1 * t}
            for o in ("hinton", "teacher_smoothing") for c in (False, True) for t in (1.0, 2.0, 4.0)]
    choice = min(runs, key=lambda r: r["val_ece"])
    return {"runs": runs, "choice": choice, "rule": "lowest val ECE", "epochs": 2,
            "plot": str(root / "sweep" / "sweep.png"),  # gone: the report draws it beside itself
            "cost": {"seconds": 10.0, "online_teacher_seconds_estimate": 25.0}}


def summary(root: Path, with_sweep: bool = True) -> dict:
    results = {name: fake_model(root, name, scale, i) for i, (name, scale) in enumerate(MODELS.items())}
    verdict = {"top1_gain_over_supervised": 0.02, "ece_recommended": 0.03, "ece_supervised": 0.05,
               "ece_kd": 0.08, "top1_at_least_1pt_above_supervised": True,
               "ece_not_above_supervised": True, "ece_at_most_half_of_kd": True, "all": True}
    return {"results": results, "machine": {"cpu": "test cpu", "logical_cores": 2}, "config": "x.yaml",
            "calibration": {"temperature": 1.7, "ece_before": 0.2, "ece_after_crossfit": 0.05},
            "sweep": sweep_result(root) if with_sweep else None, "verdict": verdict, "seeds": 1,
            "splits": {"train": "t", "val": "v", "test": "s", "val_fraction": 0.2},
            "loader_images_per_sec": 1000.0, "plain_loop_images_per_sec": {"teacher": 200.0, "kd_cached": 400.0},
            "loop_efficiency": {"teacher": {"median": 0.97, "min": 0.95, "max": 0.99, "rounds": 3,
                                            "pairing": "steps"},
                                "kd_cached": {"median": 0.93, "min": 0.9, "max": 0.94, "rounds": 3,
                                              "pairing": "steps"}},
            "stage_seconds": {"teacher": 1.0}, "wall_seconds": 3.0}


def links(md: str) -> list[str]:
    return [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]


def test_report_figures_exist_and_are_linked(tmp_path):
    s = summary(tmp_path)
    md_path = report.write_report(tmp_path, s)
    md = md_path.read_text()
    for name in ("reliability_overlay.png", "throughput.png", "sweep.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG), name
        assert name in links(md), name
    assert "## The temperature sweep (validation split)" in md
    assert "| hinton **(chosen)** | False | 4 | 0.540 | 0.025 | 2.400 |" in md  # with the NLL the rule may use
    assert "Rule: lowest val ECE." in md
    assert "Not drawn" not in md
    assert ("teacher 0.97 (0.95-0.99 over 3 rounds, each step paired; plain loop 200 img/s); "
            "kd_cached 0.93 (0.90-0.94 over 3 rounds, each step paired; plain loop 400 img/s)") in md


def test_overlay_has_one_curve_per_model_from_its_logits(tmp_path):
    s = summary(tmp_path)
    curves = report.reliability_curves(s)
    assert list(curves) == list(MODELS)
    fig = report.overlay_figure(curves)
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("perfect")]
    assert [ln.get_label().split(" (")[0] for ln in lines] == list(MODELS)
    ece = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")  # the independent oracle
    for line, (name, curve) in zip(lines, curves.items()):
        saved = torch.load(s["results"][name]["logits_file"], weights_only=True)
        x, y = line.get_data()
        assert list(x) == pytest.approx(curve["confidence"].tolist())
        assert list(y) == pytest.approx(curve["accuracy"].tolist())
        # the drawn points are the bins of the ECE in the table
        from_curve = float((curve["count"] * (curve["accuracy"] - curve["confidence"]).abs()).sum() / 600)
        assert from_curve == pytest.approx(float(ece(saved["logits"].softmax(1), saved["labels"])), abs=1e-6)
    # the teacher (scale 4) is the most overconfident: its curve lies furthest below the diagonal
    gaps = {n: float((c["confidence"] - c["accuracy"]).mul(c["count"]).sum() / 600) for n, c in curves.items()}
    assert max(gaps, key=gaps.get) == "teacher"


def test_without_a_sweep_and_a_missing_logits_file(tmp_path):
    s = summary(tmp_path, with_sweep=False)
    Path(s["results"]["kd"]["logits_file"]).unlink()
    md = report.write_report(tmp_path, s).read_text()
    assert "temperature sweep" not in md and not (tmp_path / "sweep.png").exists()
    assert "Not drawn (no test logits file): kd." in md
    assert (tmp_path / "reliability_overlay.png").read_bytes().startswith(PNG)
    assert list(report.reliability_curves(s)) == ["teacher", "supervised_lowres", "recommended"]


def test_the_sweep_plot_is_the_sweeps_own(tmp_path):
    """The report links the file the sweep drew (trainer.sweep.plot_sweep) and
    does not draw it again."""
    from trainer.sweep import plot_sweep

    s = summary(tmp_path)
    drawn = plot_sweep(s["sweep"], Path(s["sweep"]["plot"]).parent.mkdir(parents=True) or Path(s["sweep"]["plot"]))
    before = drawn.stat().st_mtime_ns
    md = report.write_report(tmp_path, s).read_text()
    assert drawn.stat().st_mtime_ns == before and "sweep/sweep.png" in links(md)
    assert json.dumps(s["sweep"])  # the summary stays JSON (demo.json)


def test_reliability_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="reliability_curve: scores contain NaN or Inf"):
        reliability_curve(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
