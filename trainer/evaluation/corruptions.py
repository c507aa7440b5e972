"""The corrupted-evaluation driver: a checkpoint's accuracy, ECE and NLL on
the val store under the CIFAR-C corruptions (:mod:`trainer.evaluation.corruption_ops`)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from trainer.evaluation.corruption_ops import CORRUPTIONS, SEVERITIES, check_names, corrupt_batch


# Pipeline: the val store's images are read through the eval loader (view 0 =
# the whole image, no flip) at the store's own resolution and un-normalized
# back to the stored uint8 pixels; a class-balanced subset is kept; each batch
# is corrupted on the CPU at that native resolution, then resized to the
# checkpoint's resolution with the memory backend's resize (torchvision's
# antialiased bilinear weights, pipelines/kernels/resized_crop.py; within one
# level of the reference backend's), normalized with the store's mean/std and
# evaluated. The clean row goes through the same path uncorrupted, so with the
# memory backend it equals `evaluate` exactly.
SUBSTITUTIONS = {
    "frost": "procedural ice texture (frost_texture) instead of the reference's frost photographs",
    "motion_blur": "ImageMagick's motion-blur kernel applied with cv2.filter2D instead of Wand",
    "snow": "snow streaks blurred with the same cv2 motion-blur kernel instead of Wand",
}
METRICS = ("top1", "ece", "nll")


def native_size(manifest: dict) -> int:
    """Side of the square the corruptions run at: the store's largest image
    side (exactly the stored pixels for single-size stores such as CIFAR)."""
    size = manifest["image_size"]
    return int(max(size["max_h"], size["max_w"]))


def class_rank(labels: np.ndarray) -> np.ndarray:
    """Each entry's number of earlier entries with the same label."""
    labels = np.asarray(labels, np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)
    return rank


def balanced_order(labels: np.ndarray) -> np.ndarray:
    """Positions ordered by rank within their class, then position: the first
    C entries are each class's first sample, and so on (C classes present)."""
    return np.lexsort((np.arange(len(labels)), class_rank(labels)))


def read_native_images(loader, limit: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 ``[N, H, W, 3]`` images, labels and sample indices from an eval
    loader built at the native size; with ``limit > 0`` only a class-balanced
    subset: up to ``ceil(limit / classes)`` per class in sample order, then
    the first ``limit`` of :func:`balanced_order` (sorted by sample index)."""
    mean = torch.tensor(loader.store.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(loader.store.std, dtype=torch.float32).view(1, 3, 1, 1) * 255
    quota = -(-limit // loader.store.num_classes) if limit > 0 else None
    taken = np.zeros(loader.store.num_classes, np.int64)
    images, labels, indices = [], [], []
    for batch in loader:
        lab = batch.labels.cpu().numpy()
        keep = np.ones(len(lab), bool)
        if quota is not None:  # streaming, so only the kept images are held
            keep = taken[lab] + class_rank(lab) < quota
            taken += np.bincount(lab[keep], minlength=len(taken))
        x = batch.student.float().cpu() * std + mean  # exact inverse of finish_batch's normalize
        u8 = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images.append(u8[keep])
        labels.append(lab[keep])
        indices.append(batch.indices.cpu().numpy()[keep])
    images, labels, indices = np.concatenate(images), np.concatenate(labels), np.concatenate(indices)
    order = np.argsort(indices, kind="stable")
    images, labels, indices = images[order], labels[order], indices[order]
    if limit > 0:
        pick = np.sort(balanced_order(labels)[:limit])
        images, labels, indices = images[pick], labels[pick], indices[pick]
    return np.ascontiguousarray(images), labels, indices


def _prefetch(fn, items, workers: int):
    """``map(fn, items)`` in order, at most ``2 * workers`` ahead on threads
    (cv2/numpy/torch release the GIL in the heavy parts)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@torch.no_grad()
def evaluate_corruptions(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray, *, resolution: int, mean, std, device,
                         autocast, types: Sequence[str] = CORRUPTIONS,
                         severities: Sequence[int] = SEVERITIES, batch_size: int = 500,
                         seed: int = 0, channels_last: bool = False, workers: int = 0,
                         progress: bool = False) -> dict:
    """Metrics (``METRICS``) of ``model`` on the clean images and on every
    (type, severity); see the pipeline note above. Under torchrun each rank
    evaluates every ``world``-th condition (each one whole, so its metrics are
    the single-process ones) and the ranks exchange their rows."""
    from dataset_tools.progress import progress as progress_bar
    from pipelines.kernels.resized_crop import resize_batch

    from trainer import distributed
    from trainer.evaluation.calibration import calibration_metrics

    check_names(types, severities)
    device = torch.device(device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    target = torch.as_tensor(labels, dtype=torch.long)
    jobs = [(None, 0)] + [(t, sev) for t in types for sev in severities]
    jobs = jobs[distributed.rank()::distributed.world_size()]
    spans = [(a, min(a + batch_size, len(images))) for a in range(0, len(images), batch_size)]
    model.eval()

    def prepare(item):  # CPU: corrupt, resize to the checkpoint's resolution
        (name, sev), (a, b) = item
        x = images[a:b] if name is None else corrupt_batch(images[a:b], name, sev, indices[a:b], seed)
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        if t.shape[-1] != resolution or t.shape[-2] != resolution:
            t = resize_batch(t, resolution)
        return t

    items = [(job, span) for job in jobs for span in spans]
    out: dict = {}
    logits = []
    bar = progress_bar(total=len(items), desc="corruptions", unit="batch", enabled=progress)
    for (job, (a, b)), x in zip(items, _prefetch(prepare, items, workers)):
        x = ((x.to(device).float() - m) / s).contiguous(memory_format=fmt)
        with autocast():
            logits.append(model(x).float().cpu())
        bar.update()
        if b == len(images):  # the job's last batch
            metrics = calibration_metrics(torch.cat(logits), target)
            out[job] = {k: metrics[k] for k in METRICS}
            logits = []
    bar.close()
    if distributed.is_distributed():
        out = {job: row for part in distributed.all_gather_objects(out) for job, row in part.items()}
    per = {t: {str(sev): out[(t, sev)] for sev in severities} for t in types}

    def avg(rows):
        return {k: float(np.mean([r[k] for r in rows])) for k in METRICS}

    return {
        "clean": out[(None, 0)],
        "mean": avg([out[(t, sev)] for t in types for sev in severities]),
        "mean_by_type": {t: avg(list(per[t].values())) for t in types},
        "mean_by_severity": {str(sev): avg([out[(t, sev)] for t in types]) for sev in severities},
        "corruptions": per,
    }


def format_table(result: dict) -> str:
    """Rows: types; columns: severities; cells: accuracy/ECE in percent."""
    sevs = list(result["mean_by_severity"])
    head = f"{'top1/ECE %':18s}" + "".join(f"{'sev ' + s:>12s}" for s in sevs) + f"{'mean':>12s}"
    def cell(r):
        return f"{100 * r['top1']:.1f}/{100 * r['ece']:.1f}".rjust(12)

    lines = [head, f"{'clean':18s}" + cell(result["clean"])]
    for t, row in result["corruptions"].items():
        lines.append(f"{t:18s}" + "".join(cell(row[s]) for s in sevs) + cell(result["mean_by_type"][t]))
    lines.append(f"{'mean':18s}" + "".join(cell(result["mean_by_severity"][s]) for s in sevs)
                 + cell(result["mean"]))
    return "\n".join(lines)
