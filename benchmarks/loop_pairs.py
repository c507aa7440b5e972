"""Loop efficiency of a recipe's real training jobs, measured in pairs.

    python -m benchmarks.loop_pairs --config configs/demo_cpu.yaml \
        [--kinds teacher kd_cached kd_cutmix kd_online] [--rounds 9] [--json] [key=value ...]

For each job kind (:data:`benchmarks.loop_profile.KINDS`) a real
:class:`trainer.engine.Trainer` is built on the recipe's stores (run ``make
demo`` or the jobs first: the cached kinds need the teacher cache, the
online one the teacher) next to its plain PyTorch loop
(:func:`benchmarks.loop_efficiency.plain_loop_for`). After one warm-up epoch
of each, every round runs whole training epochs of the job (as many as last
about ``--min-round-seconds``) and as many plain-loop steps, paired:

* ``steps`` (the default on the CPU): one plain step runs right before each
  batch reaches the trainer (:class:`PlainBetweenSteps`), timed apart; the
  job's time is the epochs' wall time less the plain steps'. The two
  alternate every ~20 ms.
* ``epochs`` (the default on CUDA, where timing one plain step means a
  synchronization that would also drain the job's queued work): a plain
  block of as many steps runs before or after the round's epochs, the order
  alternating between rounds.

The round's ratio is job images/sec over plain images/sec; the figure is the
median over rounds.

Why pairs: on a shared two-core machine the speed of the whole machine
drifts by 10-30 % over tens of seconds, so a job's rate divided by a plain
loop timed minutes earlier or later (as ``benchmarks.e2e`` must, around
whole jobs) moves by as much as the effects being measured. Epoch pairs see
the same machine within about a second (round ratios on the demo still
ranged 0.70-1.08 on a noisy day); step pairs within ~20 ms (the same
jobs' rounds within +-0.04), at the price of each side running with the
other's model in the CPU caches between its steps; the medians of the two
agreed within 0.01 on the demo's student kinds.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

PAIRINGS = ("auto", "steps", "epochs")


class PlainBetweenSteps:
    """A trainer's train loader with one plain-loop step run, and timed, just
    before each batch is handed on; everything else is the loader's own."""

    def __init__(self, loader, plain):
        self.loader, self.plain = loader, plain
        self.seconds, self.steps = 0.0, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            t0 = time.perf_counter()
            self.plain.step()
            self.seconds += time.perf_counter() - t0
            self.steps += 1
            yield batch


def paired_efficiency(cfg, kind: str, rounds: int = 9, min_round_seconds: float = 2.0,
                      pairing: str = "auto") -> dict:
    """``rounds`` rounds of whole epochs of the job, each paired with as many
    plain-loop steps (``pairing``: see the module docstring)."""
    from benchmarks.loop_efficiency import plain_loop_for
    from benchmarks.loop_profile import kind_config
    from trainer.engine import Trainer

    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    cfg, role = kind_config(cfg, kind)
    trainer = Trainer(cfg, role)
    loader = trainer.train_loader
    try:
        plain = plain_loop_for(cfg, role, trainer.num_classes, trainer.device)
        if pairing == "auto":
            pairing = "epochs" if trainer.device.type == "cuda" else "steps"
        steps, batch = len(loader), plain.batch_size

        def job_epochs(n: int) -> tuple[float, int]:
            """Seconds and images of ``n`` epochs (as Trainer.fit moves on;
            train loaders drop the last partial batch, so full batches)."""
            t0 = time.perf_counter()
            for _ in range(n):
                trainer.epoch, trainer.step_in_epoch = trainer.epoch + 1, 0
                trainer.train_loop()
            return time.perf_counter() - t0, n * steps * batch

        t0 = time.perf_counter()
        trainer.train_loop()  # warm-up: start-up and compilation
        epochs = max(1, math.ceil(min_round_seconds / (time.perf_counter() - t0)))
        plain.block_rate(min(steps, 5))
        job_rates, plain_rates = [], []
        for r in range(rounds):
            if pairing == "steps":
                trainer.train_loader = between = PlainBetweenSteps(loader, plain)
                wall, images = job_epochs(epochs)
                trainer.train_loader = loader
                job_rates.append(images / (wall - between.seconds))
                plain_rates.append(between.steps * batch / between.seconds)
                continue
            if r % 2:  # epochs: the order alternates, so a steady drift favours neither side
                plain_rates.append(plain.block_rate(steps * epochs))
            wall, images = job_epochs(epochs)
            job_rates.append(images / wall)
            if not r % 2:
                plain_rates.append(plain.block_rate(steps * epochs))
    finally:
        trainer.train_loader = loader
        trainer.close()
    ratios = [j / p for j, p in zip(job_rates, plain_rates)]
    return {"kind": kind, "role": role, "pairing": pairing, "steps_per_epoch": steps,
            "epochs_per_round": epochs, "rounds": rounds,
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
    pairing = rows[0]["pairing"] if rows else "steps"
    print(f"(median over {rows[0]['rounds'] if rows else 0} rounds of whole epochs, paired with the plain "
          f"loop by {'step' if pairing == 'steps' else 'epoch'})", file=file)


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
    p.add_argument("--pairing", choices=PAIRINGS, default="auto",
                   help="steps: a plain step before each job step; epochs: plain blocks between "
                        "rounds of epochs; auto: steps on the CPU, epochs on CUDA")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.backend=reference")
    a = p.parse_intermixed_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    cfg = load_config(Config, a.config, a.overrides)
    rows = [paired_efficiency(cfg, k, a.rounds, a.min_round_seconds, a.pairing) for k in a.kinds]
    if a.json:
        print(json.dumps({"config": str(a.config), "overrides": a.overrides, "results": rows}, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
