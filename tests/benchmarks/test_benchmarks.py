"""Benchmark plumbing: compare's gating rules on synthetic result files, the
step benchmark on a tiny configuration (keys and positive rates, no speed
assertions), its profiler trace, and the suite runner."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from benchmarks import suite
from benchmarks.__main__ import main as bench_cli
from benchmarks.compare import CompareError, parse_threshold

MACHINE = {"cpu": "Test CPU 9000", "usable_cores": 2, "logical_cores": 2, "gpu": None}


def fig(median, unit="x", higher=True, scope="relative", **extra):
    return suite.figure(median, median * 0.98, median * 1.02, 5, unit, higher, scope, 100.0, **extra)


def result(machine=MACHINE, quick=True, **benchmarks):
    return {"machine": dict(machine), "config": {"quick": quick, "threads": None},
            "benchmarks": benchmarks, "suites": {}}


BASE = result(
    step={"kd_cached_over_ce": fig(1.0), "ce.images_per_sec": fig(1000.0, "images/s", scope="absolute"),
          "peak_rss_mb": fig(800.0, "MiB", higher=False, scope="absolute")},
    e2e={"student_kd.val_ece": fig(0.10, "", higher=False, scope="quality", min_change=0.005)})


def run_compare(tmp_path, capsys, base, new, threshold="5%", *extra):
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    rc = bench_cli(["compare", str(tmp_path / "base.json"), str(tmp_path / "new.json"),
                    "--threshold", threshold, *extra])
    return rc, capsys.readouterr().out


def changed(base=BASE, machine=None, **changes):
    """A copy of ``base`` with figure medians scaled: ``changes['suite/figure'] = factor``."""
    new = copy.deepcopy(base)
    if machine is not None:
        new["machine"] = machine
    for key, factor in changes.items():
        s, name = key.split("/")
        new["benchmarks"][s][name]["median"] *= factor
    return new


def regressed_line(out):
    return next((line for line in out.splitlines() if line.startswith("REGRESSED")), "")


def test_ratio_drop_beyond_threshold_fails_and_names_the_figure(tmp_path, capsys):
    rc, out = run_compare(tmp_path, capsys, BASE, changed(**{"step/kd_cached_over_ce": 0.90}))
    assert rc == 1
    assert "step/kd_cached_over_ce" in regressed_line(out) and "-10.0%" in regressed_line(out)
    assert "gating rule" in out  # the rule is documented in the output
    assert "noisy" not in out
    noisy = changed(**{"step/kd_cached_over_ce": 0.90})
    noisy["benchmarks"]["step"]["kd_cached_over_ce"]["spread"] = [0.5, 1.2]
    rc, out = run_compare(tmp_path, capsys, BASE, noisy)  # still gates, but says so
    assert rc == 1 and "noisy: repeats span 78%" in out


def test_small_drops_and_improvements_pass(tmp_path, capsys):
    rc, out = run_compare(tmp_path, capsys, BASE, changed(**{"step/kd_cached_over_ce": 0.97}))
    assert rc == 0 and not regressed_line(out)
    rc, out = run_compare(tmp_path, capsys, BASE, changed(**{"step/kd_cached_over_ce": 1.5,
                                                             "e2e/student_kd.val_ece": 0.5,
                                                             "step/peak_rss_mb": 0.5}))
    assert rc == 0 and out.count("improved") == 3
    # a looser threshold lets the 10% drop through
    rc, _ = run_compare(tmp_path, capsys, BASE, changed(**{"step/kd_cached_over_ce": 0.90}), "15%")
    assert rc == 0


def test_lower_is_better_figures_regress_upwards(tmp_path, capsys):
    rc, out = run_compare(tmp_path, capsys, BASE, changed(**{"e2e/student_kd.val_ece": 1.2}))
    assert rc == 1 and "e2e/student_kd.val_ece" in regressed_line(out)
    rc, out = run_compare(tmp_path, capsys, BASE, changed(**{"step/peak_rss_mb": 1.2}))
    assert rc == 1 and "step/peak_rss_mb" in regressed_line(out)
    # ECE 0.100 -> 0.104 is +4% of a small number but within min_change: not a regression
    rc, _ = run_compare(tmp_path, capsys, BASE, changed(**{"e2e/student_kd.val_ece": 1.04}), "1%")
    assert rc == 0


def test_absolute_figures_gate_only_on_the_same_machine(tmp_path, capsys):
    slower = {"step/ce.images_per_sec": 0.5, "step/peak_rss_mb": 2.0}
    rc, out = run_compare(tmp_path, capsys, BASE, changed(**slower))
    assert rc == 1 and "step/ce.images_per_sec" in regressed_line(out)
    other = dict(MACHINE, cpu="Other CPU", usable_cores=16, gpu="NVIDIA H100")
    rc, out = run_compare(tmp_path, capsys, BASE, changed(machine=other, **slower))
    assert rc == 0 and "absolute, other machine" in out and "same machine: no" in out
    # ratios still gate across machines
    rc, out = run_compare(tmp_path, capsys, BASE,
                          changed(machine=other, **{"step/kd_cached_over_ce": 0.8}))
    assert rc == 1 and "kd_cached_over_ce" in regressed_line(out)


def test_different_settings_do_not_gate(tmp_path, capsys):
    new = changed(**{"step/kd_cached_over_ce": 0.5})
    new["config"]["quick"] = False
    rc, out = run_compare(tmp_path, capsys, BASE, new)
    assert rc == 0 and "settings differ" in out


def vanished_run():
    """BASE with one figure and the whole e2e suite gone (it crashed), one figure added."""
    new = copy.deepcopy(BASE)
    del new["benchmarks"]["step"]["kd_cached_over_ce"]
    new["benchmarks"]["step"]["extra"] = fig(2.0)
    del new["benchmarks"]["e2e"]
    new["suites"]["e2e"] = {"error": "exit code 1"}
    return new


def missing_line(out):
    return next((line for line in out.splitlines() if line.lower().startswith("missing in new")), "")


def test_missing_figures_and_suites_fail_the_gate(tmp_path, capsys):
    rc, out = run_compare(tmp_path, capsys, BASE, vanished_run())
    assert rc == 1  # a vanished suite or figure is a failure of the gate
    assert "step/kd_cached_over_ce" in out and "missing in NEW" in out
    assert "new figure" in out and "suite missing in NEW (exit code 1)" in out
    line = missing_line(out)  # every vanished one is named on the verdict line
    assert line.startswith("MISSING in NEW") and "--allow-missing" in line
    assert "step/kd_cached_over_ce" in line and "e2e/*" in line and "step/extra" not in line
    assert "no gated figure regressed" not in out
    # one vanished figure alone fails too, and so does one vanished suite alone
    only_fig = copy.deepcopy(BASE)
    del only_fig["benchmarks"]["e2e"]["student_kd.val_ece"]
    rc, out = run_compare(tmp_path, capsys, BASE, only_fig)
    assert rc == 1 and "e2e/student_kd.val_ece" in missing_line(out)
    only_suite = copy.deepcopy(BASE)
    del only_suite["benchmarks"]["step"]
    rc, out = run_compare(tmp_path, capsys, BASE, only_suite)
    assert rc == 1 and "step/*" in missing_line(out)


def test_allow_missing_lists_but_passes(tmp_path, capsys):
    rc, out = run_compare(tmp_path, capsys, BASE, vanished_run(), "5%", "--allow-missing")
    assert rc == 0
    line = missing_line(out)
    assert "allowed by --allow-missing" in line
    assert "step/kd_cached_over_ce" in line and "e2e/*" in line
    assert "no gated figure regressed" in out
    # it excuses only what vanished: a regression of what remains still fails
    new = vanished_run()
    new["benchmarks"]["step"]["ce.images_per_sec"]["median"] *= 0.5
    rc, out = run_compare(tmp_path, capsys, BASE, new, "5%", "--allow-missing")
    assert rc == 1 and "step/ce.images_per_sec" in regressed_line(out)


def test_new_suites_and_figures_never_fail(tmp_path, capsys):
    new = copy.deepcopy(BASE)
    new["benchmarks"]["step"]["extra"] = fig(2.0)
    new["benchmarks"]["convert"] = {"images_per_sec": fig(50.0, "images/s", scope="absolute")}
    rc, out = run_compare(tmp_path, capsys, BASE, new)
    assert rc == 0 and "new figure" in out and "suite missing in BASE" in out
    assert "suites only in NEW (not gated): convert/*" in out and not missing_line(out)


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    assert [parse_threshold(t) for t in ("5%", "5", "0.05")] == [0.05, 0.05, 0.05]
    with pytest.raises(CompareError, match="percentage"):
        parse_threshold("five")
    (tmp_path / "x.json").write_text('{"results": {}}')
    assert bench_cli(["compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "x.json" in err and "benchmarks run" in err


def test_suite_figures_from_reports():
    """Hand-made suite reports -> figures (hand-computed ratios and spreads)."""
    loaders = {"results": {
        "reference": {"images_per_sec": 100.0, "window_rates": [100.0, 80.0], "images_per_epoch": 1000,
                      "peak_rss_mb": 50.0},
        "ffcv": {"images_per_sec": 400.0, "window_rates": [500.0, 400.0], "images_per_epoch": 1000,
                 "peak_rss_mb": 70.0},
        "ffcv_stock": {"images_per_sec": 200.0, "window_rates": [200.0], "images_per_epoch": 1000,
                       "peak_rss_mb": 90.0},
        "ffcv_lowres": {"images_per_sec": 900.0, "window_rates": [900.0], "images_per_epoch": 1000,
                        "peak_rss_mb": 60.0},  # its stock twin is absent: no stock ratio
        "torchvision_stock": {"images_per_sec": 50.0, "window_rates": [50.0],
                              "images_per_epoch": 1000, "peak_rss_mb": 40.0},
        "dali": {"error": "exit 1: no DALI"}}}
    f = suite.loaders_figures(loaders)
    assert f["ffcv.ratio_to_stock_ffcv"]["unit"] == "x stock ffcv"
    assert f["ffcv.ratio_to_reference"]["median"] == 4.0
    assert f["ffcv.ratio_to_reference"]["spread"] == [4.0, 5.0]
    assert f["ffcv.ratio_to_reference"]["scope"] == "relative"
    assert f["reference.images_per_sec"]["spread"] == [80.0, 100.0]
    assert f["ffcv.peak_rss_mb"]["higher_is_better"] is False
    assert f["ffcv.ratio_to_stock_ffcv"]["median"] == 2.0
    assert f["ffcv.ratio_to_stock_ffcv"]["spread"] == [2.0, 2.5]
    assert "ffcv_lowres.ratio_to_stock_ffcv" not in f and "ffcv_stock.ratio_to_stock_ffcv" not in f
    assert f["ffcv.ratio_to_torchvision_stock"]["spread"] == [8.0, 10.0]
    assert f["reference.ratio_to_torchvision_stock"]["median"] == 2.0
    assert "torchvision_stock.ratio_to_torchvision_stock" not in f
    assert f["torchvision_stock.ratio_to_reference"]["median"] == 0.5
    assert not any(k.startswith("dali") for k in f)
    loaders["results"]["dali"] = {"images_per_sec": 300.0, "window_rates": [300.0],
                                  "images_per_epoch": 1000, "peak_rss_mb": 80.0}
    loaders["results"]["dali_stock"] = dict(loaders["results"]["dali"], images_per_sec=200.0)
    assert suite.loaders_figures(loaders)["dali.ratio_to_stock_dali"]["median"] == 1.5
    summary = {"median": 200.0, "min": 190.0, "max": 210.0, "n": 2, "spread": 0.1}
    e2e = {"results": {
        "student_kd": {"images_per_sec": summary, "val_ece": 0.05, "val_top1": 0.4, "peak_rss_mb": 1.0},
        "student_kd_cutmix": {"images_per_sec": dict(summary, median=150.0), "val_ece": 0.04,
                              "val_top1": 0.38, "peak_rss_mb": 1.0,
                              "loop_efficiency": {"median": 0.88, "min": 0.8, "max": 0.95, "n": 5},
                              "loop_efficiency_paired": {"median": 0.91, "min": 0.9, "max": 0.92, "n": 5}}}}
    f = suite.e2e_figures(e2e)
    assert f["student_kd.val_ece"]["scope"] == "quality" and not f["student_kd.val_ece"]["higher_is_better"]
    assert f["student_kd_cutmix_over_kd.images_per_sec"]["median"] == 0.75
    paired = f["student_kd_cutmix.loop_efficiency_paired"]
    assert paired["median"] == 0.91 and paired["spread"] == [0.9, 0.92] and paired["repeats"] == 5
    assert paired["scope"] == "relative" and paired["higher_is_better"]
    assert f["student_kd_cutmix.loop_efficiency"]["median"] == 0.88
    assert "student_kd.loop_efficiency_paired" not in f


# ------------------------------------------------------------- step benchmark
TINY = ["--quick", "--batch-size", "8", "--teacher", "resnet8", "--student", "resnet8",
        "--num-classes", "10", "--num-samples", "64", "--num-views", "2", "--warmup", "1",
        "--steps", "1", "--block-seconds", "0", "--repeats", "2", "--threads", "1", "--device", "cpu",
        "--json"]


@pytest.fixture(scope="module")
def step_report(tmp_path_factory):
    from benchmarks import step

    trace_dir = tmp_path_factory.mktemp("trace")
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("out") / "stdout.txt"
    try:
        with open(out, "w") as f:
            old, sys.stdout = sys.stdout, f
            try:
                assert step.main(TINY + ["--profile", str(trace_dir)]) == 0
            finally:
                sys.stdout = old
    finally:
        torch.set_num_threads(threads)
    return suite.parse_report(out.read_text()), trace_dir


def test_step_tiny_run_reports_every_mode(step_report):
    rep, _ = step_report
    assert set(rep["results"]) == {"ce", "kd_cached", "kd_online", "kd_cached_cutmix", "teacher_forward"}
    for name, r in rep["results"].items():
        assert r["steps_per_sec"]["median"] > 0 and r["steps_per_sec"]["n"] == 2, name
        assert r["steps_per_block"] == 1, name  # --block-seconds 0: exactly --steps
        assert r["images_per_sec"]["median"] == pytest.approx(8 * r["steps_per_sec"]["median"])
    t = rep["targets"]
    assert isinstance(t["kd_cached_vs_ce"]["met"], bool) and t["kd_cached_vs_ce"]["ratio"]["median"] > 0
    online = t["kd_cached_vs_online"]
    assert isinstance(online["met"], bool) and online["ideal"]["median"] > 1
    assert online["required"] == pytest.approx(0.8 * online["ideal"]["median"])
    assert rep["peak_rss_mb"] > 0 and "ECE" in rep["note"] and "e2e" in rep["note"]
    assert rep["settings"]["batch_size"] == 8 and rep["settings"]["device"] == "cpu"
    figs = suite.step_figures(rep)
    for name in ("ce.steps_per_sec", "kd_cached.images_per_sec", "kd_online.steps_per_sec",
                 "teacher_forward.ms_per_batch", "kd_cached_over_ce",
                 "kd_cached_vs_online_fraction_of_ideal", "peak_rss_mb"):
        assert figs[name]["median"] > 0 and figs[name]["repeats"] >= 1, name
    assert figs["kd_cached_over_ce"]["scope"] == "relative"
    assert figs["ce.images_per_sec"]["scope"] == "absolute"


def test_step_profile_writes_a_chrome_trace(step_report):
    rep, trace_dir = step_report
    path = trace_dir / "step_trace.json"
    assert rep["profile_trace"] == str(path)
    events = json.loads(path.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"ce/step0", "kd_cached/step0", "kd_online/step0"} <= names


def test_runner_writes_figures_and_reports_failures(step_report, tmp_path, monkeypatch):
    """The runner's plumbing, with the suites' commands replaced by cheap ones:
    a step report behind some library chatter, and a suite that crashes."""
    rep, _ = step_report
    canned = tmp_path / "step.json"
    canned.write_text("some library banner\n" + json.dumps(rep))

    def command(name, quick, threads, data, scratch):
        if name == "step":
            return [sys.executable, "-c", f"print(open({str(canned)!r}).read())"]
        return [sys.executable, "-c", "import sys; sys.exit(3)"]

    monkeypatch.setattr(suite, "suite_command", command)
    out = tmp_path / "results.json"
    assert bench_cli(["run", "step", "e2e", "--out", str(out), "--quick", "--data", str(tmp_path)]) == 1
    res = json.loads(out.read_text())
    assert res["machine"]["cpu"] and res["config"]["quick"] is True
    figs = res["benchmarks"]["step"]
    assert figs["kd_cached_over_ce"]["median"] == rep["targets"]["kd_cached_vs_ce"]["ratio"]["median"]
    for f in figs.values():
        assert {"median", "spread", "repeats", "unit", "higher_is_better", "scope"} <= set(f)
    assert "e2e" not in res["benchmarks"] and "exit code 3" in res["suites"]["e2e"]["error"]


def test_peak_rss_counts_children_started_inside_it():
    """PeakRSS lists the process tree every refresh_s and reads the listed
    processes' RSS every interval_s: a child started inside the block, which
    holds ~200 MB for a while, shows up in the peak."""
    import subprocess
    import time

    from benchmarks.common import PeakRSS

    hold = ("import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
            "time.sleep(3)")
    with PeakRSS(interval_s=0.02, refresh_s=0.5) as mem:
        base = mem.sample(relist=False)
        child = subprocess.Popen([sys.executable, "-c", hold])
        time.sleep(2)  # > refresh_s after the allocation
        child.kill()
        child.wait()
    assert mem.peak_bytes - base >= 180 * 2**20, (base, mem.peak_bytes)
