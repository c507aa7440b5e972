"""The thread that runs a compiled FFCV ``Loader``'s pipeline, epoch after epoch.

FFCV's ``EpochIterator`` is one thread per epoch: it starts when the epoch
is requested and ends with it, so every epoch pays to start its thread and
order, a first batch nobody overlaps, and a drain at the end where a core
idles: a visible share of a short low-res epoch (measurements:
docs/design/loaders.md). :class:`EpochProducer` keeps going instead: when
it has queued an epoch's last batch it computes the next epoch's order and
decodes that epoch's first batches into the same bounded queue. The next epoch is predicted as ``epoch + step`` (see
:class:`~pipelines.ffcv.loader.FFCVLoader`); the consumer checks every
queued item's epoch, and a wrong guess only costs the few batches queued
(the loader then starts a producer at the epoch asked for).

Batches come out exactly as from a fresh ``EpochIterator``: same order
(``traversal_order.sample_order(epoch)``), the epoch cell set before the
epoch's first batch, FFCV's ``run_pipeline`` (inherited), and its CUDA
stream / event protocol. The batch slots of packed (uint8) output rotate
across epochs, so the next epoch never overwrites a batch the consumer has
not had yet (FFCV restarts at slot 0 each epoch, safe only because its thread
ends first).
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

import numba
import numpy as np
import torch

from dataset_tools.ffcv_import import set_decode_threads
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator

from pipelines.ffcv.decoder import EpochCell

_FAILED = object()  # queue sentinel: the producer raised
_STOPPED = object()  # queue sentinel: the producer was stopped under a reader


class EpochProducer(EpochIterator):
    """Decodes ``first_epoch``, then ``first_epoch + step``, ... (``step=None``:
    only the first) into a queue of ``loader.batches_ahead`` batches, until
    :meth:`stop`. Read one epoch at a time with :meth:`epoch`; ``next_epoch``
    is the epoch whose batches the queue holds next (None: no more)."""

    # Not EpochIterator.__init__: that schedules one epoch and starts the thread.
    def __init__(self, loader: Loader, epoch_cell: EpochCell, first_epoch: int,
                 step: Optional[int]):
        threading.Thread.__init__(self, daemon=True)
        self.loader, self.epoch_cell = loader, epoch_cell
        self.next_epoch: Optional[int] = first_epoch
        self.first_epoch, self.step = first_epoch, step
        self.metadata = loader.reader.metadata
        self.output_queue: queue.Queue = queue.Queue(loader.batches_ahead)
        self.terminate_event = threading.Event()
        self.error: Optional[BaseException] = None
        self.slots = loader.batches_ahead + 2
        if IS_CUDA:
            self.current_stream = torch.cuda.current_stream()
        self.cuda_streams = [torch.cuda.Stream() if IS_CUDA else None for _ in range(self.slots)]
        self.memory_allocations = loader.graph.allocate_memory(loader.batch_size, self.slots)
        self.memory_context = None  # each epoch's, set by _produce
        self.start()

    # -- producer side (this thread) ------------------------------------------

    def run(self):
        loader = self.loader
        # prange hands out chunks of ~1/8 of a thread's share as threads free
        # up (thread-local setting, so set here). With numba's default of one
        # static share per thread, each batch waits for whichever thread this
        # thread's or the training thread's Python preempted (measurements:
        # docs/design/loaders.md).
        numba.set_parallel_chunksize(max(1, loader.batch_size // (8 * loader.num_workers)))
        set_decode_threads(loader.num_workers)
        try:
            epoch, slot, events = self.first_epoch, 0, [None] * self.slots
            while True:
                slot = self._produce(epoch, slot, events)
                if slot is None or self.step is None:
                    return
                epoch += self.step
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self.error = e
            self._put(_FAILED)

    def _produce(self, epoch: int, slot: int, events: list) -> Optional[int]:
        """Queue ``epoch``'s batches and its end marker; the next free slot,
        or None once stopped."""
        loader = self.loader
        order = loader.traversal_order.sample_order(epoch)[:len(loader) * loader.batch_size]
        batches = [order[i:i + loader.batch_size] for i in range(0, len(order), loader.batch_size)]
        context = loader.memory_manager.schedule_epoch(batches)
        try:
            with context:
                self.memory_context, self.storage_state = context, context.state
                self.epoch_cell.set(epoch)  # the compiled code reads it per batch
                for b_ix, ixes in enumerate(batches):
                    if self.terminate_event.is_set():
                        return None
                    result = self.run_pipeline(b_ix, ixes, slot, events[slot])
                    if not self._put((epoch, ixes, slot, result)):
                        return None
                    if IS_CUDA:  # FFCV's protocol: a slot is rewritten only after
                        # the consumer's stream has passed the batch that used it
                        event = torch.cuda.Event()
                        event.record(self.current_stream)
                        events[(slot - self.loader.batches_ahead - 1) % self.slots] = event
                    slot = (slot + 1) % self.slots
        finally:
            # FFCV's process cache reads pages with its own threads, and
            # leaving the context only asks them to finish.
            for reader in getattr(getattr(context, "executor", None), "threads", ()):
                reader.join()
        return slot if self._put((epoch, None, None, None)) else None

    def _put(self, item) -> bool:
        while not self.terminate_event.is_set():
            try:
                self.output_queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    # -- consumer side ----------------------------------------------------------

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, tuple]]:
        """``(sample indices, pipeline result)`` of each batch of ``epoch``,
        which must be ``next_epoch``; returns at the epoch's end marker."""
        if epoch != self.next_epoch:
            raise RuntimeError(f"this producer holds epoch {self.next_epoch}, not {epoch}")
        self.next_epoch = None  # being read: another iterator must not take it
        while True:
            item = self.output_queue.get()
            if item is _FAILED:
                raise RuntimeError(f"FFCV decode thread failed: {self.error!r}") from self.error
            if item is _STOPPED:
                raise RuntimeError("this loader was iterated again (or closed) while this "
                                   "iterator was still reading; use one iterator at a time")
            got, ixes, slot, result = item
            if got != epoch:  # a bug, not bad data
                raise RuntimeError(f"FFCV producer queued epoch {got} while {epoch} was read")
            if ixes is None:
                if self.step is None:  # the thread is ending: no thread outlives the epoch
                    self.join()
                else:
                    self.next_epoch = epoch + self.step
                return
            if IS_CUDA:  # as FFCV's __next__: wait for this slot's copies
                self.current_stream.wait_stream(self.cuda_streams[slot])
            yield ixes, result

    def stop(self) -> None:
        """Stop and join the thread (it finishes the batch in progress); an
        iterator still reading gets an error instead of waiting forever."""
        self.terminate_event.set()
        self.next_epoch = None
        while self.is_alive():
            self._drain()
            self.join(timeout=0.01)
        self._drain()
        self.output_queue.put_nowait(_STOPPED)

    def _drain(self) -> None:
        try:
            while True:
                self.output_queue.get_nowait()
        except queue.Empty:
            pass

    def close(self) -> None:  # EpochIterator's __del__ calls it; the epoch contexts are closed
        self.terminate_event.set()
