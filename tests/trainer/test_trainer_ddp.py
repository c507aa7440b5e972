"""A 2-process DDP training step on CPU (gloo), set up the way torchrun does
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment variables)."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.checkpoint import unwrap, weights_hash
from trainer.distributed import shutdown
from trainer.engine import Trainer
from trainer_helpers import make_cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, stores: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = make_cfg(stores, out, distill=dict(targets="none"), optim=dict(epochs=1),
                   run=dict(max_steps=3, name="ddp", progress=False))
    trainer = Trainer(cfg, "student")
    # parameters only: BN running stats are per-replica between DDP's buffer broadcasts
    def params():
        return weights_hash(dict(unwrap(trainer.model).named_parameters()))
    before = params()
    seen = []
    trainer.train_loader.set_epoch(0)
    for batch in trainer.train_loader:
        seen += batch.indices.tolist()
    trainer.model.train()
    trainer.train_loop()
    after = params()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"before": before, "after": after, "seen": seen, "steps": trainer.global_step}, f)
    trainer.close()
    del trainer  # as a CLI job ends: nothing holds the process group when it is destroyed
    shutdown()
    assert not dist.is_initialized()


def test_two_process_ddp_steps_keep_replicas_identical(cifar_stores, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), cifar_stores, str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert r[0]["steps"] == r[1]["steps"] == 3
    assert r[0]["before"] == r[1]["before"]  # same seed, same init
    assert r[0]["after"] == r[1]["after"]  # gradients were all-reduced
    assert r[0]["after"] != r[0]["before"]
    # each rank reads its own shard: disjoint; 480 training samples (120 of the
    # 600 are the held-out val split), 240 per rank, 4 full batches of 50 each
    assert not set(r[0]["seen"]) & set(r[1]["seen"])
    assert len(set(r[0]["seen"]) | set(r[1]["seen"])) == 2 * (240 // 50) * 50
