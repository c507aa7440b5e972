"""The sweep's search on a synthetic case whose answer is known: students are
replaced by a function of the temperature (their validation over-confidence
falls linearly in log T and crosses zero at a known T*), so the grid, the
bisection and the choice can be checked exactly."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from trainer import jobs, sweep
from trainer.recipe import Config

T_STAR = 1.5  # over-confidence crosses zero here


def fake_student(temperature: float, objective: str) -> dict:
    """Val metrics of a synthetic student: over-confidence 0.2 * log2(T*/T),
    top-1 falling slowly with T; teacher_smoothing never crosses zero."""
    g = 0.2 * math.log2(T_STAR / temperature) if objective == "hinton" else 0.1
    top1 = 0.50 - 0.001 * temperature
    return {"val_top1": top1, "val_confidence": top1 + g, "val_ece": abs(g), "val_nll": 2.0, "val_n": 400}


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch, cifar_stores):
    trained = []

    def fit(cfg, role):
        assert role == "student"
        trained.append(float(cfg.loss.temperature))
        cfg.student_dir.mkdir(parents=True, exist_ok=True)
        rec = {"epoch": 1, "step": 10, **fake_student(float(cfg.loss.temperature), cfg.loss.kd_objective)}
        (cfg.student_dir / "log.jsonl").write_text(json.dumps(rec) + "\n")
        return rec

    monkeypatch.setattr(jobs, "_fit", fit)
    monkeypatch.setattr("trainer.teacher.teacher_hash", lambda cfg: "sha256:synthetic")
    cfg = Config()
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(tmp_path), name="s", progress=False),
                  data=replace(cfg.data, train_store=str(cifar_stores["train"]), val_store=str(cifar_stores["val"])),
                  sweep=replace(cfg.sweep, temperatures=(1.0, 2.0, 4.0), objectives=("hinton", "teacher_smoothing"),
                                calibrated=(False,), refine=3, top1_tolerance=0.01,
                                top1_standard_errors=0.0))
    return cfg, trained


def test_bisection_finds_the_temperature_where_over_confidence_crosses_zero(fake_sweep):
    cfg, trained = fake_sweep
    result = sweep.run_sweep(cfg)
    refined = [r["temperature"] for r in result["runs"] if r.get("refined")]
    # grid 1, 2, 4 (twice: two objectives); the sign changes between 1 and 2 for hinton only
    expect = [math.sqrt(2.0)]
    expect.append(math.sqrt(expect[0] * 2.0))  # gap(1.414) > 0: the bracket is [1.414, 2]
    expect.append(math.sqrt(expect[0] * expect[1]))  # gap(1.68) < 0: [1.414, 1.68]
    assert refined == pytest.approx(expect)
    assert len(trained) == 6 + 3
    chosen = result["choice"]["temperature"]
    assert chosen == pytest.approx(expect[2]) and abs(chosen - T_STAR) < 0.05
    assert result["choice"]["objective"] == "hinton"
    # a rerun of the same recipe reuses the sweep, training nothing
    again = sweep.run_sweep(cfg)
    assert again["choice"] == result["choice"] and len(trained) == 9


def test_no_refinement_without_a_sign_change(fake_sweep):
    cfg, trained = fake_sweep
    cfg = replace(cfg, sweep=replace(cfg.sweep, objectives=("teacher_smoothing",)))
    result = sweep.run_sweep(cfg)
    assert len(result["runs"]) == 3 and not any(r.get("refined") for r in result["runs"])


def test_refine_zero_is_the_grid_alone(fake_sweep):
    cfg, trained = fake_sweep
    cfg = replace(cfg, sweep=replace(cfg.sweep, refine=0))
    assert len(sweep.run_sweep(cfg)["runs"]) == 6


def test_one_standard_error_rule():
    """400 val images at 40 % top-1: a standard error of 2.45 points."""
    from trainer.recipe import SweepSection

    def r(t, top1, ece):
        return {"temperature": t, "val_top1": top1, "val_ece": ece, "val_n": 400}

    runs = [r(1, 0.40, 0.08), r(2, 0.38, 0.03), r(4, 0.37, 0.01)]
    tol, se = sweep.tolerance(runs, SweepSection(top1_tolerance=0.01, top1_standard_errors=1.0))
    assert se == pytest.approx(math.sqrt(0.4 * 0.6 / 400)) and tol == pytest.approx(se)
    assert sweep.choose(runs, tol)["temperature"] == 2  # 2 points below the best: within 1 SE; 3: not
    tol2, _ = sweep.tolerance(runs, SweepSection(top1_tolerance=0.01, top1_standard_errors=0.0))
    assert tol2 == 0.01 and sweep.choose(runs, tol2)["temperature"] == 1
    assert sweep.tolerance(runs, SweepSection(top1_tolerance=0.05, top1_standard_errors=1.0))[0] == 0.05


def test_calibrated_students_are_chosen_by_validation_nll():
    """After each student's own temperature is fitted, ECE sits at the noise
    floor and would rank by noise: the lowest calibrated NLL wins instead."""
    def r(t, top1, ece, nll):
        return {"temperature": t, "val_top1": top1, "val_ece": ece, "val_nll": nll, "val_n": 400}

    runs = [r(1, 0.36, 0.085, 2.10), r(2, 0.375, 0.053, 2.02), r(4, 0.357, 0.040, 2.08)]
    assert sweep.choose(runs, 0.025)["temperature"] == 4  # the uncalibrated rule: lowest ECE in 1 SE
    assert sweep.choose(runs, 0.025, calibrated_students=True)["temperature"] == 2
    tie = [r(1, 0.36, 0.05, 2.0), r(2, 0.37, 0.06, 2.0), r(4, 0.37, 0.04, 2.0)]
    assert sweep.choose(tie, 0.0, calibrated_students=True)["temperature"] == 2  # higher top-1, lower T
    with pytest.raises(ValueError, match="finite"):
        sweep.choose([r(1, 0.3, 0.1, float("nan"))], 0.01, calibrated_students=True)


def test_a_calibrated_sweep_records_its_rule_and_a_changed_rule_rechooses_without_training(
        fake_sweep, monkeypatch):
    cfg, trained = fake_sweep
    cfg = replace(cfg, distill=replace(cfg.distill, calibrate_student=True))
    nll, base = {1.0: 2.3, 2.0: 2.1, 4.0: 2.2}, fake_student

    def student(temperature, objective):  # the fixture's fit reads this module's fake_student
        extra = 0.5 if objective == "teacher_smoothing" else 0.0
        return {**base(temperature, objective), "val_nll": nll[temperature] + extra}

    monkeypatch.setitem(globals(), "fake_student", student)
    result = sweep.run_sweep(cfg)
    assert len(result["runs"]) == 6 and not any(r.get("refined") for r in result["runs"])
    assert result["rule"] == sweep.RULE_CALIBRATED
    assert (result["choice"]["temperature"], result["choice"]["objective"]) == (2.0, "hinton")
    assert result["choice"]["val_nll"] == pytest.approx(2.1)
    # the same recipe under another rule: every run reused from its marker, the choice made again
    record = json.loads(cfg.sweep_file.read_text())
    cfg.sweep_file.write_text(json.dumps({**record, "rule": "an older rule", "choice": {}}))
    n = len(trained)
    again = sweep.run_sweep(cfg)
    assert len(trained) == n and again["rule"] == sweep.RULE_CALIBRATED
    assert again["choice"] == result["choice"]
