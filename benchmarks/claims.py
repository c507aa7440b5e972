"""The two seed claims, measured (``python -m benchmarks.claims``).

1. KD alone from an uncalibrated teacher gives a student about as
   miscalibrated as the teacher; fusing mixing (mixup, CutMix, cutout) with
   KD, RKD or CRD gives a much lower ECE without losing accuracy.
2. Cross-quality: a full-resolution teacher distilled into a low-resolution
   student beats the same student trained supervised at that resolution, and
   raising the KD temperature (T = 1, 2, 4, 8) lowers the student's ECE and
   raises its accuracy.

The second claim is about smoothing the *teacher's* distribution, so grid 2
has both objectives (``hinton``: student and teacher at T, times T^2;
``teacher_smoothing``: the student at T = 1 against the teacher at T) and
the calibrated teacher (its logits divided by the temperature fitted on the
validation split, then smoothed at T), next to calibrated students (their
own temperature fitted on the validation split and folded into the
classifier, ``distill.calibrate_student``) and the recommended recipe (the
sweep's choice on the validation split, calibrated). The ``targets`` grid
compares cached targets (probabilities or logits mixed like the batch, and
CutMix composed from the cache's spatial maps) with the online teacher under
CutMix and mixup: the downstream gap of each of the cache's approximations
(grids 1 and 2 use the default, ``distill.cached_mix: auto``).

Runs on the demo's teacher and cache (same recipe, reused), each student
configuration for each seed (``run.seed`` varies init and mixing; the view
contract and cache are shared), every figure on the test split, and writes
``claims.json`` and a markdown table (mean +- std over seeds) to
``runs/<name>/claims.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

from benchmarks.demo import REPO, prepare, train_student
from dataset_tools.atomic import write_json_atomic, write_text_atomic
from trainer.yaml_config import load_config
from trainer.recipe import Config

KD = dict(loss=dict(ce=0.1, kd=0.9, temperature=4.0, kd_objective="hinton"),
          distill=dict(calibrated_teacher=False))
CLAIM1 = {
    "kd": KD,
    "kd_mixup": {**KD, "mix": dict(p_mixup=1.0)},
    "kd_cutmix": {**KD, "mix": dict(p_cutmix=1.0)},
    "kd_cutout": {**KD, "mix": dict(p_cutout=1.0)},
    "rkd": dict(loss=dict(ce=1.0, kd=0.0, rkd=1.0)),
    "rkd_cutmix": dict(loss=dict(ce=1.0, kd=0.0, rkd=1.0), mix=dict(p_cutmix=1.0)),
    "crd": dict(loss=dict(ce=1.0, kd=0.0, crd=0.8)),
    "crd_cutmix": dict(loss=dict(ce=1.0, kd=0.0, crd=0.8), mix=dict(p_cutmix=1.0)),
}


def _kd(t: float, objective: str = "hinton", calibrated: bool = False) -> dict:
    return dict(loss=dict(ce=0.1, kd=0.9, temperature=float(t), kd_objective=objective),
                distill=dict(calibrated_teacher=calibrated))


CLAIM2 = {
    "supervised_lowres": dict(distill=dict(targets="none"), loss=dict(ce=1.0, kd=0.0)),
    **{f"kd_T{t}": _kd(t) for t in (1, 2, 4, 8)},
    **{f"smooth_T{t}": _kd(t, "teacher_smoothing") for t in (1, 1.5, 2, 4, 8)},
    **{f"kd_cal_T{t}": _kd(t, "hinton", True) for t in (1, 4)},
    **{f"smooth_cal_T{t}": _kd(t, "teacher_smoothing", True) for t in (1, 2, 4)},
    # the student's own temperature fitted on val and folded in (distill.calibrate_student)
    "kd_T4_calibrated_student": {**_kd(4), "distill": dict(calibrated_teacher=False, calibrate_student=True)},
    "supervised_calibrated_student": dict(distill=dict(targets="none", calibrate_student=True),
                                          loss=dict(ce=1.0, kd=0.0)),
    "recommended": dict(loss=dict(ce=0.1, kd=0.9, temperature="auto"), distill=dict(calibrate_student=True)),
}
# cached targets (mixed like the batch: approximate, no teacher in the loop) vs
# online targets (the teacher runs on the mixed full-resolution view: exact)
TARGETS = {
    "kd_cutmix_cached": {**KD, "mix": dict(p_cutmix=1.0), "distill": dict(cached_mix="probs")},
    "kd_cutmix_cached_logits": {**KD, "mix": dict(p_cutmix=1.0), "distill": dict(cached_mix="logits")},
    "kd_cutmix_cached_spatial": {**KD, "mix": dict(p_cutmix=1.0),
                                 "distill": dict(cached_mix="spatial")},
    "kd_cutmix_online": {**KD, "mix": dict(p_cutmix=1.0), "distill": dict(targets="online")},
    "kd_mixup_cached": {**KD, "mix": dict(p_mixup=1.0), "distill": dict(cached_mix="probs")},
    "kd_mixup_cached_logits": {**KD, "mix": dict(p_mixup=1.0), "distill": dict(cached_mix="logits")},
    "kd_mixup_online": {**KD, "mix": dict(p_mixup=1.0), "distill": dict(targets="online")},
}
METRICS = ("top1", "ece", "nll", "brier", "train_images_per_sec", "ece_floor", "posthoc_ece")


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, evs in runs.items():
        row = {"seeds": len(evs)}
        for m in METRICS:
            vals = [e[m] for e in evs if m in e]
            if not vals:
                continue
            row[m] = statistics.fmean(vals)
            row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[name] = row
    return out


def markdown(summary: dict, teacher: dict, calib: dict, title: str) -> str:
    lines = [f"### {title}", "",
             f"Teacher: top-1 {teacher['top1']:.3f}, ECE {teacher['ece']:.3f} (T=1); "
             f"calibrated T={calib['temperature']:.2f} gives ECE {calib['ece_after_crossfit']:.3f}.", "",
             "| student | seeds | top-1 | ECE | ECE floor | ECE if val-TS | NLL | Brier | train img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for name, r in summary.items():
        def f(m, d=3):
            return f"{r[m]:.{d}f} ± {r[m + '_std']:.{d}f}" if r["seeds"] > 1 else f"{r[m]:.{d}f}"
        lines.append(f"| {name} | {r['seeds']} | {f('top1')} | {f('ece')} | {r.get('ece_floor', nan):.3f} | "
                     f"{r.get('posthoc_ece', nan):.3f} | {f('nll')} | {f('brier')} | "
                     f"{r['train_images_per_sec']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "demo_cpu.yaml"))
    p.add_argument("--claims", default="1,2,targets", help="which grids: 1, 2, targets")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default="", help="comma-separated student names (default: all)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.2, help="as the demo's (its stores are reused)")
    p.add_argument("--out-name", default="claims", help="writes runs/<name>/<out-name>.json/.md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    args.fresh = False
    cfg = load_config(Config, args.config, args.overrides)
    times: dict = {}
    calib = prepare(cfg, args, times)
    from trainer import jobs
    teacher = jobs.run_evaluate(cfg, str(cfg.teacher_checkpoint))  # test split
    seeds = [int(s) for s in args.seeds.split(",")]
    only = set(filter(None, args.only.split(",")))
    grids = {"1": ("Claim 1: mixing fused with distillation", CLAIM1),
             "2": ("Claim 2: cross-quality distillation and the teacher temperature", CLAIM2),
             "targets": ("Cached vs online teacher targets (KD + CutMix)", TARGETS)}
    report, everything = [], {}
    t0 = time.perf_counter()
    for claim in args.claims.split(","):
        title, grid = grids[claim]
        runs: dict[str, list[dict]] = {}
        for name, overrides in grid.items():
            if only and name not in only:
                continue
            for seed in seeds:
                scfg = replace(cfg, run=replace(cfg.run, seed=seed))
                runs.setdefault(name, []).append(
                    train_student(scfg, f"claims/{name}/seed{seed}", overrides, times))
        summary = summarize(runs)
        everything[claim] = {"title": title, "students": summary, "runs": runs}
        report.append(markdown(summary, teacher, calib, title))
    out = {"config": args.config, "overrides": args.overrides, "seeds": seeds, "teacher": teacher,
           "calibration": calib, "claims": everything, "seconds": time.perf_counter() - t0}
    root = cfg.run.root
    write_json_atomic(root / f"{args.out_name}.json", json.loads(json.dumps(out, default=str)))
    write_text_atomic(root / f"{args.out_name}.md", "\n".join(report))
    print("\n".join(report))
    print(f"written: {root / args.out_name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
