"""The main job, end to end: ``make demo`` (CPU scale) or ``--full`` (GPU scale).

convert (or reuse a verified store) -> teacher at full resolution -> calibrate
-> teacher-logit cache -> students at reduced resolution (KD, KD + CutMix,
KD + mixup, and the supervised low-resolution baseline) -> evaluate -> one
table (top-1, ECE, NLL, Brier, images/sec of the student loop and of the
loader, wall time per stage) and ``runs/<name>/report.md`` with reliability
diagrams and a throughput plot.

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

from dataset_tools.locate import shared_datasets_dir
from dataset_tools.stores.layout import StoreError, open_store
from trainer.checkpoint import load_checkpoint
from trainer.yaml_config import load_config
from trainer.recipe import Config

REPO = Path(__file__).resolve().parent.parent

# Students of the demo: (tag, overrides on top of the recipe). The recipe's
# loss section is the KD setting; these vary targets and mixing only.
STUDENTS = [
    ("supervised_lowres", dict(distill=dict(targets="none"), loss=dict(kd=0.0, ce=1.0))),
    ("kd", dict()),
    ("kd_mixup", dict(mix=dict(p_mixup=1.0))),
    ("kd_cutmix", dict(mix=dict(p_cutmix=1.0))),
]


def link_subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    """An ImageFolder of symlinks to the first ``classes`` x ``per_class`` files
    (sorted), so a CPU-sized subset converts without copying the data."""
    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    for cdir in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (tmp / cdir.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cdir.iterdir())[:per_class]:
            link = tmp / cdir.name / f.name
            if not link.is_symlink():
                link.symlink_to(f.resolve())
    os.replace(tmp, dst)
    return dst


def ensure_store(src: Path, out: Path, split: str, student_res: int, workers: int) -> dict:
    """Reuse ``out`` if it verifies, else convert ``src`` into it."""
    from dataset_tools.convert import main as convert_main
    from dataset_tools.verify import verify_store

    t0 = time.perf_counter()
    try:
        made_from = open_store(out).manifest["source"]["path"]
        # a store of another subset is not reused; a damaged one neither
        problems = verify_store(out) if Path(made_from) == Path(src) else ["other source"]
    except StoreError:
        problems = ["missing"]
    reused = not problems
    if problems:
        args = [str(src), str(out), "--split-name", split, "--write-mode", "raw",
                "--workers", str(workers), "--student-resolution", str(student_res)]
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
    from trainer.engine import loader_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with create_loader(loader_config(cfg, "student", True, device)) as loader:
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
    """Stores, teacher, temperature and logit cache (each reused if present)."""
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
            name = f"src_{split}_{args.classes}classes" + (f"_{per}each" if split == "train" else "")
            src = link_subset(src, stores / name, args.classes, per or 10**9)
        info = timed(f"convert {split}", times, ensure_store, src, stores / split, split,
                     cfg.data.student_size, args.workers)
        print(f"store {split}: {'reused (verified)' if info['reused'] else 'converted'}")
    if cfg.teacher_checkpoint.is_file() and load_checkpoint(cfg.teacher_checkpoint)["data_fingerprint"] \
            != open_store(cfg.data.train_store).fingerprint:
        print("the stored teacher was trained on other data: starting this run over")
        shutil.rmtree(root)
        root.mkdir(parents=True)
    if not cfg.teacher_checkpoint.is_file():
        timed("teacher", times, jobs.run_teacher, cfg)
    if not cfg.temperature_file.is_file():
        timed("calibrate", times, jobs.run_calibrate, cfg)
    if not cfg.cache_path.is_file():
        timed("cache", times, jobs.run_cache, cfg)
    return json.loads(cfg.temperature_file.read_text())


def train_student(cfg: Config, tag: str, overrides: dict, times: dict) -> dict:
    """Distill (unless already done) and evaluate one student configuration."""
    from trainer import jobs

    scfg = with_overrides(replace(cfg, run=replace(cfg.run, tag=tag)), overrides)
    final = scfg.student_dir / "final.pt"
    if not final.is_file():
        timed(f"distill {tag}", times, jobs.run_distill, scfg)
    ev = timed(f"evaluate {tag}", times, jobs.run_evaluate, scfg, str(final))
    ev["train_images_per_sec"] = median_train_rate(scfg.student_dir)
    return ev


def median_train_rate(run_dir: Path) -> float:
    """Median over epochs of the training loop's images/sec (from log.jsonl)."""
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["train_images_per_sec"] for r in log)


def run(cfg: Config, args) -> dict:
    from benchmarks.common import machine_info
    from benchmarks.report import write_report
    from trainer import jobs

    times: dict[str, float] = {}
    calib = prepare(cfg, args, times)
    results = {"teacher": timed("evaluate teacher", times, jobs.run_evaluate, cfg,
                                str(cfg.teacher_checkpoint))}
    results["teacher"]["train_images_per_sec"] = median_train_rate(cfg.teacher_dir)
    for tag, overrides in STUDENTS:
        results[tag] = train_student(cfg, tag, overrides, times)
    t0 = time.perf_counter()
    loader_rate = loader_images_per_sec(cfg)
    times["loader benchmark"] = time.perf_counter() - t0
    summary = {"config": args.config, "calibration": calib, "results": results,
               "loader_images_per_sec": loader_rate, "stage_seconds": times,
               "machine": machine_info()}
    (cfg.run.root / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    report = write_report(cfg.run.root, summary)
    print_table(summary)
    print(f"\nreport: {report}")
    return summary


def print_table(summary: dict) -> None:
    rows = [("model", "top-1", "ECE", "NLL", "Brier", "train img/s", "eval img/s")]
    for name, r in summary["results"].items():
        rows.append((name, f"{r['top1']:.3f}", f"{r['ece']:.3f}", f"{r['nll']:.3f}", f"{r['brier']:.3f}",
                     f"{r.get('train_images_per_sec', float('nan')):.0f}", f"{r['eval_images_per_sec']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    c = summary["calibration"]
    print(f"\nteacher temperature T={c['temperature']:.2f}: ECE {c['ece_before']:.3f} -> "
          f"{c['ece_after_crossfit']:.3f} (cross-fitted on the test split)")
    print(f"student loader alone: {summary['loader_images_per_sec']:.0f} images/sec")
    print("wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the real-scale CIFAR-100 recipe (GPU)")
    p.add_argument("--config", default=None, help="recipe (default: configs/demo_cpu.yaml, "
                   "or configs/cifar100.yaml with --full)")
    p.add_argument("--classes", type=int, default=None, help="CIFAR-100 classes to use")
    p.add_argument("--per-class", type=int, default=None, help="train images per class")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.epochs=5")
    args = p.parse_intermixed_args(argv)
    if args.config is None:
        args.config = str(REPO / "configs" / ("cifar100.yaml" if args.full else "demo_cpu.yaml"))
    if args.classes is None:
        args.classes = 100 if args.full else 20
    if args.per_class is None:
        args.per_class = 0 if args.full else 100
    cfg = load_config(Config, args.config, args.overrides)
    run(cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
