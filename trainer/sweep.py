"""The temperature chosen for the user: ``python -m trainer sweep`` and
``loss.temperature: auto``.

Short students are trained from the teacher cache (the teacher never runs
again) over ``sweep.temperatures x sweep.objectives x sweep.calibrated``,
everything else as in the recipe. Each is scored on the validation split
(``data.val_store``, held out from the training data; never the test split)
by its last epoch's validation top-1 and ECE.

Choice rule: among the runs whose validation top-1 is within
``sweep.top1_tolerance`` of the best run's, the lowest validation ECE (ties:
higher top-1, then lower T). Accuracy first, so a uselessly smooth,
under-confident student is never "calibrated" by being bad; then
calibration, which is what the product is for.

``runs/<name>/sweep/sweep.json`` records every run, the choice and the rule,
and the sweep's cost next to what the same sweep would cost with the online
teacher (the measured sweep time plus the teacher's measured forward time,
from the cache fill, for every image the sweep students trained on);
``sweep.png`` plots validation top-1 and ECE against T. A sweep whose recipe
(everything but the swept keys, the run's tag and seed) is unchanged is
reused: the sweep runs once, at the seed of the first run that needs it.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from dataset_tools.atomic import write_json_atomic
from trainer.recipe import Config

RULE = ("lowest validation ECE among the runs whose validation top-1 is within "
        "sweep.top1_tolerance of the best run's (ties: higher top-1, then lower T)")


def grid(cfg: Config) -> list[dict]:
    """The sweep's runs, in a fixed order, each with its run tag."""
    s = cfg.sweep
    if not (s.temperatures and s.objectives and s.calibrated):
        raise ValueError("sweep.temperatures, sweep.objectives and sweep.calibrated must be non-empty")
    if any(t <= 0 for t in s.temperatures):
        raise ValueError(f"sweep.temperatures must be > 0, got {list(s.temperatures)}")
    return [{"objective": obj, "calibrated": bool(cal), "temperature": float(t),
             "tag": f"sweep/{obj}{'_cal' if cal else ''}_T{t:g}"}
            for obj in s.objectives for cal in s.calibrated for t in s.temperatures]


def choose(runs: list[dict], tolerance: float) -> dict:
    """The rule of the module docstring on ``runs`` (each with ``val_top1``,
    ``val_ece``, ``temperature``)."""
    scored = [r for r in runs if math.isfinite(r["val_top1"]) and math.isfinite(r["val_ece"])]
    if not scored:
        raise ValueError("no sweep run produced finite validation metrics")
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


def recipe_fingerprint(cfg: Config, teacher_hash: str) -> str:
    """Hash of everything a sweep's result depends on: the teacher's weights,
    the recipe less the swept keys and the settings that do not change results."""
    d = json.loads(json.dumps(asdict(cfg), default=str))
    d["teacher_weights_hash"] = teacher_hash
    # run.seed too: the sweep runs once, at the recipe's seed, and every seed reuses its choice
    for section, key in (("run", "tag"), ("run", "seed"), ("run", "resume"), ("run", "progress"), ("run", "log_every"),
                         ("run", "checkpoint_every"), ("loss", "temperature"), ("loss", "kd_objective"),
                         ("distill", "calibrated_teacher"), ("distill", "temperature_from_calibration")):
        d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _last_val(run_dir: Path) -> dict:
    rec = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()][-1]
    return {"val_top1": float(rec.get("val_top1", float("nan"))), "val_ece": float(rec.get("val_ece", float("nan"))),
            "val_nll": float(rec.get("val_nll", float("nan")))}


def run_sweep(cfg: Config) -> dict:
    """Train (or reuse) every sweep run and choose; see the module docstring."""
    from trainer import jobs

    if cfg.distill.targets != "cached":
        raise ValueError("the sweep trains from the teacher cache: set distill.targets=cached "
                         "(run 'python -m trainer cache' first)")
    from trainer.checkpoint import load_checkpoint

    fp = recipe_fingerprint(cfg, load_checkpoint(cfg.teacher_checkpoint)["weights_hash"])
    if cfg.sweep_file.is_file():
        old = json.loads(cfg.sweep_file.read_text())
        if old.get("recipe_fingerprint") == fp:
            return old
    points, runs, t_sweep = grid(cfg), [], time.perf_counter()
    images = 0
    for point in points:
        scfg = run_config(cfg, point)
        marker = scfg.student_dir / "sweep_run.json"
        if marker.is_file() and json.loads(marker.read_text()).get("recipe_fingerprint") == fp:
            run = json.loads(marker.read_text())["run"]  # finished in an interrupted sweep
        else:
            if scfg.student_dir.exists():
                shutil.rmtree(scfg.student_dir)  # a run of another recipe
            t0 = time.perf_counter()
            out = jobs._fit(scfg, "student")
            steps = int(out.get("step", 0))
            run = {**point, **_last_val(scfg.student_dir), "seconds": time.perf_counter() - t0,
                   "train_images": steps * cfg.data.batch_size}
            write_json_atomic(marker, {"recipe_fingerprint": fp, "run": run})
        images += run["train_images"]
        runs.append(run)
    sweep_seconds = time.perf_counter() - t_sweep
    choice = choose(runs, cfg.sweep.top1_tolerance)
    result = {"recipe_fingerprint": fp, "rule": RULE, "top1_tolerance": cfg.sweep.top1_tolerance,
              "split": "val", "store": cfg.data.val_store, "epochs": cfg.sweep.epochs or cfg.optim.epochs,
              "runs": runs, "choice": {k: choice[k] for k in ("temperature", "objective", "calibrated",
                                                              "tag", "val_top1", "val_ece")},
              "cost": sweep_cost(cfg, sweep_seconds, images)}
    cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot_sweep(result, cfg.sweep_dir / "sweep.png"))
    write_json_atomic(cfg.sweep_file, result)
    return result


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dataset_tools.atomic import atomic_write_bytes

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path
