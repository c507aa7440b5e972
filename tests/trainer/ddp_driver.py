"""Runs trainer jobs under torchrun for the multi-process tests and records
what each rank ends with (``python -m torch.distributed.run ... ddp_driver.py
SPEC.json``; see ``tests/trainer/test_distributed.py``).

SPEC: ``{"stores": {...}, "out": DIR, "steps": [{"name", "job", "sections"}]}``
with ``job`` one of ``fit_teacher``, ``fit_student`` (a Trainer's ``fit()``;
``"interrupt_at": k`` first stops it after k steps, then resumes it in a new
Trainer with ``run.resume``), ``calibrate``, ``cache``, ``distill``,
``evaluate``, ``corruptions`` (``evaluate --corruptions`` with the step's
``types``, ``severities``, ``limit``), ``sweep``. Each rank writes ``DIR/ranks/<name>.rank<r>.json``
with the job's result and, for fits, hashes of its final modules.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from trainer import distributed, jobs
from trainer.checkpoint import unwrap, weights_hash
from trainer.engine import Trainer
from trainer_helpers import make_cfg


def _hashes(trainer: Trainer) -> dict:
    """Parameters and buffers of the model and of the loss (CRD heads, memory
    banks, log Z), hashed separately so a mismatch names what differs."""
    model, crit = unwrap(trainer.model), trainer.criterion
    return {"model_state": weights_hash(model.state_dict()),
            "criterion_state": weights_hash(crit.state_dict()),
            "model_params": weights_hash(dict(model.named_parameters())),
            "model_buffers": weights_hash(dict(model.named_buffers())),
            "criterion_params": weights_hash(dict(crit.named_parameters())),
            "criterion_buffers": weights_hash(dict(crit.named_buffers())),
            "num_criterion_params": sum(p.numel() for p in crit.parameters()),
            "loss_is_ddp": trainer.loss_fn is not trainer.criterion}


def _fit(cfg, role: str, interrupt_at: int = 0) -> dict:
    if interrupt_at:
        first = Trainer(replace(cfg, run=replace(cfg.run, max_steps=interrupt_at)), role)
        try:
            first.fit()
        finally:
            first.close()
        assert not (first.out_dir / "final.pt").exists()
        cfg = replace(cfg, run=replace(cfg.run, resume=True))
    trainer = Trainer(cfg, role)
    try:
        last = trainer.fit()
        return {"result": last, **_hashes(trainer), "global_step": trainer.global_step}
    finally:
        trainer.close()


def run_step(stores: dict, out: str, step: dict) -> dict:
    cfg = make_cfg(stores, out, **step.get("sections", {}))
    job = step["job"]
    if job in ("fit_teacher", "fit_student"):
        return _fit(cfg, job.split("_")[1], step.get("interrupt_at", 0))
    if job == "sweep":
        from trainer.sweep import run_sweep

        return {"result": run_sweep(cfg)}
    if job == "evaluate":
        return {"result": jobs.run_evaluate(cfg, step.get("checkpoint", ""))}
    if job == "corruptions":
        return {"result": jobs.run_evaluate_corruptions(cfg, step.get("checkpoint", ""), step["severities"],
                                                        step["types"], limit=step["limit"])}
    return {"result": getattr(jobs, f"run_{job}")(cfg)}


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    ranks = Path(spec["out"]) / "ranks"
    for step in spec["steps"]:
        rec = run_step(spec["stores"], spec["out"], step)
        rec.update(rank=distributed.rank(), world_size=distributed.world_size())
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"{step['name']}.rank{distributed.rank()}.json").write_text(
            json.dumps(rec, indent=1, default=str))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
