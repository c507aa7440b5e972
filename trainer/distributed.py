"""Multi-process runs: ``torchrun`` (torch.distributed) only.

``torchrun --nproc_per_node N [--nnodes M ...] -m trainer JOB --config ...``
starts one process per device; :func:`setup` reads the ``WORLD_SIZE`` /
``RANK`` / ``LOCAL_RANK`` it sets and joins the process group (NCCL on CUDA,
gloo on CPU). Without ``WORLD_SIZE > 1`` nothing here runs a collective, so a
single process pays nothing for this module.

The rules every job follows (the README's multi-process section says the same):

* **Files are written by rank 0 only** (checkpoints, logs, TensorBoard, JSON,
  plots, the assembled teacher cache); where another rank then reads what rank 0
  wrote, a :func:`barrier` stands between. ``run.out_dir`` and the stores must be
  on a filesystem every node sees.
* **Evaluation is sharded**: every rank evaluates its DistributedSampler shard
  (``drop_last=False``, padded) through the plain module (never the DDP wrapper,
  so no DDP collective can run on one rank only) and :func:`gather_by_index`
  reassembles the logits of every sample once, in sample order, on every rank;
  every rank then computes the same metrics.
* **No collective is conditional on the rank**: every rank reaches every
  collective in the same order.
"""
from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

# How long ranks wait in barrier() for rank 0's file work (assembling an
# ImageNet-sized cache, plots). The step's own collectives keep torch's
# default timeout, so a real hang there is still reported as one.
WAIT_TIMEOUT = timedelta(hours=2)
_wait_group = None  # a gloo group for barrier(): a CPU-side wait that NCCL's watchdog does not time out


def setup(cfg) -> torch.device:
    """The training device of this process, joining the process group when
    torchrun started several (``WORLD_SIZE > 1``): NCCL with one GPU per
    process (``LOCAL_RANK``) on CUDA, gloo on CPU."""
    global _wait_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.run.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank got here (no-op in one process). Runs on a gloo
    group with a long timeout: ranks may wait here while rank 0 writes."""
    if is_distributed():
        dist.barrier(group=_wait_group)


def shutdown() -> None:
    """Leave the process group (the end of a CLI job). Objects that still
    hold the group (a finished job's trainer, its DDP reducer) are collected
    first, so the group is freed now rather than during interpreter exit,
    where freeing a gloo group can abort the process."""
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _wait_group = None


def _comm_device() -> torch.device:
    """Where tensors must live for the default group's collectives."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, on every
    rank. All ranks must pass the same shape (as the training batches are:
    equal shards, ``drop_last``). Not differentiable; callers pass detached
    values. One process: ``t`` itself."""
    if not is_distributed():
        return t
    src = t.detach().to(_comm_device()).contiguous()
    out = torch.empty((world_size() * src.shape[0], *src.shape[1:]), dtype=src.dtype, device=src.device)
    dist.all_gather_single(out, src)
    return out.to(t.device)


def all_gather_objects(obj: Any) -> list:
    """Every rank's picklable ``obj``, in rank order (small things only)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts rank 0's buffers at the start of each training forward, so
    after the last step every rank holds rank 0's statistics plus its own last
    batch's update; this makes every rank's model the one rank 0 saves, before
    it is evaluated. No-op in one process."""
    if not is_distributed():
        return
    for buf in module.buffers():
        if buf.device.type != _comm_device().type:
            tmp = buf.to(_comm_device())
            dist.broadcast(tmp, src)
            buf.copy_(tmp)
        else:
            dist.broadcast(buf, src)


def gather_by_index(indices: torch.Tensor, tensors: Sequence[torch.Tensor],
                    num_samples: int) -> list[torch.Tensor]:
    """Reassemble per-sample rows that the ranks computed on their shards.

    ``indices`` ``[n_r]`` are this rank's sample indices (DistributedSampler
    shard, padded: a few samples appear on two ranks) and each of ``tensors``
    has ``n_r`` rows. Returns, on every rank, each tensor with exactly one row
    per sample ``0..num_samples-1`` in sample order (a padded duplicate keeps
    the lower rank's row), on the input device. Ranks may hold different
    ``n_r``. Raises if a sample is missing (a loader broke the shard contract).
    One process: the rows reordered by index, checked the same way."""
    dev = indices.device
    if is_distributed():
        sizes = all_gather_objects(int(indices.shape[0]))
        pad = max(sizes)

        def gather(t: torch.Tensor) -> torch.Tensor:
            src = t.to(_comm_device())
            if src.shape[0] < pad:
                src = torch.cat([src, src.new_zeros((pad - src.shape[0], *src.shape[1:]))])
            full = all_gather_cat(src).view(len(sizes), pad, *src.shape[1:])
            return torch.cat([full[r, :n] for r, n in enumerate(sizes)])

        indices = gather(indices.long())
        tensors = [gather(t) for t in tensors]
    order = torch.sort(indices.long(), stable=True)
    idx = order.values
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[1:] = idx[1:] != idx[:-1]
    idx = idx[keep]
    if idx.numel() != num_samples or not torch.equal(idx, torch.arange(num_samples, device=idx.device)):
        raise RuntimeError(f"sharded evaluation covered {idx.numel()} distinct samples of {num_samples}: "
                           "every sample must be visited once across ranks (drop_last=False)")
    rows = order.indices[keep]
    return [t[rows.to(t.device)].to(dev) for t in tensors]
