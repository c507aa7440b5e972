"""The temperature chosen for the user: ``python -m trainer sweep`` and
``loss.temperature: auto``.

Short students are trained from the teacher cache (the teacher never runs
again) over ``sweep.temperatures x sweep.objectives x sweep.calibrated``,
everything else as in the recipe. Each is scored on the validation split
(``data.val_store``, held out from the training data; never the test split)
by its last epoch's validation top-1 and ECE.

Refinement (``sweep.refine`` = R > 0): a student's signed calibration gap
(validation mean confidence minus top-1: > 0 over-confident, < 0
under-confident) falls as the teacher's distribution is smoothed, and the
best-calibrated temperature lies near where the gap crosses zero, usually
between two grid points (ECE, its binned absolute value, has a minimum
there but no sign to bisect on). So, for each
(objective, calibrated teacher) series whose gap changes sign between
adjacent grid temperatures, up to R more students are trained by bisection
(at the geometric mean of the bracketing temperatures, the bracket then
narrowed to the half where the sign changes). Every refined run is scored
like a grid run and competes under the same rule. With
``distill.calibrate_student`` every run's temperature is fitted on the
validation split after training, so there is nothing to bisect: the grid
alone runs.

Choice rule: among the runs whose validation top-1 is within the tolerance
of the best run's, the lowest validation ECE (ties:
higher top-1, then lower T). Accuracy first, so a uselessly smooth,
under-confident student is never "calibrated" by being bad; then
calibration, which is what the product is for. The tolerance is the larger of
``sweep.top1_tolerance`` and ``sweep.top1_standard_errors`` binomial standard
errors of the best run's top-1 on the validation split, ``sqrt(p (1 - p) /
n)``: the one-standard-error rule, so runs whose accuracy differs from the
best by less than the validation split can resolve are not ruled out by
noise (400 validation images give a standard error of ~2.5 points at 40 %).

With ``distill.calibrate_student`` the rule is the lowest validation NLL of
the calibrated student (ties: higher top-1, then lower T). Every calibrated
student's ECE is then near the split's noise floor, so ECE would rank them
by noise, and can prefer a less accurate run; the NLL after temperature
scaling is a proper score that weighs accuracy and the calibration left,
and is far less noisy than a binned ECE.

``runs/<name>/sweep/sweep.json`` records every run, the choice and the rule,
and the sweep's cost next to what the same sweep would cost with the online
teacher (the measured sweep time plus the teacher's measured forward time,
from the cache fill, for every image the sweep students trained on);
``sweep.png`` plots validation top-1 and ECE against T. A sweep whose recipe
(everything but the swept keys, the run's tag and seed) is unchanged is
reused: the sweep runs once, at the seed of the first run that needs it.

Under torchrun every rank trains each sweep run together (they are ordinary
:class:`~trainer.engine.Trainer` runs); rank 0 alone deletes stale run folders
and writes the markers, the plot and ``sweep.json`` (barriers between), and
every rank returns rank 0's result, so all apply the same choice.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from dataset_tools.atomic import write_json_atomic
from dataset_tools.progress import log_line
from trainer import distributed
from trainer.recipe import NON_RESULT_KEYS, Config
from trainer.run_record import write_resolved_config
from trainer.yaml_config import flatten

RULE = ("lowest validation ECE among the runs whose validation top-1 is within the tolerance of the "
        "best run's: max(sweep.top1_tolerance, sweep.top1_standard_errors x the binomial standard error "
        "of the best top-1 on the validation split) (ties: higher top-1, then lower T)")
RULE_CALIBRATED = ("lowest validation NLL of the calibrated student (its temperature fitted on the "
                   "validation split; ties: higher top-1, then lower T)")


def tolerance(runs: list[dict], sweep_cfg) -> tuple[float, float]:
    """``(tolerance, standard error of the best run's val top-1)`` (see module docstring)."""
    scored = [r for r in runs if math.isfinite(r["val_top1"])]
    best = max(scored, key=lambda r: r["val_top1"]) if scored else None
    n = best.get("val_n", float("nan")) if best else float("nan")
    se = math.sqrt(best["val_top1"] * (1 - best["val_top1"]) / n) if best and n and math.isfinite(n) else 0.0
    return max(sweep_cfg.top1_tolerance, sweep_cfg.top1_standard_errors * se), se


def grid(cfg: Config) -> list[dict]:
    """The sweep's runs, in a fixed order, each with its run tag."""
    s = cfg.sweep
    if not (s.temperatures and s.objectives and s.calibrated):
        raise ValueError("sweep.temperatures, sweep.objectives and sweep.calibrated must be non-empty")
    if any(t <= 0 for t in s.temperatures):
        raise ValueError(f"sweep.temperatures must be > 0, got {list(s.temperatures)}")
    return [_point(obj, cal, t) for obj in s.objectives for cal in s.calibrated for t in s.temperatures]


def _point(objective: str, calibrated: bool, temperature: float) -> dict:
    return {"objective": objective, "calibrated": bool(calibrated), "temperature": float(temperature),
            "tag": f"sweep/{objective}{'_cal' if calibrated else ''}_T{temperature:.4g}"}


def gap(run: dict) -> float:
    """Validation over-confidence of a run: mean confidence minus top-1."""
    return run.get("val_confidence", float("nan")) - run["val_top1"]


def next_refinement(runs: list[dict], objective: str, calibrated: bool) -> Optional[dict]:
    """The bisection point of one series (see module docstring), or None when
    its gap does not change sign between two tried temperatures."""
    series = sorted((r for r in runs if r["objective"] == objective and r["calibrated"] == calibrated),
                    key=lambda r: r["temperature"])
    for a, b in zip(series, series[1:]):
        ga, gb = gap(a), gap(b)
        if math.isfinite(ga) and math.isfinite(gb) and ga * gb < 0:
            return _point(objective, calibrated, math.sqrt(a["temperature"] * b["temperature"]))
    return None


def choose(runs: list[dict], tolerance: float, calibrated_students: bool = False) -> dict:
    """The rule of the module docstring on ``runs`` (each with ``val_top1``,
    ``val_ece``, ``temperature``; ``val_nll`` for calibrated students)."""
    key = "val_nll" if calibrated_students else "val_ece"
    scored = [r for r in runs if math.isfinite(r["val_top1"]) and math.isfinite(r.get(key, math.nan))]
    if not scored:
        raise ValueError("no sweep run produced finite validation metrics")
    if calibrated_students:
        return min(scored, key=lambda r: (r["val_nll"], -r["val_top1"], r["temperature"]))
    best = max(r["val_top1"] for r in scored)
    eligible = [r for r in scored if r["val_top1"] >= best - tolerance - 1e-12]
    return min(eligible, key=lambda r: (r["val_ece"], -r["val_top1"], r["temperature"]))


def run_config(cfg: Config, point: dict) -> Config:
    """The recipe of one sweep run."""
    return replace(cfg, run=replace(cfg.run, tag=point["tag"], resume=False),
                   loss=replace(cfg.loss, temperature=point["temperature"], kd_objective=point["objective"]),
                   distill=replace(cfg.distill, calibrated_teacher=point["calibrated"],
                                   temperature_from_calibration=False),
                   optim=replace(cfg.optim, epochs=cfg.sweep.epochs or cfg.optim.epochs))


def apply_choice(cfg: Config, sweep: dict) -> Config:
    """``cfg`` with the sweep's chosen temperature, objective and teacher."""
    c = sweep["choice"]
    return replace(cfg, loss=replace(cfg.loss, temperature=c["temperature"], kd_objective=c["objective"]),
                   distill=replace(cfg.distill, calibrated_teacher=c["calibrated"],
                                   temperature_from_calibration=False))


# what the sweep sets per run, and what it shares across runs: the run's tag,
# and run.seed (the sweep runs once, at the recipe's seed; every seed reuses it)
SWEPT_KEYS = ("loss.temperature", "loss.kd_objective", "distill.calibrated_teacher",
              "distill.temperature_from_calibration", "run.tag", "run.seed")


def recipe_fingerprint(cfg: Config, teacher_hash: str) -> str:
    """Hash of everything a sweep's result depends on: the teacher's weights,
    the recipe less the swept keys and the keys that do not change results
    (``NON_RESULT_KEYS``, trainer/recipe.py)."""
    d = {k: v for k, v in flatten(cfg).items() if k not in SWEPT_KEYS + NON_RESULT_KEYS}
    d["teacher_weights_hash"] = teacher_hash
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _last_val(run_dir: Path) -> dict:
    """The last epoch's validation metrics. For a calibrated student
    (``distill.calibrate_student``) ``val_ece`` is its cross-fitted ECE (the
    temperature was fitted on the same split, so its own ECE there is
    optimistic; recorded and plotted) and ``val_nll`` the NLL it is chosen by."""
    rec = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()][-1]
    out = {k: float(rec.get(k, float("nan"))) for k in ("val_top1", "val_ece", "val_nll", "val_confidence",
                                                         "val_n")}
    if "val_ece_crossfit" in rec:
        out.update(val_ece=float(rec["val_ece_crossfit"]), val_ece_fitted=float(rec["val_ece"]),
                   student_temperature=float(rec["student_temperature"]))
    return out


def run_sweep(cfg: Config) -> dict:
    """Train (or reuse) every sweep run and choose; see the module docstring."""
    from trainer import jobs

    if cfg.distill.targets != "cached":
        raise ValueError("the sweep trains from the teacher cache: set distill.targets=cached "
                         "(run 'python -m trainer cache' first)")
    from trainer.teacher import teacher_hash

    fp = recipe_fingerprint(cfg, teacher_hash(cfg))
    by_nll = bool(cfg.distill.calibrate_student)
    rule = RULE_CALIBRATED if by_nll else RULE
    if cfg.sweep_file.is_file():
        old = json.loads(cfg.sweep_file.read_text())
        if old.get("recipe_fingerprint") == fp and old.get("rule") == rule:
            return old  # (another rule: the finished runs below are reused, the choice made again)
    points, runs, t_sweep = grid(cfg), [], time.perf_counter()
    if distributed.is_main():
        cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, cfg.sweep_dir)
    def train(point: dict, label: str) -> dict:
        scfg = run_config(cfg, point)
        marker = scfg.student_dir / "sweep_run.json"
        if marker.is_file() and json.loads(marker.read_text()).get("recipe_fingerprint") == fp:
            run = json.loads(marker.read_text())["run"]  # finished in an interrupted sweep
        else:
            if distributed.is_main() and scfg.student_dir.exists():
                shutil.rmtree(scfg.student_dir)  # a run of another recipe
            distributed.barrier()
            t0 = time.perf_counter()
            out = jobs._fit(scfg, "student")  # ends at a barrier: log.jsonl is complete
            steps = int(out.get("step", 0))
            run = {**point, **_last_val(scfg.student_dir), "seconds": time.perf_counter() - t0,
                   "train_images": steps * cfg.data.batch_size * distributed.world_size()}
            if distributed.is_main():
                write_json_atomic(marker, {"recipe_fingerprint": fp, "run": run})
        if cfg.run.progress and distributed.is_main():
            log_line(f"sweep run {label} ({point['tag']}): val top-1 {run['val_top1']:.3f}, "
                     f"val ECE {run['val_ece']:.3f}, val NLL {run['val_nll']:.3f}, "
                     f"over-confidence {gap(run):+.3f}, {run['seconds']:.0f} s")
        return run

    for i, point in enumerate(points, 1):
        runs.append(train(point, f"{i}/{len(points)}"))
    # bisection where the over-confidence changes sign (a student calibrated after
    # training has none left to bisect on)
    for obj in (() if cfg.distill.calibrate_student else cfg.sweep.objectives):
        for cal in cfg.sweep.calibrated:
            for k in range(cfg.sweep.refine):
                point = next_refinement(runs, obj, cal)
                if point is None or any(r["tag"] == point["tag"] for r in runs):
                    break
                runs.append({**train(point, f"refine {k + 1}/{cfg.sweep.refine}"), "refined": True})
    images = sum(r["train_images"] for r in runs)
    # runs reused from an interrupted sweep (or re-chosen under a new rule) count
    # the time they took when they were trained, not the moment it took to read them
    sweep_seconds = max(time.perf_counter() - t_sweep, sum(r["seconds"] for r in runs))
    tol, se = tolerance(runs, cfg.sweep)
    choice = choose(runs, tol, calibrated_students=by_nll)
    result = {"recipe_fingerprint": fp, "rule": rule,
              "top1_tolerance": tol, "top1_standard_error": se,
              "split": "val", "store": cfg.data.val_store, "epochs": cfg.sweep.epochs or cfg.optim.epochs,
              "runs": runs, "choice": {k: choice[k] for k in ("temperature", "objective", "calibrated",
                                                              "tag", "val_top1", "val_ece", "val_nll")},
              "cost": sweep_cost(cfg, sweep_seconds, images)}
    result["plot"] = str(cfg.sweep_dir / "sweep.png")
    if distributed.is_main():
        plot_sweep(result, cfg.sweep_dir / "sweep.png")
        write_json_atomic(cfg.sweep_file, result)
    return distributed.broadcast_object(result)


def sweep_cost(cfg: Config, sweep_seconds: float, train_images: int) -> dict:
    """The measured cost and what the online teacher would add: its forward
    pass on every image the sweep trained on, at the rate the cache fill
    measured (teacher forward plus loading at full resolution)."""
    from dataset_tools.stores.layout import open_store
    from trainer.data import teacher_cache_path

    info_file = teacher_cache_path(cfg, open_store(cfg.data.train_store)).with_suffix(".json")
    rate = json.loads(info_file.read_text()).get("teacher_images_per_sec") if info_file.is_file() else None
    online = sweep_seconds + train_images / rate if rate else None
    return {"seconds": sweep_seconds, "train_images": train_images, "teacher_images_per_sec": rate,
            "online_teacher_seconds_estimate": online,
            "note": "online estimate = measured sweep time + train images / teacher rate of the cache fill"}


def plot_sweep(result: dict, path: Path) -> Path:
    """Validation top-1 and ECE against T, one curve per objective and
    teacher, the choice starred (the sweep's and the demo report's plot)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dataset_tools.atomic import atomic_write_bytes

    # Figure + Agg canvas directly (no pyplot): no global backend state
    fig = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    series: dict[str, list] = {}
    for r in result["runs"]:
        series.setdefault(f"{r['objective']}{' (calibrated teacher)' if r['calibrated'] else ''}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["temperature"])
        ts = [r["temperature"] for r in rs]
        ax1.plot(ts, [r["val_top1"] for r in rs], "o-", label=label)
        ax2.plot(ts, [r["val_ece"] for r in rs], "o-", label=label)
    c = result["choice"]  # the chosen run's star
    for ax, k in ((ax1, "val_top1"), (ax2, "val_ece")):
        ax.plot([c["temperature"]], [c[k]], "k*", markersize=14, label="chosen" if ax is ax1 else None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("temperature T")
    ax1.set_ylabel("validation top-1")
    ax2.set_ylabel("validation ECE")
    ax1.legend(fontsize=7)
    fig.suptitle(f"sweep on the validation split ({result['epochs']} epochs per run)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path
