"""Every job under torchrun with 2 CPU processes (gloo), end to end.

The launcher is the real one (``python -m torch.distributed.run``, the module
behind ``torchrun``) in subprocesses, each in its own session and killed with
its workers when it exceeds its timeout, so a hang fails the test instead of
hanging CI. ``ddp_driver.py`` runs the jobs and records, per rank, what it
ended with. Oracles: the other rank (bitwise-equal parameters and buffers),
rank 0's checkpoint on disk, an uninterrupted run (resume), one process
(calibrate, cache, evaluate), and CRD on the global batch in one process (the
memory banks).

Buffers are compared bitwise like parameters: the model's BatchNorm running
statistics (the trainer copies rank 0's to every rank before each
validation, so every rank ends with the model rank 0 saves) and the CRD
memory banks and log Z (kept identical by the gathered update, never
broadcast after wrapping).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from trainer.checkpoint import load_checkpoint, weights_hash
from trainer_helpers import make_cfg

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("ddp_driver.py")
CRD_CUTMIX = {"loss": {"ce": 0.5, "kd": 0.5, "crd": 0.8, "crd_negatives": 256},
              "mix": {"p_cutmix": 1.0}, "run": {"tag": "crd_cutmix", "deterministic": True}}
SWEEP = {"sweep": {"temperatures": [2.0, 4.0], "objectives": ["hinton"], "calibrated": [False],
                   "epochs": 1}}
CORRUPTIONS = {"types": ["gaussian_noise", "contrast"], "severities": [1, 3], "limit": 40}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(cmds: list[list[str]], log_dir: Path, timeout: float) -> list[str]:
    """Run the commands concurrently (outputs to files: a full pipe cannot
    block a rank); past ``timeout`` seconds kill each one's process group
    (the launcher and its workers) and fail with the output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               OMP_NUM_THREADS="1")
    logs = [log_dir / f"launch{i}.log" for i in range(len(cmds))]
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"multi-process run did not finish in {timeout:.0f} s (hang?):\n{tails}")
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    return outs


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def ranks(out: Path, name: str, world: int = 2) -> list[dict]:
    return [json.loads((out / "ranks" / f"{name}.rank{r}.json").read_text()) for r in range(world)]


def without_timings(d):
    """A result less what varies from rank to rank by wall-clock only."""
    if isinstance(d, dict):
        return {k: without_timings(v) for k, v in d.items()
                if not (k.endswith(("seconds", "per_sec")) or k == "online_teacher_seconds_estimate")}
    if isinstance(d, list):
        return [without_timings(x) for x in d]
    return d


def assert_ranks_identical(recs: list[dict]) -> None:
    keys = [k for k in recs[0] if k.startswith(("model_", "criterion_"))]
    assert keys
    for k in keys:
        assert recs[0][k] == recs[1][k], f"{k} differs between the ranks"
    assert without_timings(recs[0]["result"]) == without_timings(recs[1]["result"])


# --------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def pipeline(cifar_stores, tmp_path_factory):
    """teacher -> calibrate -> cache -> students (CRD + CutMix from the cache;
    the same interrupted and resumed; online KD + RKD + CRD + mixup) ->
    evaluate (plain and corrupted) -> sweep -> distill with temperature=auto,
    all in one 2-process torchrun launch."""
    out = tmp_path_factory.mktemp("ddp_pipeline")
    steps = [
        {"name": "teacher", "job": "fit_teacher", "sections": {}},
        {"name": "calibrate", "job": "calibrate", "sections": {}},
        {"name": "cache", "job": "cache", "sections": {}},
        {"name": "crd_cutmix", "job": "fit_student", "sections": CRD_CUTMIX},
        # 4 steps per epoch per rank (240 samples / 50): interrupted mid-epoch 2
        {"name": "crd_resumed", "job": "fit_student", "interrupt_at": 6,
         "sections": {**CRD_CUTMIX, "run": {"tag": "crd_resumed", "deterministic": True}}},
        {"name": "online", "job": "fit_student",
         "sections": {"distill": {"targets": "online"}, "optim": {"epochs": 1}, "mix": {"p_mixup": 0.5},
                      "loss": {"ce": 0.5, "kd": 0.5, "rkd": 0.5, "crd": 0.5, "crd_negatives": 256},
                      "run": {"tag": "online"}}},
        {"name": "evaluate", "job": "evaluate", "sections": {"run": {"tag": "crd_cutmix"}}},
        {"name": "corruptions", "job": "corruptions", "sections": {"run": {"tag": "crd_cutmix"}},
         **CORRUPTIONS},
        {"name": "sweep", "job": "sweep", "sections": SWEEP},
        {"name": "distill_auto", "job": "distill",
         "sections": {**SWEEP, "loss": {"temperature": "auto"}, "run": {"tag": "auto"}}},
    ]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"stores": {k: str(v) for k, v in cifar_stores.items()}, "out": str(out),
                                "steps": steps}))
    run_all([torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                      "--master_port", str(_free_port()), str(DRIVER), str(spec))], out, timeout=900)
    return out, make_cfg(cifar_stores, out)


@pytest.mark.slow
def test_teacher_and_crd_cutmix_student_fit_to_final_with_identical_ranks(pipeline):
    out, cfg = pipeline
    for name, run_dir, crd in (("teacher", cfg.teacher_dir, False),
                               ("crd_cutmix", cfg.run.root / "crd_cutmix", True),
                               ("online", cfg.run.root / "online", True)):
        recs = ranks(out, name)
        assert_ranks_identical(recs)
        ck = load_checkpoint(run_dir / "final.pt")  # rank 0's file is every rank's model
        assert ck["weights_hash"] == recs[0]["model_state"] == recs[1]["model_state"]
        assert weights_hash(ck["criterion"]) == recs[0]["criterion_state"]
        assert not any(k.startswith("module.") for k in list(ck["model"]) + list(ck["criterion"]))
        # validation ran sharded on both ranks: the same gathered metrics
        assert recs[0]["result"]["val_top1"] == recs[1]["result"]["val_top1"]
        assert recs[0]["result"]["epoch"] == ck["epoch"]
        logs = (run_dir / "log.jsonl").read_text().splitlines()
        assert len(logs) == ck["epoch"]  # one line per epoch: rank 0 alone writes
        if crd:  # CRD heads trained under DDP (all-reduced), memory banks one bank
            assert recs[0]["loss_is_ddp"] and recs[0]["num_criterion_params"] > 0
            assert "terms.crd.crd.memory_s" in ck["criterion"]
            assert torch.isfinite(ck["criterion"]["terms.crd.crd.log_z"]).all()


@pytest.mark.slow
def test_resume_under_torchrun_replays_the_uninterrupted_run(pipeline):
    out, cfg = pipeline
    full, resumed = ranks(out, "crd_cutmix"), ranks(out, "crd_resumed")
    assert_ranks_identical(resumed)
    for k in ("model_state", "criterion_state"):
        assert resumed[0][k] == full[0][k], k
    for k in ("val_top1", "val_ece", "val_nll", "step"):
        assert resumed[0]["result"][k] == full[0]["result"][k], k


@pytest.mark.slow
def test_calibrate_cache_evaluate_under_torchrun_match_one_process(pipeline, tmp_path):
    from trainer import jobs
    from trainer.distill.logit_cache import LogitCache

    out, cfg = pipeline
    for name in ("calibrate", "cache", "evaluate", "corruptions"):
        a, b = ranks(out, name)
        assert without_timings(a["result"]) == without_timings(b["result"]), name
    one = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path), name="one"),
                              distill=dataclasses.replace(cfg.distill,
                                                          teacher_checkpoint=str(cfg.teacher_checkpoint)))
    single = jobs.run_calibrate(one)
    multi = ranks(out, "calibrate")[0]["result"]
    assert single["temperature"] == multi["temperature"]
    for k in ("ece_before", "ece_after_fitted", "ece_after_crossfit", "nll_before", "nll_after",
              "accuracy", "num_samples"):
        assert single[k] == pytest.approx(multi[k], rel=1e-9, abs=1e-12), k

    jobs.run_cache(one)
    a, b = LogitCache.open(one.cache_path), LogitCache.open(cfg.cache_path)
    assert a.key == b.key
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)
    assert a.spatial_grid == 4 and torch.equal(a.spatial, b.spatial)  # maps stored by auto, sharded alike
    assert not Path(str(cfg.cache_path) + ".parts").exists()  # assembled once, parts removed

    student = tmp_path / "student" / "final.pt"
    student.parent.mkdir()
    student.write_bytes((cfg.run.root / "crd_cutmix" / "final.pt").read_bytes())
    single = jobs.run_evaluate(one, str(student))
    multi = ranks(out, "evaluate")[0]["result"]
    assert multi["n"] == single["n"] == 200  # every test sample exactly once
    for k in ("top1", "top5", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "oe"):
        assert single[k] == pytest.approx(multi[k], rel=1e-9, abs=1e-12), k
    s_logits = torch.load(single["logits_file"], weights_only=True)
    m_logits = torch.load(multi["logits_file"], weights_only=True)
    assert torch.equal(s_logits["labels"], m_logits["labels"])
    assert torch.equal(s_logits["logits"], m_logits["logits"])

    single = jobs.run_evaluate_corruptions(one, str(student), CORRUPTIONS["severities"],
                                           CORRUPTIONS["types"], limit=CORRUPTIONS["limit"])
    multi = ranks(out, "corruptions")[0]["result"]
    for k in ("clean", "mean", "mean_by_type", "corruptions", "num_images"):
        assert multi[k] == single[k], k  # each condition ran whole on one rank


@pytest.mark.slow
def test_sweep_and_auto_temperature_distill_under_torchrun(pipeline):
    out, cfg = pipeline
    s0, s1 = (r["result"] for r in ranks(out, "sweep"))
    assert s0["choice"] == s1["choice"] and len(s0["runs"]) == 2
    assert json.loads(cfg.sweep_file.read_text())["choice"] == s0["choice"]
    auto = ranks(out, "distill_auto")
    assert without_timings(auto[0]["result"]) == without_timings(auto[1]["result"])
    assert (cfg.run.root / "auto" / "final.pt").is_file()


@pytest.mark.slow
def test_two_nodes_on_one_machine(pipeline):
    """``torchrun --nnodes 2`` over the loopback c10d rendezvous, one process
    per node: the CRD + CutMix student from the pipeline's cache."""
    out, cfg = pipeline
    spec = out / "two_node.json"
    spec.write_text(json.dumps({**json.loads((out / "spec.json").read_text()), "steps": [
        {"name": "two_node", "job": "fit_student",
         "sections": {**CRD_CUTMIX, "run": {"tag": "two_node"}, "optim": {"epochs": 1}}}]}))
    port = _free_port()
    cmds = [torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                     "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                     "--rdzv_id", "cqkd-two-node", str(DRIVER), str(spec)) for node in (0, 1)]
    run_all(cmds, out, timeout=600)
    recs = ranks(out, "two_node")
    assert {r["rank"] for r in recs} == {0, 1} and recs[0]["world_size"] == 2
    assert_ranks_identical(recs)
    ck = load_checkpoint(cfg.run.root / "two_node" / "final.pt")
    assert ck["weights_hash"] == recs[0]["model_state"]
    assert weights_hash(ck["criterion"]) == recs[1]["criterion_state"]


@pytest.mark.slow
def test_cli_distill_under_torchrun_finishes_and_prints_once(pipeline):
    """The README's command: ``torchrun --nproc_per_node 2 -m trainer distill``."""
    out, cfg = pipeline
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg)))))
    [log] = run_all([torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                              "--master_port", str(_free_port()), "-m", "trainer", "distill",
                              "--config", str(recipe), "run.tag=cli", "optim.epochs=2")], out, timeout=600)
    assert (cfg.run.root / "cli" / "final.pt").is_file()
    assert log.count('"train_images_per_sec"') == 1, log  # rank 0 alone prints the result


# ------------------------------------------------------ CRD: one memory bank
N, B, DS, DT = 64, 6, 12, 10


def _crd_batches():
    g = torch.Generator().manual_seed(5)
    first = torch.randperm(N, generator=g)[:2 * B]
    second = torch.randperm(N, generator=g)[:2 * B]
    second[B] = second[0]  # rank 1 holds rank 0's first sample too (as padding does)
    return [(torch.randn(2 * B, DS, generator=g), torch.randn(2 * B, DT, generator=g), idx)
            for idx in (first, second)]


def _crd(seed: int = 0):
    from trainer.distill.crd import CRDLoss

    torch.manual_seed(seed)
    return CRDLoss(DS, DT, N, dim=16, negatives=32)


def _crd_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.nn.functional as F

    from trainer import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.setup(SimpleNamespace(run=SimpleNamespace(device="cpu")))
    crd = _crd()
    ddp = torch.nn.parallel.DistributedDataParallel(crd, forward_sync_buffers=False)
    (s1, t1, i1), (s2, t2, i2) = _crd_batches()
    mine = slice(rank * B, (rank + 1) * B)
    torch.manual_seed(1)  # the negatives' RNG, alike on every rank as seed_everything makes it
    loss = ddp(s1[mine], t1[mine], i1[mine])
    loss.backward()
    rec = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in crd.named_parameters()},
           "state": {k: v.clone() for k, v in crd.state_dict().items()}}
    with torch.no_grad():  # the duplicated sample's row must be rank 0's update on every rank
        old_s, old_t = crd.memory_s[i2[0]].clone(), crd.memory_t[i2[0]].clone()
        v_s, v_t = crd.embed_s(s2[:1]), crd.embed_t(t2[:1])
        m = crd.momentum
        rec["expected_dup"] = (F.normalize(old_s * m + v_s[0] * (1 - m), dim=0),
                               F.normalize(old_t * m + v_t[0] * (1 - m), dim=0))
        ddp(s2[mine], t2[mine], i2[mine])
    rec["after_dup"] = {k: v.clone() for k, v in crd.state_dict().items()}
    torch.save(rec, os.path.join(out, f"crd{rank}.pt"))
    distributed.shutdown()


def test_crd_memory_banks_are_one_bank_across_ranks(tmp_path):
    """2 ranks with B samples each = one process with the 2B global batch:
    the same negatives, log Z, loss, head gradients (all-reduced) and banks."""
    mp.spawn(_crd_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    recs = [torch.load(tmp_path / f"crd{r}.pt", weights_only=True) for r in range(2)]
    ref = _crd()
    (s1, t1, i1), (_, _, i2) = _crd_batches()
    torch.manual_seed(1)
    loss = ref(s1, t1, i1)
    loss.backward()
    assert torch.isfinite(loss)
    assert (recs[0]["loss"] + recs[1]["loss"]) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for r in recs:
        for n, p in ref.named_parameters():
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-5, atol=1e-6)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6)
    for k in recs[0]["state"]:  # the ranks' banks: bitwise one bank
        assert torch.equal(recs[0]["state"][k], recs[1]["state"][k]), k
        assert torch.equal(recs[0]["after_dup"][k], recs[1]["after_dup"][k]), k
    exp_s, exp_t = recs[0]["expected_dup"]
    torch.testing.assert_close(recs[1]["after_dup"]["memory_s"][i2[0]], exp_s)
    torch.testing.assert_close(recs[1]["after_dup"]["memory_t"][i2[0]], exp_t)
    assert not dist.is_initialized()
