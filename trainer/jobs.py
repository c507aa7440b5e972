"""The jobs of the CLI: teacher, calibrate, cache, distill, evaluate (and
``sweep``, in :mod:`trainer.sweep`).

Splits: ``data.train_store`` trains; ``data.val_store`` (held out from the
training data) is what anything fitted or chosen sees (per-epoch validation,
temperature scaling, the sweep); ``data.test_store`` is read only by
``evaluate`` and the reports.

Under torchrun (:mod:`trainer.distributed`) every job runs on every rank:
``calibrate`` and ``evaluate`` shard their split over the ranks and gather
the logits, so every rank computes the same result; ``cache`` fills disjoint
part files per rank and rank 0 assembles them; ``evaluate --corruptions``
deals its (type, severity) conditions out to the ranks. Only rank 0 writes
files, and every job ends at a barrier, so what it wrote is there for the
next job on any rank."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dataset_tools.atomic import write_json_atomic as write_json
from dataset_tools.progress import log_line, progress
from dataset_tools.stores.layout import open_store
from pipelines.loader import create_loader
from trainer import distributed
from trainer.checkpoint import load_checkpoint
from trainer.data import cache_key, loader_config, teacher_cache_format
from trainer.distill.teacher_cache import (fill_teacher_cache, open_teacher_cache, plan_fill, spatial_layout,
                                           stores_features, teacher_rows)
from trainer.distributed import setup as setup_distributed
from trainer.engine import Trainer
from trainer.evaluation.logits import collect_logits
from trainer.run_settings import amp_dtype
from trainer.teacher import load_teacher
from trainer.evaluation.calibration import calibration_metrics, ece_noise_floor, reliability_diagram
from trainer.evaluation.temperature import crossfit_ece, fit_temperature
from trainer.models import create_model
from trainer.recipe import Config


def _autocast_for(cfg: Config, device):
    dt = amp_dtype(cfg, device)
    return (lambda: torch.autocast(device.type, dtype=dt)) if dt is not None else nullcontext


def _eval_loader(cfg: Config, split: str, resolution: int, device, sharded: bool = True):
    """Whole images of the ``val`` or ``test`` split at ``resolution``, every
    sample once: across the ranks under torchrun (``sharded``; gather with
    :func:`~trainer.evaluation.logits.collect_logits`), else all of them on this rank."""
    lc = loader_config(cfg, split, device, resolution=resolution)
    return create_loader(lc) if sharded else create_loader(lc, rank=0, world_size=1)


def _fit(cfg: Config, role: str) -> dict:
    trainer = Trainer(cfg, role)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def run_teacher(cfg: Config) -> dict:
    """Plain cross-entropy at full resolution: the usual overconfident teacher."""
    return _fit(cfg, "teacher")


def run_calibrate(cfg: Config) -> dict:
    """Fit one temperature on the validation split (``data.val_store``, held
    out from the training data) by minimizing NLL.

    The ECE after scaling is reported by 2-fold cross-fitting (fit on half the
    held-out samples, measure on the other half, and vice versa), so the
    reported improvement is not measured on the samples T was fitted to; the
    saved temperature is fitted on all of them. Under torchrun the ranks
    share the teacher's forward passes and every rank fits the same T from
    the gathered logits; rank 0 writes.
    """
    device = setup_distributed(cfg)
    with _eval_loader(cfg, "val", cfg.data.teacher_resolution, device) as loader:
        teacher, whash = load_teacher(cfg, loader.store.num_classes, device)
        logits, labels = collect_logits(teacher, loader, _autocast_for(cfg, device))
    full = fit_temperature(logits, labels)
    before = calibration_metrics(logits, labels)
    result = {"temperature": full.temperature, "teacher_weights_hash": whash,
              "nll_before": full.nll_before, "nll_after": full.nll_after,
              "ece_before": before["ece"], "ece_after_fitted": full.ece_after,
              "ece_after_crossfit": crossfit_ece(logits, labels), "accuracy": before["top1"],
              "num_samples": len(labels), "store": cfg.data.val_store, "split": "val"}
    if distributed.is_main():
        cfg.teacher_dir.mkdir(parents=True, exist_ok=True)
        write_json(cfg.temperature_file, result)
        reliability_diagram(logits, labels, cfg.teacher_dir / "reliability_before.png",
                            title=f"teacher {cfg.model.teacher}, T=1")
        reliability_diagram(logits / full.temperature, labels, cfg.teacher_dir / "reliability_after.png",
                            title=f"teacher {cfg.model.teacher}, T={full.temperature:.2f}")
    distributed.barrier()
    return result


def run_cache(cfg: Config) -> dict:
    """Fill the teacher cache: logits (and penultimate embeddings, see
    ``distill.cache_features``, and area-pooled last feature maps, see
    ``distill.cache_spatial``) of K full-resolution views per training
    sample, in the format ``distill.cache_format`` resolves to; its sizes are
    printed and checked against memory and disk before the teacher runs.
    Under torchrun each rank computes the part files of its shard of every
    view and rank 0 assembles the cache
    (:func:`~trainer.distill.cache_parts.fill_parts`)."""
    device = setup_distributed(cfg)
    d, dc = cfg.data, cfg.distill
    if d.num_views < 1:
        raise ValueError("data.num_views must be >= 1 to fill a logit cache")
    store = open_store(d.train_store)
    fmt = teacher_cache_format(cfg, store)
    path = cfg.cache_file(fmt)
    teacher, whash = load_teacher(cfg, store.num_classes, device)
    feature_dim = teacher.feature_dim if stores_features(
        fmt, dc.cache_features, cfg.loss.rkd > 0 or cfg.loss.crd > 0) else 0
    spatial_channels, spatial_grid = spatial_layout(fmt, dc, teacher, store.num_samples, d.num_views)
    plan = plan_fill(fmt, path, store.num_samples, d.num_views, store.num_classes, dc.cache_dtype,
                     dc.cache_topk, feature_dim, spatial_channels, spatial_grid)
    if distributed.is_main():
        log_line(plan["summary"])
    key = cache_key(cfg, whash, store.fingerprint, device=device, amp=amp_dtype(cfg, device))
    autocast = _autocast_for(cfg, device)
    rank, world = distributed.rank(), distributed.world_size()
    bar = progress(total=-(-store.num_samples // world) * d.num_views, desc="teacher cache", unit="img",
                   enabled=cfg.run.progress and distributed.is_main())
    t0 = time.perf_counter()

    def view_batches(v):
        # Same view contract as training (seed, K, scale, ratio, flip); every sample once.
        lc = loader_config(cfg, "cache", device, fixed_view=v)
        with create_loader(lc, rank=rank, world_size=world) as loader:  # this rank's shard
            for batch in loader:
                def compute(batch=batch):
                    with autocast():
                        return teacher_rows(teacher, batch.student, feature_dim, spatial_grid)
                yield batch.indices.cpu().numpy(), compute

    path = fill_teacher_cache(fmt, path, key, store.num_samples, store.num_classes, d.num_views,
                              view_batches, dtype=dc.cache_dtype, progress=bar.update,
                              feature_dim=feature_dim, topk=dc.cache_topk,
                              spatial_channels=spatial_channels, spatial_grid=spatial_grid,
                              rank=rank, world_size=world, barrier=distributed.barrier)
    bar.close()
    seconds = time.perf_counter() - t0
    if not distributed.is_main():  # rank 0 reads the assembled cache and tells the others
        return distributed.broadcast_object(None)
    cache = open_teacher_cache(path, key)
    result = {"path": str(path), "format": fmt, "num_samples": cache.num_samples,
              "num_views": cache.num_views, "num_classes": cache.num_classes,
              "feature_dim": cache.feature_dim, "spatial_grid": cache.spatial_grid, "dtype": dc.cache_dtype,
              "logits_bytes": plan["logits_bytes"], "features_bytes": plan["features_bytes"],
              "spatial_bytes": plan["spatial_bytes"], "fp16_max_abs_error": cache.fp16_max_abs_error,
              "features_fp16_max_abs_error": cache.features_fp16_max_abs_error,
              "spatial_fp16_max_abs_error": getattr(cache, "spatial_fp16_max_abs_error", 0.0),
              "seconds": seconds,
              "teacher_images_per_sec": store.num_samples * d.num_views / max(seconds, 1e-9)}
    if fmt == "topk":
        result.update(topk=cache.topk, reconstruction_kl=cache.meta["reconstruction_kl"])
    write_json(path.with_suffix(".json"), result)
    return distributed.broadcast_object(result)


def run_distill(cfg: Config) -> dict:
    """A student at reduced resolution from cached or online teacher targets.
    With ``loss.temperature: auto`` the sweep (:mod:`trainer.sweep`) chooses
    the temperature and objective on the validation split first (reusing its
    result when it exists for this recipe)."""
    if cfg.loss.temperature == "auto" and cfg.distill.targets != "none":
        from trainer.sweep import apply_choice, run_sweep

        cfg = apply_choice(cfg, run_sweep(cfg))
    return _fit(cfg, "student")


def _load_evaluable(cfg: Config, checkpoint: str, store_classes: int) -> tuple[Path, dict, torch.nn.Module]:
    """A trainer checkpoint (default: the run's student), checked against the
    test store's class count, and its model rebuilt (on the CPU)."""
    path = Path(checkpoint) if checkpoint else cfg.student_dir / "final.pt"
    ck = load_checkpoint(path)
    for k in ("arch", "num_classes", "model", "student_resolution"):
        if k not in ck:
            raise ValueError(f"{path}: not a checkpoint of this trainer (missing {k!r})")
    if store_classes != ck["num_classes"]:
        raise ValueError(f"{path}: model has {ck['num_classes']} classes, {cfg.data.test_store} has "
                         f"{store_classes}")
    model = create_model(ck["arch"], ck["num_classes"], low_res_stem=ck.get("low_res_stem", True))
    model.load_state_dict(ck["model"])
    return path, ck, model


def _posthoc_scaling(cfg: Config, model, resolution: int, device, test_logits, test_labels) -> dict:
    """What temperature scaling fitted on the validation split would give on
    the test split (``posthoc_*``): the reference point for any checkpoint,
    calibrated (``distill.calibrate_student``: T ~ 1) or not. Empty when the
    config has no validation store."""
    if not Path(cfg.data.val_store).is_dir():
        return {}
    with _eval_loader(cfg, "val", resolution, device) as loader:
        val_logits, val_labels = collect_logits(model, loader, _autocast_for(cfg, device))
    t = fit_temperature(val_logits, val_labels).temperature
    scaled = calibration_metrics(test_logits / t, test_labels)
    return {"posthoc_temperature": t, **{f"posthoc_{k}": scaled[k] for k in ("ece", "nll", "brier")}}


def run_evaluate(cfg: Config, checkpoint: str = "") -> dict:
    """Accuracy and the calibration family of a checkpoint on the test split
    (``data.test_store``), plus its reliability diagram and what a temperature
    fitted on the validation split would change (``posthoc_*``). Under torchrun the
    ranks share the forward passes and gather the logits; rank 0 writes."""
    device = setup_distributed(cfg)
    path, ck, model = _load_evaluable(cfg, checkpoint, open_store(cfg.data.test_store).num_classes)
    # as Trainer.val_loop runs it: the same loader settings (trainer/data.py) and memory format
    fmt = torch.channels_last if cfg.data.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    with _eval_loader(cfg, "test", ck["student_resolution"], device) as loader:
        t0 = time.perf_counter()  # one pass: the metrics come from the collected logits
        bar = progress(total=len(loader), desc=f"evaluate {path.name}", unit="batch",
                       enabled=cfg.run.progress and distributed.is_main())
        logits, labels = collect_logits(model, loader, _autocast_for(cfg, device), bar.update)
        bar.close()
        metrics = calibration_metrics(logits, labels)
        metrics["eval_images_per_sec"] = len(labels) / max(time.perf_counter() - t0, 1e-9)
    metrics["ece_floor"] = ece_noise_floor(logits)  # what sampling noise alone gives on this split
    metrics.update(_posthoc_scaling(cfg, model, ck["student_resolution"], device, logits, labels))
    png = path.with_name(path.stem + "_reliability.png")
    result = {"checkpoint": str(path), "arch": ck["arch"], "resolution": ck["student_resolution"],
              "student_temperature": ck.get("student_temperature"),
              "store": cfg.data.test_store, "split": "test", **metrics, "reliability_diagram": str(png),
              "logits_file": str(path.with_name(path.stem + "_test_logits.pt"))}
    if distributed.is_main():
        reliability_diagram(logits, labels, png, title=f"{ck['arch']} @ {ck['student_resolution']}px")
        torch.save({"logits": logits, "labels": labels}, result["logits_file"])
        write_json(path.with_name(path.stem + "_eval.json"), result)
    distributed.barrier()
    return result


def run_evaluate_corruptions(cfg: Config, checkpoint: str = "", severities=None, types=None,
                             limit: int = 0) -> dict:
    """Accuracy, ECE and NLL of a checkpoint on the test split under the 15
    CIFAR-C corruptions x 5 severities (see trainer/evaluation/corruptions.py for the
    pipeline); ``limit > 0``: a class-balanced subset of that many images.
    Writes ``<checkpoint stem>_corruptions.json`` beside the checkpoint.
    Under torchrun every rank reads the images and the ranks share out the
    conditions (:func:`~trainer.evaluation.corruptions.evaluate_corruptions`);
    rank 0 writes."""
    from trainer.evaluation import corruptions as C

    types = list(types or C.CORRUPTIONS)
    severities = [int(s) for s in (severities or C.SEVERITIES)]
    C.check_names(types, severities)
    if limit < 0:
        raise ValueError(f"--corruption-limit must be >= 0 (0 = every image), got {limit}")
    device = setup_distributed(cfg)
    store = open_store(cfg.data.test_store)
    path, ck, model = _load_evaluable(cfg, checkpoint, store.num_classes)
    native = C.native_size(store.manifest)
    t0 = time.perf_counter()
    with _eval_loader(cfg, "test", native, torch.device("cpu"), sharded=False) as loader:
        images, labels, indices = C.read_native_images(loader, limit)
    metrics = C.evaluate_corruptions(
        model.to(device), images, labels, indices, resolution=ck["student_resolution"],
        mean=store.mean, std=store.std, device=device, autocast=_autocast_for(cfg, device),
        types=types, severities=severities, batch_size=cfg.data.eval_batch_size, seed=cfg.run.seed,
        channels_last=cfg.data.channels_last, workers=cfg.data.num_workers,
        progress=cfg.run.progress and distributed.is_main())
    out = path.with_name(path.stem + "_corruptions.json")
    result = {"checkpoint": str(path), "arch": ck["arch"], "resolution": ck["student_resolution"],
              "store": cfg.data.test_store, "native_resolution": native, "num_images": len(labels),
              "limit": limit, "seed": cfg.run.seed,
              "parameters": "CIFAR-10/100-C (Hendrycks & Dietterich 2019, make_cifar_c.py)",
              "substitutions": C.SUBSTITUTIONS, **metrics, "seconds": time.perf_counter() - t0,
              "json": str(out)}
    if distributed.is_main():
        write_json(out, result)
    distributed.barrier()
    return result
