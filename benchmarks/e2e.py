"""End-to-end distillation on a CIFAR-100 subset: images/sec and loop
efficiency next to calibration.

    python -m benchmarks.e2e [--quick] [--classes 10] [--train-per-class 100] [--backend memory] [--json]

Takes the first ``--classes`` classes of CIFAR-100 (``--train-per-class`` /
``--test-per-class`` files each, symlinked from the shared datasets), converts
them into a temporary folder (not timed), then runs the trainer's own jobs
(``trainer.jobs``) on the project recipe (``configs/cifar100.yaml``, with the
sizes below overridden): teacher (CE at full resolution), teacher-logit cache,
student KD from the cache, student KD + CutMix, student KD from the online
teacher. For every training phase it reports train images/sec (median over
epochs after the first, which pays for worker start-up and JIT compilation)
next to the final val ECE and top-1, so a speed-up that costs calibration
shows up in one place, and:

* **loop efficiency**: that rate over the plain PyTorch loop's
  (:class:`benchmarks.loop_efficiency.PlainLoop`: the same
  model, batch size, resolution, memory format and device, one fixed batch of
  random tensors, forward + backward + SGD step), measured in this run just
  before and just after the phase (median of both), so a machine whose speed
  drifts moves numerator and denominator alike;
* **paired loop efficiency** (``loop_efficiency_paired``): after the jobs,
  each training phase's recipe measured again with
  :func:`benchmarks.loop_pairs.paired_efficiency` (``pair_rounds`` rounds
  of whole epochs, each step of the job paired with a plain-loop step on
  the CPU), the figure that survives a machine whose speed drifts; the
  CutMix phase is measured as that kind mixes every batch (``--p-cutmix 1``,
  the default);
* **time to first step**: from the ``Trainer``'s construction (stores opened,
  loaders built, numba compiled or loaded from its cache) to the end of the
  first optimizer step, from the job's ``log.jsonl``.

Peak RSS per phase is that of this process and its loader workers while the
phase runs; all phases share one process, so memory freed by an earlier phase
may still be counted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common import PeakRSS, machine_info, summarize

_REPO = Path(__file__).resolve().parent.parent
RECIPE = _REPO / "configs" / "cifar100.yaml"


@dataclass
class E2ESettings:
    classes: int = 20
    train_per_class: int = 250
    test_per_class: int = 50
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    teacher_resolution: int = 32
    student_resolution: int = 16
    teacher_epochs: int = 10
    student_epochs: int = 10
    batch_size: int = 128
    num_views: int = 4
    backend: str = "memory"
    channels_last: bool = True
    workers: int = 2
    p_cutmix: float = 1.0
    seed: int = 0
    pair_rounds: int = 5  # rounds of benchmarks.loop_pairs per training phase (0: none)
    pair_seconds: float = 1.0  # each round's epochs last about this long


# --quick: a few minutes on 2 CPU cores (small CIFAR models, 1000 train images)
QUICK = dict(classes=10, train_per_class=100, test_per_class=50, teacher="resnet20",
             student="resnet8", teacher_epochs=4, student_epochs=6, batch_size=64)


def link_subset(src: Path, dst: Path, classes: int, per_class: int) -> int:
    """Symlink the first ``per_class`` files (sorted) of the first ``classes``
    class folders (sorted): the files read are the originals."""
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < classes:
        raise SystemExit(f"{src}: has {len(class_dirs)} class folders, --classes asks for {classes}")
    n = 0
    for c in class_dirs[:classes]:
        (dst / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:per_class]:
            (dst / c.name / f.name).symlink_to(f.resolve())
            n += 1
    return n


def convert_subsets(s: E2ESettings, data: Path, root: Path) -> dict:
    from dataset_tools.convert import convert
    from dataset_tools.convert_options import ConvertOptions

    stores = {}
    for split, per_class in (("train", s.train_per_class), ("test", s.test_per_class)):
        src = data / "cifar100" / split
        if not src.is_dir():
            raise SystemExit(f"{src}: CIFAR-100 split not found; set CQKD_DATA or pass --data")
        link_subset(src, root / f"src_{split}", s.classes, per_class)
        opts = ConvertOptions(write_mode="raw", split_name=split, workers=s.workers,
                              student_resolution=s.student_resolution if split == "train" else None,
                              val_fraction=0.2 if split == "train" else 0.0)  # val: held out from train
        convert(root / f"src_{split}", root / split, opts, progress=False)
        stores[split] = root / split
    stores["val"] = root / "val"
    return stores


def make_config(s: E2ESettings, stores: dict, out_dir: Path):
    from trainer.yaml_config import load_config
    from trainer.recipe import Config

    cfg = load_config(Config, RECIPE, [])
    cfg.run = replace(cfg.run, name="e2e", out_dir=str(out_dir), seed=s.seed, progress=False)
    cfg.data = replace(cfg.data, train_store=str(stores["train"]), val_store=str(stores["val"]),
                       test_store=str(stores["test"]), backend=s.backend, batch_size=s.batch_size, num_workers=s.workers,
                       teacher_resolution=s.teacher_resolution,
                       student_resolution=s.student_resolution, student_factor=0.0,
                       num_views=s.num_views, channels_last=s.channels_last)
    cfg.model = replace(cfg.model, teacher=s.teacher, student=s.student)
    # both set: the recipe has its own teacher_epochs (0 would mean "same as epochs")
    cfg.optim = replace(cfg.optim, epochs=s.student_epochs, teacher_epochs=s.teacher_epochs)
    return cfg


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def phase_result(result: dict, log: Path, seconds: float, peak_mb: float, plain: list[float]) -> dict:
    records = _log(log)
    rates = [r["train_images_per_sec"] for r in records]
    timed = rates[1:] if len(rates) > 1 else rates  # epoch 0 pays for start-up and JIT
    rate = summarize(timed)
    base = statistics.median(plain)
    return {"images_per_sec": rate, "epoch_images_per_sec": rates,
            "plain_loop_images_per_sec": summarize(plain),
            "loop_efficiency": {"median": rate["median"] / base, "min": rate["min"] / base,
                                "max": rate["max"] / base, "n": rate["n"]},
            "first_step_seconds": records[0].get("first_step_seconds"),
            "val_ece": result["val_ece"], "val_top1": result["val_top1"],
            "val_nll": result.get("val_nll"), "seconds": seconds, "peak_rss_mb": peak_mb}


def plain_rates(cfg, role: str, num_classes: int, repeats: int = 3) -> list[float]:
    """``repeats`` blocks of the plain loop for ``role``'s model and input
    (see module docstring); with the online teacher, its forward included."""
    from benchmarks.loop_efficiency import plain_loop_for

    return plain_loop_for(cfg, role, num_classes).block_rates(warmup=5, steps=20, repeats=repeats)


PAIRED_KIND = {"teacher": "teacher", "student_kd": "kd_cached", "student_kd_cutmix": "kd_cutmix",
               "student_kd_online": "kd_online"}  # phase -> benchmarks.loop_profile.KINDS


def run(s: E2ESettings, data: Path) -> dict:
    from trainer import jobs

    out = {}
    with tempfile.TemporaryDirectory(prefix="cqkd-bench-e2e-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        stores = convert_subsets(s, data, root)
        convert_s = time.perf_counter() - t0
        cfg = make_config(s, stores, root / "runs")

        from dataset_tools.stores.layout import open_store
        classes = open_store(stores["train"]).num_classes

        def timed(fn, c, role=None):
            before = plain_rates(c, role, classes) if role else []
            with PeakRSS() as mem:
                t = time.perf_counter()
                r = fn(c)
            sec = time.perf_counter() - t
            return r, sec, mem.peak_mb, before + (plain_rates(c, role, classes) if role else [])

        r, sec, mb, plain = timed(jobs.run_teacher, cfg, "teacher")
        print(f"teacher: val top-1 {r['val_top1']:.3f}, ECE {r['val_ece']:.3f} ({sec:.0f} s)",
              file=sys.stderr)
        out["teacher"] = phase_result(r, cfg.teacher_dir / "log.jsonl", sec, mb, plain)
        configs = {"teacher": cfg}
        r, sec, mb, _ = timed(jobs.run_cache, cfg)
        views = r["num_samples"] * r["num_views"]
        out["cache"] = {"images_per_sec": summarize([views / r["seconds"]]), "seconds": sec,
                        "peak_rss_mb": mb, "fp16_max_abs_error": r["fp16_max_abs_error"]}
        student = cfg
        for tag, mix, targets in (("student_kd", {}, "cached"),
                                  ("student_kd_cutmix", {"p_cutmix": s.p_cutmix}, "cached"),
                                  ("student_kd_online", {}, "online")):
            c = replace(student, run=replace(student.run, tag=tag), mix=replace(student.mix, **mix),
                        distill=replace(student.distill, targets=targets))
            r, sec, mb, plain = timed(jobs.run_distill, c, "student")
            print(f"{tag}: val top-1 {r['val_top1']:.3f}, ECE {r['val_ece']:.3f} ({sec:.0f} s)",
                  file=sys.stderr)
            out[tag] = phase_result(r, c.student_dir / "log.jsonl", sec, mb, plain)
            configs[tag] = c
        if s.pair_rounds > 0:
            from benchmarks.loop_pairs import paired_efficiency

            for tag, kind in PAIRED_KIND.items():
                e = paired_efficiency(configs[tag], kind, s.pair_rounds, s.pair_seconds)["loop_efficiency"]
                out[tag]["loop_efficiency_paired"] = {**e, "n": s.pair_rounds}
    loss = cfg.loss
    return {
        "benchmark": "end-to-end distillation on a CIFAR-100 subset (trainer.jobs)",
        "method": "train images/sec = median over epochs after the first; loop efficiency = that "
                  "over the plain PyTorch loop's images/sec (same model, batch, resolution, memory "
                  "format, device; 3 blocks before and 3 after the phase, median); paired loop "
                  "efficiency = benchmarks.loop_pairs on each phase's recipe after the jobs (median "
                  "over pair_rounds rounds); val ECE/top-1 of the final epoch; conversion not timed",
        "settings": {**asdict(s), "recipe": str(RECIPE.relative_to(_REPO)),
                     "loss": {"ce": loss.ce, "kd": loss.kd, "temperature": loss.temperature},
                     "config": json.loads(json.dumps(asdict(cfg), default=str)),
                     "train_images": s.classes * s.train_per_class,
                     "test_images": s.classes * s.test_per_class},
        "convert_seconds": convert_s,
        "results": out,
        "machine": machine_info(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = E2ESettings()
    p.add_argument("--quick", action="store_true", help=f"few minutes on 2 cores: {QUICK}")
    p.add_argument("--data", type=Path, help="datasets folder (default: $CQKD_DATA or ../shared/datasets)")
    for name, value in asdict(d).items():
        flag = f"--{name.replace('_', '-')}"
        extra = f" ({QUICK[name]} with --quick)" if name in QUICK else ""
        p.add_argument(flag, type=type(value), default=None, help=f"default {value}{extra}")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    a = p.parse_args(argv)
    values = {**(QUICK if a.quick else {}),
              **{k: v for k, v in vars(a).items() if k in E2ESettings.__dataclass_fields__ and v is not None}}
    s = E2ESettings(**values)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.data is None:
        from dataset_tools.locate import shared_datasets_dir
        a.data = shared_datasets_dir()
    report = run(s, a.data)
    report["settings"]["quick"] = bool(a.quick)
    report["settings"]["threads"] = a.threads
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'phase':18s} {'img/s':>9s} {'loop eff.':>9s} {'paired':>7s} {'1st step s':>10s} "
              f"{'val ECE':>8s} {'top-1':>7s} {'peak MB':>8s}")
        nan = float("nan")
        for name, r in report["results"].items():
            eff = r.get("loop_efficiency", {}).get("median", nan)
            paired = r.get("loop_efficiency_paired", {}).get("median", nan)
            first = r.get("first_step_seconds") or nan
            print(f"{name:18s} {r['images_per_sec']['median']:9.0f} {eff:9.2f} {paired:7.2f} {first:10.1f} "
                  f"{r.get('val_ece', nan):8.3f} {r.get('val_top1', nan):7.3f} {r['peak_rss_mb']:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
