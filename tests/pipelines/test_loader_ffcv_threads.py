"""The FFCV backend's threads: the producer that decodes epoch after epoch
(:mod:`pipelines.ffcv.producer`), early breaks, recreated loaders and the
pool of compiled FFCV Loaders (:mod:`pipelines.ffcv.pool`).

Oracle for decoding ahead: the same loader with ``next_epoch_ahead=False``,
which starts a fresh producer for every epoch, as FFCV's ``EpochIterator``.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest
import torch

from pipelines.ffcv.loader import FFCVLoader
from pipelines.loader import create_loader

from loader_helpers import BATCH_FIELDS, collect_epoch, copy_store, ffcv_cfg

N = 80  # raw_store: the imagenette subset, 10 classes x 8 images


def test_next_epoch_decoded_ahead_is_what_a_fresh_epoch_yields(raw_store, monkeypatch):
    """Epochs guessed right (0 -> 1 -> 2), repeated (2, 2: the guess becomes
    "the same epoch") and jumped to (5) give the batches of a loader that
    starts every epoch afresh. Packed uint8 output with one batch ahead and a
    slow consumer: while it still holds an epoch's last batch, the producer
    decodes the next epoch's first ones; batch slots rotate across epochs, so
    that batch is not overwritten (restarting at slot 0 each epoch, as FFCV's
    per-epoch threads do, overwrites it here)."""
    assemble = FFCVLoader._assemble

    def slow_assemble(self, *args):
        time.sleep(0.01)  # the producer runs on meanwhile
        return assemble(self, *args)

    monkeypatch.setattr(FFCVLoader, "_assemble", slow_assemble)
    epochs = (0, 1, 2, 2, 2, 5, 6)
    for normalize in (False, True):
        cfg = ffcv_cfg(raw_store, student_resolution=16, batch_size=8, shuffle=True,
                       drop_last=True)
        kw = dict(batches_ahead=1, normalize_in_decoder=normalize)
        producers = []
        with FFCVLoader(cfg, **kw) as ahead, FFCVLoader(cfg, next_epoch_ahead=False, **kw) as fresh:
            for epoch in epochs:
                got, want = collect_epoch(ahead, epoch), collect_epoch(fresh, epoch)
                producers.append(ahead._lease.active)
                assert got["sizes"] == want["sizes"] == [8] * (N // 8)
                for field in BATCH_FIELDS:
                    if field in want:
                        assert torch.equal(got[field], want[field]), (normalize, epoch, field)
        # which epochs came from the producer that was already running
        reused = [a is b for a, b in zip(producers, producers[1:])]
        assert reused == [True, True, False, True, False, True], reused


def test_an_iterator_superseded_by_a_newer_one_fails_clearly(raw_store):
    with create_loader(ffcv_cfg(raw_store, student_resolution=8, batch_size=8,
                                shuffle=False)) as loader:
        first = iter(loader)
        next(first)
        second = iter(loader)
        assert next(second).indices.tolist() == list(range(8))  # a producer of its own
        with pytest.raises(RuntimeError, match="one iterator at a time"):
            for _ in first:
                pass
        assert len(list(second)) == N // 8 - 1


def _threads_and_rss() -> tuple[int, int]:
    return threading.active_count(), psutil.Process().memory_info().rss


def test_early_breaks_and_recreation_do_not_leak(raw_store):
    cfg = ffcv_cfg(raw_store, student_resolution=16, batch_size=8, shuffle=True)
    threads0 = threading.active_count()
    with create_loader(cfg) as loader:
        for b in loader:  # warm up: compile, allocate buffers
            pass
        # one thread: the producer, decoding the next epoch ahead
        assert threading.active_count() == threads0 + 1
        with create_loader(ffcv_cfg(raw_store, student_resolution=16, train=False)) as val:
            assert len(list(val)) == 5
            assert threading.active_count() == threads0 + 1  # eval: nothing decoded ahead
        rss0 = psutil.Process().memory_info().rss
        for epoch in range(20):
            loader.set_epoch(epoch)
            for b in loader:
                break  # FFCV's own EpochIterator would stay blocked on its queue
            it = iter(loader)
            next(it)
            del it
            assert threading.active_count() == threads0
        threads1, rss1 = _threads_and_rss()
    assert threads1 == threads0
    assert rss1 - rss0 < 64 * 2 ** 20, (rss1 - rss0) / 2 ** 20
    for _ in range(2):  # a loader per epoch, abandoned mid-epoch, closed
        loader = create_loader(cfg)
        next(iter(loader))
        loader.close()
    threads2, rss2 = _threads_and_rss()
    assert threads2 == threads0
    assert rss2 - rss0 < 128 * 2 ** 20, (rss2 - rss0) / 2 ** 20
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(loader))


@pytest.mark.slow  # FFCV compiles its quasi-random sampler anew in every process (~10 s)
def test_process_cache_quasi_random_path(raw_store):
    """Files too big for the page cache: FFCV's process cache (its own page
    reader threads) and QUASI_RANDOM order, reproducible per epoch."""
    threads0 = threading.active_count()
    cfg = ffcv_cfg(raw_store, student_resolution=8, shuffle=True)
    with FFCVLoader(cfg, os_cache=False) as loader:
        orders = []
        for epoch in (0, 1, 0):
            loader.set_epoch(epoch)
            orders.append(np.concatenate([b.indices.numpy() for b in loader]))
            assert sorted(orders[-1].tolist()) == list(range(N))
        for b in loader:
            break
    assert threading.active_count() == threads0
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[0], orders[2])


def test_twenty_recreated_loaders_do_not_leak(raw_store):
    """A loader per epoch, abandoned mid-epoch and dropped without close().
    Without the pool (pipelines.ffcv.pool) every FFCV Loader's compiled code
    stayed for good: ~8 MB per loader, 154 MB after these 20."""
    cfg = ffcv_cfg(raw_store, student_resolution=16, batch_size=8, shuffle=True)
    with create_loader(cfg) as loader:
        next(iter(loader))
    threads0, rss0 = _threads_and_rss()
    for epoch in range(20):
        loader = create_loader(cfg)
        loader.set_epoch(epoch)
        for i, b in enumerate(loader):
            if i == 2:
                break
        del loader  # no close(): the generator's finally and GC must clean up
    threads1, rss1 = _threads_and_rss()
    assert threads1 == threads0
    assert rss1 - rss0 < 32 * 2 ** 20, (rss1 - rss0) / 2 ** 20


def test_pool_reuses_a_closed_loaders_ffcv_loader_only_for_the_same_settings(raw_store, tmp_path):
    cfg = ffcv_cfg(raw_store, student_resolution=16, batch_size=8, shuffle=True)
    with create_loader(cfg) as first:
        first.set_epoch(3)
        want = [b.student for b in first]
        compiled = first._loader
    with create_loader(cfg) as again:  # the same compiled FFCV Loader, the same epoch
        assert again._loader is compiled
        again.set_epoch(3)
        got = [b.student for b in again]
        with create_loader(cfg) as concurrent:  # in use: never shared
            assert concurrent._loader is not compiled
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    with create_loader(ffcv_cfg(raw_store, student_resolution=16, batch_size=8, shuffle=True,
                               seed=4)) as other:
        assert other._loader is not compiled
    copy = copy_store(raw_store, tmp_path / "copy")  # another file: its own Loader
    with create_loader(ffcv_cfg(copy, student_resolution=16, batch_size=8, shuffle=True)) as c:
        assert c._loader is not compiled
