"""Ordered parallel map over a conversion's items, with bounded memory.

Why not ``multiprocessing.Pool.imap`` alone: it queues every item at once, so
prepared (decoded, encoded) samples pile up in memory when writing is the
slower side; here items are handed out only as fast as results are taken.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Iterator


def parallel_map(fn, items: list, workers: int, chunksize: int,
                 initializer=None) -> Iterator:
    """Ordered results of ``fn`` over ``items``; in-process when workers <= 1.

    Items are handed to the pool only as fast as results are consumed (a
    semaphore), so decoded images never pile up in memory when writing is
    the slower side. Closing the generator early (an error) stops the feeder
    and terminates the pool."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # Not "fork": a process that already ran OpenCV (or any thread pool) would
    # hand its workers locks held by threads that do not exist in the child;
    # cv2.setNumThreads in worker_init then hangs forever. A fork server is a
    # clean, single-threaded process started once. Its workers import what
    # ``fn`` needs at start, so dataset_tools.records stays free of torch,
    # numba and ffcv (see dataset_tools/stores/ffcv_codec.py; tested).
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    gate, stop = threading.Semaphore(max(chunksize * workers * 4, chunksize)), threading.Event()

    def feed() -> Iterator:  # runs in the pool's task-handler thread
        for it in items:
            gate.acquire()
            if stop.is_set():
                return
            yield it

    pool = ctx.Pool(workers, initializer=initializer)
    try:
        for result in pool.imap(fn, feed(), chunksize=chunksize):
            gate.release()
            yield result
    finally:
        stop.set()
        gate.release()  # wake the feeder so it sees ``stop``
        pool.terminate()
        pool.join()
