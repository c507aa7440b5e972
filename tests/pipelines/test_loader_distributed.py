"""Sharding across ranks: two real processes (gloo, CPU) per backend.

Every backend documents DistributedSampler's scheme (drop_last=False): the
epoch's order is padded by repeating its head to a multiple of the world size
and rank r takes every world-th sample starting at r. So with 21 samples and
2 ranks, each rank sees 11 and exactly one sample -- the first of the epoch's
order -- is seen twice.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from conftest import make_subset
from loader_helpers import backend_import_error, collect_epoch, convert_store
from pipelines.loader import BACKENDS, LoaderConfig, create_loader, sharded_order

WORLD, N, EPOCHS = 2, 21, (0, 1)


# Plain names, checked inside the test: importing ffcv/dali at collection would
# also run in every spawned rank (it imports this module) and costs ~10 s each.
# Slow: each spawned rank imports torch (and ffcv/dali) from scratch.
PARAMS = [pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS]


@pytest.fixture(scope="module")
def odd_store(data_root, tmp_path_factory):
    """21 CIFAR PNGs (3 classes x 7): not divisible by the world size."""
    tmp = tmp_path_factory.mktemp("dist")
    src = make_subset(data_root / "cifar100" / "train", tmp / "src", 3, 7)
    return convert_store(src, tmp / "store", "ffcv,dali", "--write-mode", "raw")


def _cfg(backend, store) -> LoaderConfig:
    return LoaderConfig(backend=backend, store=str(store), batch_size=4, num_workers=1,
                        shuffle=True, seed=5, drop_last=False, device="cpu")


def _collect(loader) -> dict:
    out = {}
    for epoch in EPOCHS:
        got = collect_epoch(loader, epoch)
        out[f"sizes{epoch}"] = np.array(got["sizes"])
        for k in ("indices", "labels", "view_ids"):
            out[f"{k}{epoch}"] = got[k].numpy()
    out["len"] = np.array(len(loader))
    return out


def _rank_main(rank, backends, store, init_file, out_dir):
    """One rank: every backend in turn (one spawn pays the imports once). A
    failing backend is recorded, not raised, so the others still run."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        for backend in backends:
            try:
                with create_loader(_cfg(backend, store)) as loader:  # rank/world from the group
                    assert (loader.rank, loader.world_size) == (rank, WORLD), "rank/world_size"
                    res = _collect(loader)
            except Exception as e:  # reported by the test of that backend
                res = {"error": np.array(f"{type(e).__name__}: {e}")}
            np.savez(f"{out_dir}/{backend}_rank{rank}.npz", **res)
            dist.barrier()
    finally:
        dist.destroy_process_group()


# The reference backend runs in its own (fast) spawn; FFCV and DALI together in
# a second one (their imports and pipeline compilation make it slow).
GROUPS = {"reference": ("reference",), "ffcv": ("ffcv", "dali"), "dali": ("ffcv", "dali"),
          "memory": ("memory",)}


@pytest.fixture(scope="module")
def dist_runs(odd_store, tmp_path_factory):
    """backend -> folder with both ranks' results. Two spawned ranks (gloo on
    CPU, file:// rendezvous) run each group of available backends once."""
    done = {}

    def get(backend):
        if backend not in done:
            group = [b for b in GROUPS[backend] if backend_import_error(b) is None]
            tmp = tmp_path_factory.mktemp("dist_runs")
            mp.spawn(_rank_main, args=(group, str(odd_store), str(tmp / "rdzv"), str(tmp)),
                     nprocs=WORLD, join=True)
            done.update({b: tmp for b in group})
        return done[backend]

    return get


@pytest.mark.parametrize("backend", PARAMS)
def test_two_ranks_cover_each_epoch_once_plus_padding(backend, odd_store, dist_runs):
    why = backend_import_error(backend)
    if why:
        pytest.skip(why)
    ranks = [dict(np.load(dist_runs(backend) / f"{backend}_rank{r}.npz")) for r in range(WORLD)]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
    per_rank = -(-N // WORLD)
    orders = []
    for epoch in EPOCHS:
        for res in ranks:
            assert len(res[f"indices{epoch}"]) == per_rank
            assert res[f"sizes{epoch}"].tolist() == [4, 4, 3]
            assert int(res["len"]) == 3
            assert (res[f"view_ids{epoch}"] == epoch + 1).all()
        # Undo the round-robin deal: padded[WORLD * j + r] = rank r's j-th sample.
        padded = np.stack([res[f"indices{epoch}"] for res in ranks], axis=1).reshape(-1)
        labels = np.stack([res[f"labels{epoch}"] for res in ranks], axis=1).reshape(-1)
        assert sorted(padded[:N].tolist()) == list(range(N))  # each sample once ...
        assert padded[N:].tolist() == padded[: WORLD * per_rank - N].tolist()  # ... + the head
        assert (labels == padded // 7).all()  # 3 classes x 7, in ImageFolder order
        orders.append(padded[:N].tolist())
    assert orders[0] != orders[1]
    assert orders[0] != list(range(N))  # shuffled

    # Explicit rank/world_size, no process group: the same shards.
    for r in range(WORLD):
        with create_loader(_cfg(backend, odd_store), rank=r, world_size=WORLD) as loader:
            res = _collect(loader)
        for epoch in EPOCHS:
            assert res[f"indices{epoch}"].tolist() == ranks[r][f"indices{epoch}"].tolist()


@pytest.mark.parametrize("n,world", [(21, 2), (16, 4), (5, 3), (2, 5), (0, 2), (1, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sharded_order_is_what_distributed_sampler_yields(n, world, shuffle):
    """The FFCV and DALI backends' order without iterating the sampler: equal
    to it for every rank and epoch, including padding beyond one repeat (2 samples,
    5 ranks) and an empty dataset."""
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                     seed=7, drop_last=False)
        for epoch in (0, 1, 5):
            sampler.set_epoch(epoch)
            got = sharded_order(n, rank, world, shuffle, 7, epoch)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, np.fromiter(iter(sampler), dtype=np.int64))
    with pytest.raises(ValueError, match="rank"):
        sharded_order(n, world, world, shuffle, 7, 0)
