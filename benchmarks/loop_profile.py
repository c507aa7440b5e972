"""Where the training loop's time goes: the phases of ``Trainer.train_step``
and its loop, per job kind, on a recipe's real stores.

    python -m benchmarks.loop_profile --config configs/demo_cpu.yaml \
        [--kinds teacher supervised kd_cached kd_cutmix kd_online] [--json] [key=value ...]

For each kind a real :class:`trainer.engine.Trainer` is built on the recipe
(the teacher kinds need its teacher checkpoint, the cached ones its teacher
cache: run ``make demo`` or the jobs first), one epoch runs as a warm-up, one
unprofiled epoch gives the reference rate, then one epoch plus a validation
pass run under ``torch.profiler``. The engine labels its phases with
``record_function`` (``data``: waiting for the loader's next batch,
including host-to-device copies; ``mix``; ``targets``: cache lookup or the
online teacher; ``forward_loss``; ``backward``; ``optimizer``: step and
scheduler; ``stats``: on-device metric sums; ``logging``), and this module
adds ``validation``; ``other`` is the epoch's wall time not under any label
(the Python loop itself). Reported: milliseconds per step and the share of
the epoch per phase, the profiled and unprofiled images/sec (the profiler's
own overhead is their difference).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("data", "mix", "targets", "forward_loss", "backward", "optimizer", "stats", "logging")
KINDS = {  # kind -> (role, section overrides)
    "teacher": ("teacher", {}),
    "supervised": ("student", {"distill": {"targets": "none"}, "loss": {"ce": 1.0, "kd": 0.0}}),
    "kd_cached": ("student", {"distill": {"targets": "cached"}}),
    "kd_cutmix": ("student", {"distill": {"targets": "cached"}, "mix": {"p_cutmix": 1.0}}),
    "kd_online": ("student", {"distill": {"targets": "online"}}),
}


def kind_config(cfg, kind: str):
    role, sections = KINDS[kind]
    # the teacher's folder is the run's: profile it in a sibling run, never over the trained teacher
    name = cfg.run.name + "_loop_profile" if role == "teacher" else cfg.run.name
    cfg = replace(cfg, run=replace(cfg.run, name=name, tag=f"loop_profile_{kind}", progress=False,
                                   resume=False))
    for name, kw in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **kw)})
    return cfg, role


def profile_kind(cfg, kind: str) -> dict:
    from trainer.engine import Trainer

    cfg, role = kind_config(cfg, kind)
    trainer = Trainer(cfg, role)
    try:
        def next_epoch():  # as Trainer.fit moves on
            trainer.epoch, trainer.step_in_epoch = trainer.epoch + 1, 0

        trainer.train_loop()  # warm-up
        next_epoch()
        plain = trainer.train_loop()
        next_epoch()
        steps = len(trainer.train_loader)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            profiled = trainer.train_loop()
            train_s = time.perf_counter() - t0
            with record_function("validation"):
                t1 = time.perf_counter()
                trainer.val_loop()
                val_s = time.perf_counter() - t1
    finally:
        trainer.close()
    totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in PHASES}  # ms
    phases = {p: totals.get(p, 0.0) for p in PHASES}
    phases["other"] = max(0.0, train_s * 1e3 - sum(phases.values()))
    wall_ms = train_s * 1e3
    return {"kind": kind, "role": role, "steps": steps, "batch_size": cfg.data.batch_size,
            "backend": cfg.data.backend, "train_images_per_sec": plain["train_images_per_sec"],
            "profiled_images_per_sec": profiled["train_images_per_sec"],
            "ms_per_step": {p: v / steps for p, v in phases.items()},
            "share_of_epoch": {p: v / wall_ms for p, v in phases.items()},
            "validation_ms": val_s * 1e3, "validation_share_of_epoch_plus_val": val_s / (train_s + val_s)}


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    cols = PHASES + ("other",)
    print(f"{'kind':11s} {'img/s':>7s} " + " ".join(f"{c[:8]:>8s}" for c in cols) + f" {'val ms':>7s}",
          file=file)
    for r in rows:
        print(f"{r['kind']:11s} {r['train_images_per_sec']:7.0f} "
              + " ".join(f"{100 * r['share_of_epoch'][c]:7.1f}%" for c in cols)
              + f" {r['validation_ms']:7.0f}", file=file)
    print("(shares of the profiled training epoch; ms per step in --json)", file=file)


def main(argv=None) -> int:
    from trainer.recipe import Config
    from trainer.yaml_config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.backend=reference")
    a = p.parse_intermixed_args(argv)
    cfg = load_config(Config, a.config, a.overrides)
    rows = [profile_kind(cfg, k) for k in a.kinds]
    if a.json:
        print(json.dumps({"config": str(a.config), "overrides": a.overrides, "results": rows}, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
