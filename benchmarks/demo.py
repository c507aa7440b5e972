"""The main job, end to end: ``make demo`` (CPU scale) or ``--full`` (GPU scale).

convert (train with a held-out validation split, and test; or reuse verified
stores) -> teacher at full resolution -> calibrate on val -> teacher cache
(logits + embeddings) -> the temperature sweep on val -> students at reduced
resolution, each over ``--seeds`` seeds: the supervised low-resolution
baseline, plain KD (Hinton, T = 4) and the recommended recipe (what the
sweep chose) -> evaluate on test -> one table (mean and spread over seeds of
top-1, ECE, NLL, Brier; images/sec) with the headline verdict, and
``runs/<name>/report.md`` with the overlaid reliability curves, the sweep
plot and a throughput plot.

Splits: everything fitted or chosen (temperature scaling, the sweep's
choice) sees the validation split; the test split is read only by the
evaluation rows of the table.

Stages whose outputs exist are reused (``--fresh`` redoes everything), so an
interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dataset_tools.errors import CqkdError, exit_with_error
from dataset_tools.atomic import write_json_atomic
from dataset_tools.locate import shared_datasets_dir
from dataset_tools.stores.layout import StoreError, open_store
from trainer.checkpoint import load_checkpoint
from trainer.yaml_config import load_config
from trainer.recipe import Config

REPO = Path(__file__).resolve().parent.parent

# Students of the demo: (tag, overrides on top of the recipe). The recipe's
# loss section is plain KD (Hinton, T = 4); "recommended" lets the sweep
# choose the temperature and the objective on val, and calibrates the student
# (its temperature fitted on val and folded into its classifier).
RECOMMENDED = dict(loss=dict(temperature="auto"), distill=dict(calibrate_student=True))
STUDENTS = [
    ("supervised_lowres", dict(distill=dict(targets="none"), loss=dict(kd=0.0, ce=1.0))),
    ("kd", dict(loss=dict(temperature=4.0, kd_objective="hinton"), distill=dict(calibrated_teacher=False))),
    ("recommended", RECOMMENDED),
]


def link_subset(src: Path, dst: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """An ImageFolder of symlinks to ``per_class`` files of each of the first
    ``classes`` classes (sorted), so a CPU-sized subset converts without
    copying the data. The files are drawn at random (seeded by ``seed`` and
    the class), not taken first by name: CIFAR's file names group images
    collected together, so a name-ordered subset puts near-neighbours on both
    sides of the train / val cut and its validation split scores higher than
    the rest of the class (docs/results.md, "Calibrated students at scale")."""
    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    for ci, cdir in enumerate(sorted(p for p in src.iterdir() if p.is_dir())[:classes]):
        (tmp / cdir.name).mkdir(parents=True, exist_ok=True)
        files = sorted(cdir.iterdir())
        if per_class < len(files):
            pick = np.random.default_rng([seed, ci]).choice(len(files), per_class, replace=False)
            files = [files[i] for i in sorted(pick)]
        for f in files:
            link = tmp / cdir.name / f.name
            if not link.is_symlink():
                link.symlink_to(f.resolve())
    os.replace(tmp, dst)
    return dst


def ensure_store(src: Path, out: Path, split: str, student_res: int, workers: int,
                 val_fraction: float = 0.0) -> dict:
    """Reuse ``out`` if it verifies, else convert ``src`` into it; with
    ``val_fraction > 0`` the conversion also holds out that share of each
    class as the validation store beside it (``convert --val-fraction``), and
    both must verify with that fraction to be reused.

    ``verify_store`` returns summary lines when the store agrees with its
    manifest and raises ``VerifyError`` (damaged) or ``StoreError`` (missing,
    incomplete); either way, and for a store made from another source, the
    split is converted again and the reason is printed in one line."""
    from dataset_tools.convert import main as convert_main
    from dataset_tools.verify import VerifyError, verify_store

    t0 = time.perf_counter()
    why = None
    try:
        made_from = open_store(out).manifest["source"]["path"]
        holdout = open_store(out).manifest.get("holdout") or {}
        if Path(made_from).resolve() != Path(src).resolve():  # a store of another subset is not reused
            why = f"it was made from {made_from}, not {src}"
        elif float(holdout.get("val_fraction", 0.0)) != val_fraction:
            why = f"it holds out {holdout.get('val_fraction', 0.0)} of train, not {val_fraction}"
        else:
            verify_store(out)
            if val_fraction > 0:
                verify_store(out.with_name("val"))
    except StoreError as e:
        why = str(e).splitlines()[0]
    except VerifyError as e:
        why = f"it is damaged ({len(e.problems)} problem(s), first: {e.problems[0]})"
    except (KeyError, TypeError, ValueError, OSError) as e:  # a malformed manifest
        why = f"its manifest is malformed ({type(e).__name__}: {e})"
    reused = why is None
    if not reused:
        print(f"store {out}: converting again: {why}", flush=True)
        if out.is_dir() and not (out / "manifest.json").is_file():
            # an incomplete store (no manifest): convert refuses to replace a
            # directory that is not a store, so clear ours, only if it holds
            # nothing but this split's store files
            ours = {f"{split}.beton", f"{split}_lowres.beton", f"{split}_wds"}
            if all(p.name in ours for p in out.iterdir()):
                shutil.rmtree(out)
        args = [str(src), str(out), "--split-name", split, "--write-mode", "raw",
                "--workers", str(workers), "--student-resolution", str(student_res)]
        if val_fraction > 0:
            args += ["--val-fraction", str(val_fraction)]
        if convert_main(args) != 0:
            raise SystemExit(f"conversion of {src} failed")
    return {"seconds": time.perf_counter() - t0, "reused": reused}


def with_overrides(cfg: Config, sections: dict) -> Config:
    for name, kw in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **kw)})
    return cfg


def timed(stage: str, times: dict, fn, *args):
    t0 = time.perf_counter()
    print(f"\n=== {stage} ===", flush=True)
    out = fn(*args)
    times[stage] = time.perf_counter() - t0
    return out


def loader_images_per_sec(cfg: Config) -> float:
    """One epoch of the student's training loader alone (no model), warm-up excluded."""
    import torch

    from pipelines.loader import create_loader
    from trainer.data import loader_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with create_loader(loader_config(cfg, "train", device, role="student")) as loader:
        loader.set_epoch(0)
        it = iter(loader)
        next(it)  # warm-up: workers start, first batch
        t0, n = time.perf_counter(), 0
        for batch in it:
            n += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / max(time.perf_counter() - t0, 1e-9)


def prepare(cfg: Config, args, times: dict) -> dict:
    """Stores, teacher, temperature and teacher cache (each reused if present)."""
    from trainer import jobs

    root = cfg.run.root
    if getattr(args, "fresh", False) and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    data = shared_datasets_dir() / "cifar100"
    stores = Path(cfg.data.train_store).parent
    for split in ("train", "test"):
        src = data / split
        if args.classes < 100 or args.per_class:
            per = args.per_class if split == "train" else 10**9
            name = f"src_{split}_{args.classes}classes" + (f"_{per}drawn" if split == "train" else "")
            src = link_subset(src, stores / name, args.classes, per or 10**9)
        info = timed(f"convert {split}", times, ensure_store, src, stores / split, split,
                     cfg.data.student_size, args.workers, args.val_fraction if split == "train" else 0.0)
        print(f"store {split}: {'reused (verified)' if info['reused'] else 'converted'}")
    if cfg.teacher_checkpoint.is_file() and load_checkpoint(cfg.teacher_checkpoint)["data_fingerprint"] \
            != open_store(cfg.data.train_store).fingerprint:
        print("the stored teacher was trained on other data: starting this run over")
        shutil.rmtree(root)
        root.mkdir(parents=True)
    if not cfg.teacher_checkpoint.is_file():
        timed("teacher", times, jobs.run_teacher, cfg)
    if not cfg.temperature_file.is_file() or json.loads(cfg.temperature_file.read_text()).get("split") != "val":
        timed("calibrate", times, jobs.run_calibrate, cfg)
    if not cache_is_current(cfg):
        timed("cache", times, jobs.run_cache, cfg)
    return json.loads(cfg.temperature_file.read_text())


def cache_is_current(cfg: Config) -> bool:
    """Whether the run's teacher cache exists with its fill record, the key
    this recipe, teacher and machine expect and the spatial maps a fill would
    store now (else it is removed, to be refilled)."""
    import torch

    from trainer.data import cache_key, teacher_cache_format, teacher_cache_path
    from trainer.distill.logit_cache import CacheError, CacheTooLargeError, remove_cache
    from trainer.distill.teacher_cache import open_teacher_cache, spatial_layout
    from trainer.models import create_model
    from trainer.run_settings import amp_dtype

    store = open_store(cfg.data.train_store)
    path = teacher_cache_path(cfg, store)
    if not path.exists() or not path.with_suffix(".json").is_file():
        return False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = cache_key(cfg, load_checkpoint(cfg.teacher_checkpoint)["weights_hash"],
                    store.fingerprint, device=device, amp=amp_dtype(cfg, device))
    try:
        cache = open_teacher_cache(path, key)
    except CacheTooLargeError:
        raise  # valid but too big for this machine: refilling would not help
    except CacheError as e:
        print(f"teacher cache: filling again ({str(e).splitlines()[0]})")
        remove_cache(path)
        return False
    arch = create_model(cfg.model.teacher, store.num_classes, low_res_stem=cfg.model.teacher_low_res_stem)
    _, grid = spatial_layout(teacher_cache_format(cfg, store), cfg.distill, arch, store.num_samples,
                             cfg.data.num_views)
    if cache.spatial_grid != grid:
        print(f"teacher cache: filling again (it has spatial maps of {cache.spatial_grid} cells a side, "
              f"distill.cache_spatial={cfg.distill.cache_spatial} asks for {grid}; 0 = none)")
        remove_cache(path)
        return False
    return True


def train_student(cfg: Config, tag: str, overrides: dict, times: dict) -> dict:
    """Distill (unless already done) and evaluate one student configuration."""
    from trainer import jobs

    scfg = with_overrides(replace(cfg, run=replace(cfg.run, tag=tag)), overrides)
    final = scfg.student_dir / "final.pt"
    changed = recipe_changes(scfg) if final.is_file() else []
    if changed:
        print(f"{scfg.student_dir}: trained with another recipe ({'; '.join(changed)}): training again")
        shutil.rmtree(scfg.student_dir)
    if not final.is_file():
        timed(f"distill {tag}", times, jobs.run_distill, scfg)
    ev = timed(f"evaluate {tag}", times, jobs.run_evaluate, scfg, str(final))
    ev["train_images_per_sec"] = median_train_rate(scfg.student_dir)
    return ev


def recipe_changes(scfg: Config) -> list[str]:
    """What differs between a finished student's resolved config and the one
    this run would train (``loss.temperature: auto`` resolved through the
    sweep, which is reused when current): a student is reused only if none."""
    from trainer.run_record import CONFIG_NAME, result_differences
    from trainer.yaml_config import read_yaml

    saved = scfg.student_dir / CONFIG_NAME
    if not saved.is_file():
        return [f"no {CONFIG_NAME}"]
    if scfg.loss.temperature == "auto" and scfg.distill.targets != "none":
        from trainer.sweep import apply_choice, run_sweep
        scfg = apply_choice(scfg, run_sweep(scfg))
    return result_differences(read_yaml(saved.read_text()) or {}, scfg)


def median_train_rate(run_dir: Path) -> float:
    """Median over epochs of the training loop's images/sec (from log.jsonl)."""
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["train_images_per_sec"] for r in log)


METRICS = ("top1", "ece", "nll", "brier", "train_images_per_sec", "eval_images_per_sec",
           "posthoc_ece", "posthoc_nll", "ece_floor")


def aggregate(runs: list[dict]) -> dict:
    """Mean, sample standard deviation and the per-seed values of each metric."""
    out = {"seeds": len(runs), "per_seed": runs}
    for m in METRICS:
        vals = [r[m] for r in runs if m in r]
        if not vals:
            continue
        out[m] = statistics.fmean(vals)
        out[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    out["reliability_diagram"] = runs[0]["reliability_diagram"]
    out["logits_file"] = runs[0].get("logits_file")
    return out


def verdict(results: dict) -> dict:
    """The demo's headline: does the recommended student beat the supervised
    low-resolution one on top-1, and match or beat it on ECE, and is its ECE
    at most half of plain KD's (means over seeds, on the test split)?"""
    rec, sup, kd = results["recommended"], results["supervised_lowres"], results["kd"]
    d_top1 = rec["top1"] - sup["top1"]
    checks = {"top1_at_least_1pt_above_supervised": d_top1 >= 0.01,
              "ece_not_above_supervised": rec["ece"] <= sup["ece"],
              "ece_at_most_half_of_kd": rec["ece"] <= 0.5 * kd["ece"]}
    # for the record, not a goal: the supervised student temperature-scaled on val too
    sup_ts = sup.get("posthoc_ece", float("nan"))
    return {"top1_gain_over_supervised": d_top1, "ece_recommended": rec["ece"],
            "ece_supervised": sup["ece"], "ece_kd": kd["ece"], **checks, "all": all(checks.values()),
            "ece_supervised_after_val_ts": sup_ts}


def run(cfg: Config, args) -> dict:
    from benchmarks.common import machine_info
    from benchmarks.report import print_table, write_report
    from trainer import jobs
    from trainer.sweep import run_sweep

    times: dict[str, float] = {}
    t_start = time.perf_counter()
    calib = prepare(cfg, args, times)
    sweep = timed("sweep", times, run_sweep, with_overrides(cfg, RECOMMENDED))  # the recommended's sweep
    c = sweep["choice"]
    print(f"sweep chose T={c['temperature']:g}, {c['objective']}, calibrated teacher "
          f"{'on' if c['calibrated'] else 'off'} (val top-1 {c['val_top1']:.3f}, val ECE {c['val_ece']:.3f})")
    results = {"teacher": timed("evaluate teacher", times, jobs.run_evaluate, cfg, str(cfg.teacher_checkpoint))}
    results["teacher"]["train_images_per_sec"] = median_train_rate(cfg.teacher_dir)
    results["teacher"] = aggregate([results["teacher"]])
    for tag, overrides in STUDENTS:
        runs = []
        for seed in range(args.seeds):
            scfg = replace(cfg, run=replace(cfg.run, seed=seed))
            runs.append(train_student(scfg, f"{tag}_s{seed}", overrides, times))
        results[tag] = aggregate(runs)
    t0 = time.perf_counter()
    loader_rate = loader_images_per_sec(cfg)
    times["loader benchmark"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = loop_efficiencies(cfg)
    times["loop-efficiency benchmark"] = time.perf_counter() - t0
    for name, r in results.items():
        r["loop_efficiency"] = pairs[LOOP_KIND[name]]["loop_efficiency"]["median"]
    plain = {kind: statistics.median(p["plain_images_per_sec"]) for kind, p in pairs.items()}
    summary = {"plain_loop_images_per_sec": plain,
               "loop_efficiency": {kind: {**p["loop_efficiency"], "rounds": p["rounds"], "pairing": p["pairing"]}
                                   for kind, p in pairs.items()},
               "config": args.config, "calibration": calib, "sweep": sweep, "results": results,
               "verdict": verdict(results), "seeds": args.seeds,
               "loader_images_per_sec": loader_rate, "stage_seconds": times,
               "wall_seconds": time.perf_counter() - t_start, "machine": machine_info(),
               "splits": {"train": cfg.data.train_store, "val": cfg.data.val_store,
                          "test": cfg.data.test_store, "val_fraction": args.val_fraction}}
    write_json_atomic(cfg.run.root / "demo.json", json.loads(json.dumps(summary, default=str)))
    report = write_report(cfg.run.root, summary)
    print_table(summary)
    print(f"\nreport: {report}")
    return summary


# the kind of loop (benchmarks.loop_profile.KINDS) each row of the table trains with
LOOP_KIND = {"teacher": "teacher", "supervised_lowres": "supervised", "kd": "kd_cached",
             "recommended": "kd_cached"}


def loop_efficiencies(cfg: Config, rounds: int = 3) -> dict:
    """:func:`benchmarks.loop_pairs.paired_efficiency` of each kind of job in
    the table, on the demo's recipe: ``rounds`` rounds of whole epochs
    (about half a second of them for a student), each job step paired with a
    plain-loop step on the CPU. The kd and recommended students train the
    same loop (cached KD; the recommended one only differs in its
    temperature and its calibration after the last epoch)."""
    from benchmarks.loop_pairs import paired_efficiency

    return {kind: paired_efficiency(cfg, kind, rounds=rounds, min_round_seconds=0.5)
            for kind in dict.fromkeys(LOOP_KIND.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the real-scale CIFAR-100 recipe (GPU)")
    p.add_argument("--config", default=None, help="recipe (default: configs/demo_cpu.yaml, "
                   "or configs/cifar100.yaml with --full)")
    p.add_argument("--classes", type=int, default=None, help="CIFAR-100 classes to use")
    p.add_argument("--per-class", type=int, default=None, help="train images per class")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3, help="student seeds per recipe (mean and spread)")
    p.add_argument("--val-fraction", type=float, default=None, help="share of each training class "
                   "held out as the validation split (default 0.2, 0.1 with --full)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.epochs=5")
    args = p.parse_intermixed_args(argv)
    if args.config is None:
        args.config = str(REPO / "configs" / ("cifar100.yaml" if args.full else "demo_cpu.yaml"))
    if args.classes is None:
        args.classes = 100 if args.full else 20
    if args.val_fraction is None:
        args.val_fraction = 0.1 if args.full else 0.2
    if args.per_class is None:
        args.per_class = 0 if args.full else 100
    try:
        cfg = load_config(Config, args.config, args.overrides)
        run(cfg, args)
    except CqkdError as e:  # a bad key or value, a refused resume, a damaged store ...
        return exit_with_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
