"""The one training loop, whatever the backend and whatever the job.

``Trainer(cfg, role)`` trains the teacher (``role="teacher"``: plain CE on
full-resolution views, the usual overconfident teacher) or a student
(``role="student"``: low-resolution views, targets from the logit cache or the
online teacher, mixing, KD/RKD/CRD). Shaped like ffcv-imagenet's trainer:
``create_loader`` / ``train_loop`` / ``val_loop``, JSON-lines logs.

Hot-path rules: data stays on the device, metrics accumulate on the device
and are synced only every ``log_every`` steps, transfers are non-blocking.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function
from torch.utils.tensorboard import SummaryWriter

from dataset_tools.progress import log_line, progress
from pipelines.loader import create_loader
from pipelines.mixing import Mixer
from trainer.data import cache_key, loader_config, teacher_cache_path
from trainer.distributed import is_main, sync_buffers
from trainer.distributed import rank as process_rank
from trainer.distributed import setup as setup_distributed
from trainer.evaluation.calibration import calibration_metrics
from trainer.evaluation.logits import evaluate_model, sample_logits
from trainer.evaluation.temperature import crossfit_ece, fit_temperature
from trainer.models.temperature_fold import fold_temperature
from trainer.checkpoint import load_checkpoint, save_checkpoint, unwrap, weights_hash
from trainer.distill.teacher_cache import open_teacher_cache
from trainer.epoch_sums import EpochSums
from trainer.distill.loss import DistillLoss
from trainer.distill.spatial import spatial_head_for
from trainer.distill.targets import CachedTargets, NoTargets, OnlineTargets
from trainer.models import create_model
from trainer.recipe import Config
from trainer.run_record import check_resume, write_resolved_config
from trainer.run_settings import (RoleSettings, amp_dtype, calibrated_temperature, ddp_wrap, role_settings,
                                  seed_everything)
from trainer.teacher import init_from_weights, load_teacher, teacher_hash


_NO_OP = nullcontext()


def phase(name: str):
    """``record_function(name)`` while a profiler records, else a shared no-op
    context: each label costs ~8 us (eight per step, ~0.4 % of a CPU student
    step) when nothing listens. torch has no public check for a running
    profiler; this private one costs ~0.1 us."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else _NO_OP


class Trainer:
    def __init__(self, cfg: Config, role: str):
        self.created_at, self.first_step_seconds = time.perf_counter(), None  # time to first step
        self._logged: set = set()
        self.student_temperature = None  # folded into the classifier (distill.calibrate_student)
        self.role_cfg = rc = role_settings(cfg, role)
        check_resume(cfg, rc.out_dir, role)  # a changed recipe fails now, before any work
        self.cfg, self.role = cfg, role
        self.device = setup_distributed(cfg)
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        self.out_dir, self.arch, self.low_res_stem, self.epochs = rc.out_dir, rc.arch, rc.low_res_stem, rc.epochs
        self.train_loader = self.create_loader(train=True)
        self.num_classes = self.train_loader.store.num_classes
        self.val_loader = self.create_loader(train=False)  # sharded over the ranks: val_loop
        if self.val_loader is not None and self.val_loader.store.num_classes != self.num_classes:
            raise ValueError(f"{cfg.data.val_store}: {self.val_loader.store.num_classes} classes, but "
                             f"{cfg.data.train_store} has {self.num_classes}")
        model = create_model(rc.arch, self.num_classes, low_res_stem=rc.low_res_stem)
        if role == "teacher" and cfg.model.teacher_weights:  # fine-tune an imported teacher
            init = init_from_weights(model, cfg, self.num_classes)
            if is_main():
                log_line(f"teacher: starting from {init.path} ({init.source}; head {init.head})")
        self.model = model.to(self.device, memory_format=self._memory_format())
        self.amp = amp_dtype(cfg, self.device)
        self.temperature = None if rc.loss.temperature == "auto" else float(rc.loss.temperature)
        self.targets = self._build_targets(rc)
        self.loss_cfg = self.role_cfg.loss  # with a temperature taken from calibration, if so
        self.criterion = DistillLoss(self.loss_cfg, student_dim=unwrap(self.model).feature_dim,
                                     teacher_dim=self.targets.teacher_dim or 1,
                                     num_samples=self.train_loader.store.num_samples).to(self.device)
        params = list(self.model.parameters()) + list(self.criterion.parameters())
        o = cfg.optim
        # fused: one kernel per step for all parameters instead of ~5 ops per
        # tensor (0.43 -> 0.13 ms of a ~18 ms resnet8 step on two CPU cores)
        self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                         weight_decay=o.weight_decay,
                                         fused=self.device.type in ("cpu", "cuda"))
        self.steps_per_epoch = max(1, len(self.train_loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.mixer = Mixer(cfg.mix, cfg.run.seed, rank=process_rank()) if rc.mixing else None
        self.scaler = torch.amp.GradScaler(enabled=self.amp == torch.float16)
        self.epoch, self.global_step, self.step_in_epoch = 0, 0, 0
        self.loss_fn = self.criterion  # what train_step calls; self.criterion stays the plain module
        if dist.is_initialized():
            self.model, self.loss_fn = ddp_wrap(self.model, self.criterion, self.device)
        self.forward = torch.compile(self.model) if cfg.run.compile else self.model
        if is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(cfg, self.out_dir)
        self.log_path = self.out_dir / "log.jsonl"
        self.tb = SummaryWriter(str(self.out_dir / "tb")) if is_main() else None
        if cfg.run.resume:
            self.resume()

    # ------------------------------------------------------------------ setup
    def _memory_format(self):
        return torch.channels_last if self.cfg.data.channels_last else torch.contiguous_format

    def create_loader(self, train: bool):
        """Both loaders read this rank's DistributedSampler shard under torchrun."""
        lc = loader_config(self.cfg, "train" if train else "val", self.device, role=self.role)
        return create_loader(lc)

    def _build_targets(self, rc: RoleSettings):
        """The targets strategy of ``distill.targets`` at the teacher temperature
        (see :mod:`trainer.distill.targets`)."""
        cfg = self.cfg
        if rc.targets == "none":
            return NoTargets()
        if self.temperature is None:
            raise ValueError("loss.temperature=auto: run 'python -m trainer sweep' (distill does it "
                             "for you) so a temperature is chosen on the validation split")
        if cfg.distill.temperature_from_calibration and cfg.distill.calibrated_teacher:
            raise ValueError("distill.temperature_from_calibration and distill.calibrated_teacher "
                             "both apply the fitted temperature; choose one")
        if rc.targets == "online":
            teacher, whash = load_teacher(cfg, self.num_classes, self.device)
        else:
            if cfg.data.num_views == 0:
                raise ValueError("distill.targets=cached needs replayable views (data.num_views > 0)")
            whash = teacher_hash(cfg, self.num_classes)
        t_cal = calibrated_temperature(cfg, whash) if (
            cfg.distill.calibrated_teacher or cfg.distill.temperature_from_calibration) else 1.0
        if cfg.distill.temperature_from_calibration:  # the fitted T is the KD temperature
            self.temperature, t_cal = t_cal, 1.0
            self.role_cfg = replace(rc, loss=replace(rc.loss, temperature=self.temperature))
            rc = self.role_cfg
        teacher_t = t_cal * self.temperature
        if rc.targets == "online":
            return OnlineTargets(teacher, teacher_t, self._autocast)
        key = cache_key(cfg, whash, self.train_loader.store.fingerprint, device=self.device, amp=self.amp)
        cache = open_teacher_cache(teacher_cache_path(cfg, self.train_loader.store), key,
                                   device=self.device)
        head = spatial_head_for(cfg, cache, self.num_classes, self.device, mixing=rc.mixing)
        return CachedTargets(cache, teacher_t, cfg.distill.cached_mix,
                             need_features=rc.loss.rkd > 0 or rc.loss.crd > 0, head=head)

    def _lr_lambda(self, step: int) -> float:
        o = self.cfg.optim
        total = max(1, self.epochs * self.steps_per_epoch)
        warm = o.warmup_epochs * self.steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        frac = step / total
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return o.gamma ** sum(frac >= m for m in o.milestones)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.amp is None:  # a disabled autocast still costs ~5 us to enter and leave
            return _NO_OP
        return torch.autocast(self.device.type, dtype=self.amp)

    def train_step(self, batch, sums: EpochSums):
        """One optimizer step. The :func:`phase` labels name the phases for
        ``python -m benchmarks.loop_profile``."""
        if self.mixer is not None:
            with phase("mix"):
                batch = self.mixer(batch, self.global_step)
        with phase("targets"):
            t_probs, t_emb = self.targets(batch)
        with phase("forward_loss"), self._autocast():
            s_emb, s_logits = self.forward(batch.student, return_features=True)
            total, parts = self.loss_fn(s_logits.float(), s_emb.float(),
                                        batch.one_hot(self.num_classes), t_probs, t_emb,
                                        batch.indices)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        self.global_step += 1
        with phase("stats"):
            sums.add(total, parts, s_logits, batch.labels)

    def train_loop(self) -> dict:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        sums = EpochSums(self.device, terms=self.criterion.weights)
        skip = self.step_in_epoch  # resuming mid-epoch: replay the same order, skip done steps
        shown = is_main() and self.cfg.run.progress  # else no metric sync every log_every steps
        bar = progress(total=len(self.train_loader), initial=skip, enabled=shown,
                       desc=f"{self.role} epoch {self.epoch}", leave=False, final_line=False)
        t0, n_images = time.perf_counter(), 0
        batches, i = iter(self.train_loader), -1
        while True:
            with phase("data"):
                batch = next(batches, None)
            if batch is None:
                break
            i += 1
            if i < skip:
                continue
            self.train_step(batch, sums)
            if self.first_step_seconds is None:
                self.first_step_seconds = time.perf_counter() - self.created_at
            self.step_in_epoch = i + 1
            n_images += len(batch)
            bar.update(1)
            if shown and self.global_step % max(1, self.cfg.run.log_every) == 0:
                with phase("logging"):
                    bar.set_postfix(loss=f"{sums.mean_loss():.3f}",
                                    img_s=f"{n_images / (time.perf_counter() - t0):.0f}")
            if self.cfg.run.checkpoint_every and self.global_step % self.cfg.run.checkpoint_every == 0:
                self.save("last.pt")
            if self.cfg.run.max_steps and self.global_step >= self.cfg.run.max_steps:
                break
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        stats = sums.totals()
        if dist.is_initialized():
            for v in stats.values():
                dist.all_reduce(v)
        n = max(1.0, stats["n"].item())
        out = {k: (v.item() / n) for k, v in stats.items() if k not in ("n", "correct")}
        out["train_acc"] = stats["correct"].item() / n
        out["train_images_per_sec"] = n_images * (dist.get_world_size() if dist.is_initialized() else 1) \
            / max(elapsed, 1e-9)
        return out

    @torch.no_grad()
    def val_loop(self) -> dict:
        """Metrics on the validation split. Under torchrun every rank evaluates
        its shard through the plain module (no DDP collective runs in eval) and
        the logits are gathered, so every rank returns the same metrics."""
        if self.val_loader is None:
            return {}
        return evaluate_model(unwrap(self.model), self.val_loader, self._autocast)

    @torch.no_grad()
    def calibrate_student(self, raw_val: dict) -> tuple[dict, dict]:
        """``distill.calibrate_student``, after the last epoch: fit the
        student's temperature on the validation logits (NLL, as ``calibrate``
        does for the teacher), fold it into the classifier
        (:func:`~trainer.models.temperature_fold.fold_temperature`), and return
        the validation metrics of the calibrated student (the raw ones as
        ``raw_*``; ``ece_crossfit``: the ECE a temperature fitted on half the
        split gives on the other half, which the sweep compares) and
        ``{"student_temperature": T}``. Every rank fits the same T from the
        gathered logits, so the replicas stay identical."""
        model = unwrap(self.model)
        logits, labels = sample_logits(model, self.val_loader, self._autocast)
        logits, labels = logits.float().cpu(), labels.cpu()
        t = fit_temperature(logits, labels).temperature
        fold_temperature(model, t, self.num_classes)
        self.student_temperature = t
        val = {**{f"raw_{k}": v for k, v in raw_val.items()}, **calibration_metrics(logits / t, labels),
               "ece_crossfit": crossfit_ece(logits, labels)}
        val["eval_images_per_sec"] = raw_val.get("eval_images_per_sec", float("nan"))
        return val, {"student_temperature": t}

    # ------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        model = unwrap(self.model)
        sd = model.state_dict()
        return {"arch": self.arch, "num_classes": self.num_classes, "role": self.role,
                "low_res_stem": self.low_res_stem,
                "model": sd, "weights_hash": weights_hash(sd),
                "criterion": self.criterion.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "student_temperature": self.student_temperature,
                "global_step": self.global_step, "torch_rng": torch.get_rng_state(),
                "data_fingerprint": self.train_loader.store.fingerprint,
                "student_resolution": self.train_loader.cfg.student_resolution,
                "config": json.loads(json.dumps(asdict(self.cfg), default=str))}

    def save(self, name: str) -> Path:
        path = self.out_dir / name
        if is_main():
            save_checkpoint(path, self.state())
        return path

    def resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            if is_main():
                print(f"resume: {path} not found, starting from scratch")
            return
        ck = load_checkpoint(path)
        if ck.get("arch") != self.arch or ck.get("num_classes") != self.num_classes:
            raise ValueError(f"{path}: checkpoint is {ck.get('arch')}/{ck.get('num_classes')} classes, "
                             f"this run is {self.arch}/{self.num_classes}: incompatible checkpoint")
        unwrap(self.model).load_state_dict(ck["model"])
        self.criterion.load_state_dict(ck["criterion"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step_in_epoch = ck["epoch"], ck["step_in_epoch"]
        self.student_temperature = ck.get("student_temperature")
        self.global_step = ck["global_step"]
        torch.set_rng_state(ck["torch_rng"])
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------- fit
    def _epoch_line(self, rec: dict) -> None:
        """One line per epoch (dataset_tools/progress.py: above the bar on a terminal)."""
        if not (is_main() and self.cfg.run.progress):
            return
        val = f", val top-1 {rec['val_top1']:.3f}, val ECE {rec['val_ece']:.3f}" if "val_top1" in rec else ""
        log_line(f"{self.role} epoch {rec['epoch']}/{self.epochs}: loss {rec['loss']:.3f}, train acc "
                 f"{rec['train_acc']:.3f}{val}, {rec['train_images_per_sec']:.0f} img/s, "
                 f"{rec['epoch_seconds']:.1f} s")

    def log(self, record: dict) -> None:
        if not is_main():
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, record["epoch"])
        self.tb.flush()

    def _validate_now(self, stopped: bool) -> bool:
        """Validation after every ``run.val_every``-th epoch, and always after
        the last one (or a ``max_steps`` stop), whose metrics the sweep reads."""
        every = self.cfg.run.val_every
        return stopped or self.epoch >= self.epochs or (every > 0 and self.epoch % every == 0)

    def fit(self) -> dict:
        last = {}
        while self.epoch < self.epochs:
            t0 = time.perf_counter()
            train = self.train_loop()
            stopped = bool(self.cfg.run.max_steps and self.global_step >= self.cfg.run.max_steps)
            if self.step_in_epoch >= self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            val, calibration = {}, {}
            if self._validate_now(stopped):
                with phase("validation"):
                    sync_buffers(unwrap(self.model))  # torchrun: every rank evaluates rank 0's model
                    val = self.val_loop()
                    if self.role_cfg.calibrate and not stopped and self.epoch >= self.epochs:
                        val, calibration = self.calibrate_student(val)
            last = {"epoch": self.epoch, "step": self.global_step, **train, **calibration,
                    **{f"val_{k}": v for k, v in val.items()}, "epoch_seconds": time.perf_counter() - t0}
            if self.first_step_seconds is not None and "first_step_seconds" not in self._logged:
                last["first_step_seconds"] = self.first_step_seconds
                self._logged.add("first_step_seconds")
            self.log(last)
            self._epoch_line(last)
            self.save("last.pt")
            if stopped:  # interrupted on purpose (max_steps): resumable, not final
                break
        else:
            self.save("final.pt")
        if dist.is_initialized():
            dist.barrier()
        return last

    def close(self):
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()
        if self.tb is not None:
            self.tb.close()
        # The DDP wrappers' reducers hold the process group; dropped here, the
        # group can be destroyed while the interpreter is alive (a gloo group
        # freed during interpreter exit can abort the process: SIGABRT).
        self.model = self.forward = unwrap(self.model)
        self.loss_fn = self.criterion
