"""Loop efficiency of a recipe's real training jobs, measured in pairs.

    python -m benchmarks.loop_pairs --config configs/demo_cpu.yaml \
        [--kinds teacher kd_cached kd_cutmix kd_online] [--rounds 9] [--json] [key=value ...]

For each job kind (:data:`benchmarks.loop_profile.KINDS`) a real
:class:`trainer.engine.Trainer` is built on the recipe's stores (run ``make
demo`` or the jobs first: the cached kinds need the teacher cache, the
online one the teacher) next to its plain PyTorch loop
(:func:`benchmarks.loop_efficiency.plain_loop_for`). After one warm-up epoch
of each, every round times one training epoch of the job and, right beside
it, a plain-loop block of as many steps (their order alternating between
rounds; a round is as many whole epochs as last about
``--min-round-seconds``); the round's ratio is job images/sec over plain
images/sec. The figure is the median ratio over rounds.

Why pairs: on a shared two-core machine the speed of the whole machine
drifts by 10-30 % over tens of seconds, so a job's rate divided by a plain
loop timed minutes earlier or later (as ``benchmarks.e2e`` must, around
whole jobs) moves by as much as the effects being measured. Each pair sees
the same machine within about a second.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


def paired_efficiency(cfg, kind: str, rounds: int = 9, min_round_seconds: float = 2.0) -> dict:
    """``rounds`` pairs of (the job's epochs, a plain block of as many steps);
    each round runs whole epochs, as many as last about ``min_round_seconds``
    (judged by the warm-up epoch), so second-scale jitter averages out."""
    from benchmarks.loop_efficiency import plain_loop_for
    from benchmarks.loop_profile import kind_config
    from trainer.engine import Trainer

    cfg, role = kind_config(cfg, kind)
    trainer = Trainer(cfg, role)
    try:
        plain = plain_loop_for(cfg, role, trainer.num_classes, trainer.device)
        steps = len(trainer.train_loader)

        def job_epochs(n: int) -> float:
            """Images/sec over ``n`` epochs (as Trainer.fit moves on); every
            epoch has the same images, so the harmonic mean of their rates."""
            rates = []
            for _ in range(n):
                trainer.epoch, trainer.step_in_epoch = trainer.epoch + 1, 0
                rates.append(trainer.train_loop()["train_images_per_sec"])
            return statistics.harmonic_mean(rates)

        t0 = time.perf_counter()
        trainer.train_loop()  # warm-up: start-up and compilation
        epochs = max(1, math.ceil(min_round_seconds / (time.perf_counter() - t0)))
        plain.block_rate(min(steps, 5))
        job_rates, plain_rates = [], []
        for r in range(rounds):  # the order alternates, so a steady drift favours neither side
            if r % 2:
                plain_rates.append(plain.block_rate(steps * epochs))
            job_rates.append(job_epochs(epochs))
            if not r % 2:
                plain_rates.append(plain.block_rate(steps * epochs))
    finally:
        trainer.close()
    ratios = [j / p for j, p in zip(job_rates, plain_rates)]
    return {"kind": kind, "role": role, "steps_per_epoch": steps, "epochs_per_round": epochs, "rounds": rounds,
            "loop_efficiency": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "ratios": ratios, "job_images_per_sec": job_rates, "plain_images_per_sec": plain_rates}


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    print(f"{'kind':11s} {'efficiency':>10s} {'min':>6s} {'max':>6s} {'job img/s':>10s} {'plain img/s':>12s}",
          file=file)
    for r in rows:
        e = r["loop_efficiency"]
        print(f"{r['kind']:11s} {e['median']:10.3f} {e['min']:6.3f} {e['max']:6.3f} "
              f"{statistics.median(r['job_images_per_sec']):10.0f} "
              f"{statistics.median(r['plain_images_per_sec']):12.0f}", file=file)
    print(f"(median over {rows[0]['rounds'] if rows else 0} paired rounds of whole epochs)", file=file)


def main(argv=None) -> int:
    from benchmarks.loop_profile import KINDS
    from trainer.recipe import Config
    from trainer.yaml_config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--kinds", nargs="+", default=["teacher", "kd_cached", "kd_cutmix", "kd_online"],
                   choices=list(KINDS))
    p.add_argument("--rounds", type=int, default=9, help="paired epochs per kind (odd: a true median)")
    p.add_argument("--min-round-seconds", type=float, default=2.0,
                   help="each round runs whole epochs lasting about this long")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.backend=reference")
    a = p.parse_intermixed_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    cfg = load_config(Config, a.config, a.overrides)
    rows = [paired_efficiency(cfg, k, a.rounds, a.min_round_seconds) for k in a.kinds]
    if a.json:
        print(json.dumps({"config": str(a.config), "overrides": a.overrides, "results": rows}, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
