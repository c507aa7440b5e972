"""Logits of a model over a loader, and the calibration metrics from them:
what validation, ``calibrate`` and ``evaluate`` run. A sharded loader
(torchrun) has each rank compute its shard and gathers every sample's logits
on every rank, in sample order."""
from __future__ import annotations

import time

import torch

from trainer.distributed import gather_by_index
from trainer.evaluation.calibration import CalibrationMeter, calibration_metrics


@torch.no_grad()
def sample_logits(model, loader, autocast, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every sample of the loader's store, in sample
    order, on the device; a sharded loader's ranks each compute their shard
    and gather (:func:`trainer.distributed.gather_by_index`). ``on_batch(1)``
    after each batch (a progress bar's ``update``)."""
    model.eval()
    logits, labels, indices = [], [], []
    for batch in loader:
        if on_batch is not None:
            on_batch(1)
        with autocast():
            out = model(batch.student)
        logits.append(out.float())
        labels.append(batch.labels)
        indices.append(batch.indices)
    logits, labels = torch.cat(logits), torch.cat(labels)
    if loader.world_size > 1:
        logits, labels = gather_by_index(torch.cat(indices), [logits, labels], loader.store.num_samples)
    return logits, labels


@torch.no_grad()
def collect_logits(model, loader, autocast, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader (eval mode), on the CPU; with a
    sharded loader (torchrun) every sample's, gathered on every rank."""
    logits, labels = sample_logits(model, loader, autocast, on_batch)
    return logits.cpu(), labels.cpu()


@torch.no_grad()
def evaluate_model(model, loader, autocast) -> dict:
    """Calibration metrics of ``model`` on every sample of ``loader``. Pass the
    plain module (not DDP). A sharded loader (torchrun): every rank computes
    the metrics of all samples from the gathered logits."""
    model.eval()
    if loader.world_size > 1:
        t0 = time.perf_counter()
        logits, labels = sample_logits(model, loader, autocast)
        metrics = calibration_metrics(logits, labels)
        metrics["eval_images_per_sec"] = len(labels) / max(time.perf_counter() - t0, 1e-9)
        return metrics
    meter = CalibrationMeter()
    t0, n = time.perf_counter(), 0
    for batch in loader:
        with autocast():
            out = model(batch.student)
        meter.update(out.float(), batch.labels)
        n += len(batch)
    metrics = meter.compute()
    metrics["eval_images_per_sec"] = n / max(time.perf_counter() - t0, 1e-9)
    return metrics
