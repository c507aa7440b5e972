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
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pipelines.loader import LoaderConfig, create_loader
from pipelines.mixing import Mixer
from trainer.evaluation.calibration import CalibrationMeter
from trainer.checkpoint import load_checkpoint, save_checkpoint, unwrap, weights_hash
from trainer.distill.logit_cache import CacheKey, LogitCache
from trainer.distill.kd import teacher_probs
from trainer.distill.loss import DistillLoss
from trainer.models import create_model
from trainer.recipe import Config


def setup_distributed(cfg: Config) -> torch.device:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.run.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def amp_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    mode = cfg.run.amp
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def load_teacher(cfg: Config, num_classes: int, device) -> tuple[torch.nn.Module, str]:
    ckpt = load_checkpoint(cfg.teacher_checkpoint)
    if ckpt.get("arch") != cfg.model.teacher:
        raise ValueError(f"{cfg.teacher_checkpoint}: checkpoint is a {ckpt.get('arch')!r}, config "
                         f"says model.teacher={cfg.model.teacher!r}")
    if ckpt.get("num_classes") != num_classes:
        raise ValueError(f"{cfg.teacher_checkpoint}: teacher has {ckpt.get('num_classes')} classes, "
                         f"the store has {num_classes}; wrong dataset?")
    model = create_model(cfg.model.teacher, num_classes, low_res_stem=cfg.model.teacher_low_res_stem)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["weights_hash"]


def cache_key(cfg: Config, teacher_hash: str, fingerprint: str) -> CacheKey:
    views = LoaderConfig(seed=cfg.data.view_seed, num_views=cfg.data.num_views, scale=cfg.data.scale,
                         ratio=cfg.data.ratio, flip=cfg.data.flip).view_config()
    return CacheKey(teacher_hash=teacher_hash, data_fingerprint=fingerprint, views=views.to_dict(),
                    teacher_resolution=cfg.data.teacher_resolution)


def loader_config(cfg: Config, role: str, train: bool, device) -> LoaderConfig:
    """The loader a job needs: the teacher trains on full-resolution views;
    the student on low-resolution ones, plus the full-resolution teacher view
    of the same crop when the teacher runs online."""
    d, teacher_role = cfg.data, role == "teacher"
    online = role == "student" and cfg.distill.targets == "online"
    return LoaderConfig(
        backend=d.backend, store=d.train_store if train else d.val_store,
        lowres=d.lowres and not teacher_role and not online,
        batch_size=d.batch_size if train else d.eval_batch_size, num_workers=d.num_workers,
        shuffle=train, seed=d.view_seed, drop_last=train,
        student_resolution=d.teacher_resolution if teacher_role else d.student_size,
        teacher_resolution=d.teacher_resolution if (train and online) else 0, train=train,
        num_views=d.num_views, scale=d.scale, ratio=d.ratio, flip=d.flip,
        channels_last=d.channels_last, device=str(device))


class Trainer:
    def __init__(self, cfg: Config, role: str):
        if role not in ("teacher", "student"):
            raise ValueError(role)
        self.cfg, self.role = cfg, role
        self.device = setup_distributed(cfg)
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        self.out_dir = cfg.teacher_dir if role == "teacher" else cfg.student_dir
        self.train_loader = self.create_loader(train=True)
        self.num_classes = self.train_loader.store.num_classes
        self.val_loader = self.create_loader(train=False) if is_main() else None
        if self.val_loader is not None and self.val_loader.store.num_classes != self.num_classes:
            raise ValueError(f"{cfg.data.val_store}: {self.val_loader.store.num_classes} classes, but "
                             f"{cfg.data.train_store} has {self.num_classes}")
        arch = cfg.model.teacher if role == "teacher" else cfg.model.student
        self.arch = arch
        self.low_res_stem = cfg.model.teacher_low_res_stem if role == "teacher" \
            else cfg.model.student_low_res_stem
        model = create_model(arch, self.num_classes, low_res_stem=self.low_res_stem)
        self.model = model.to(self.device, memory_format=self._memory_format())
        self.teacher, self.cache, self.temperature = None, None, cfg.loss.temperature
        teacher_dim = None
        if role == "student" and cfg.distill.targets != "none":
            self._setup_teacher_targets()
            teacher_dim = self.teacher.feature_dim if self.teacher is not None else self.num_classes
        loss_cfg = cfg.loss if role == "student" else replace(cfg.loss, ce=1.0, kd=0.0, rkd=0.0, crd=0.0)
        if role == "student" and cfg.distill.targets == "none":
            loss_cfg = replace(loss_cfg, kd=0.0, rkd=0.0, crd=0.0)
        if role == "student":  # KD softens both sides with the same (possibly calibrated) T
            loss_cfg = replace(loss_cfg, temperature=self.temperature)
        self.loss_cfg = loss_cfg
        self.criterion = DistillLoss(loss_cfg, student_dim=unwrap(self.model).feature_dim,
                                     teacher_dim=teacher_dim or 1,
                                     num_samples=self.train_loader.store.num_samples).to(self.device)
        params = list(self.model.parameters()) + list(self.criterion.parameters())
        o = cfg.optim
        self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                         weight_decay=o.weight_decay)
        self.steps_per_epoch = max(1, len(self.train_loader))
        self.epochs = cfg.optim.teacher_epochs if role == "teacher" and cfg.optim.teacher_epochs \
            else cfg.optim.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.mixer = Mixer(cfg.mix, cfg.run.seed) if role == "student" and cfg.mix.enabled else None
        self.amp = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(enabled=self.amp == torch.float16)
        self.epoch, self.global_step, self.step_in_epoch = 0, 0, 0
        if dist.is_initialized():
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.model) if cfg.run.compile else self.model
        if is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir / "log.jsonl"
        self.tb = SummaryWriter(str(self.out_dir / "tb")) if is_main() else None
        if cfg.run.resume:
            self.resume()

    # ------------------------------------------------------------------ setup
    def _memory_format(self):
        return torch.channels_last if self.cfg.data.channels_last else torch.contiguous_format

    def create_loader(self, train: bool):
        lc = loader_config(self.cfg, self.role, train, self.device)
        return create_loader(lc, world_size=None if train else 1, rank=None if train else 0)

    def _setup_teacher_targets(self):
        cfg = self.cfg
        if cfg.distill.temperature_from_calibration:
            self.temperature = float(json.loads(cfg.temperature_file.read_text())["temperature"])
        if cfg.distill.targets == "online":
            self.teacher, _ = load_teacher(cfg, self.num_classes, self.device)
        elif cfg.distill.targets == "cached":
            if cfg.data.num_views == 0:
                raise ValueError("distill.targets=cached needs replayable views (data.num_views > 0)")
            ckpt = load_checkpoint(cfg.teacher_checkpoint)
            key = cache_key(cfg, ckpt["weights_hash"], self.train_loader.store.fingerprint)
            self.cache = LogitCache.open(cfg.cache_path, key, device=self.device)
        else:
            raise ValueError(f"distill.targets must be cached, online or none, got "
                             f"{cfg.distill.targets!r}")

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
    def targets(self, batch):
        """(teacher probabilities at T, teacher embedding) for the batch, mixed
        like the batch. Cached mode mixes the cached probabilities (an
        approximation: the teacher never saw the mixed image) and hands the
        (mixed) cached logits to RKD/CRD as the teacher embedding; online mode
        runs the teacher on the mixed full-resolution view (exact) and uses its
        pooled features."""
        if self.cache is not None:
            logits = self.cache.lookup(batch.indices, batch.view_ids)
            probs = teacher_probs(logits, self.temperature)
            if batch.mix is not None:
                return batch.mix.mix_targets(probs), batch.mix.mix_targets(logits)
            return probs, logits
        if self.teacher is None:
            return None, None
        with torch.no_grad(), self._autocast():
            emb, logits = self.teacher.forward_features(batch.teacher)
        return teacher_probs(logits.float(), self.temperature), emb.float()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                              enabled=self.amp is not None)

    def train_step(self, batch, stats):
        if self.mixer is not None:
            batch = self.mixer(batch, self.global_step)
        t_probs, t_emb = self.targets(batch)
        with self._autocast():
            s_emb, s_logits = self.forward(batch.student, return_features=True)
            total, parts = self.criterion(s_logits.float(), s_emb.float(),
                                          batch.one_hot(self.num_classes), t_probs, t_emb,
                                          batch.indices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        stats["loss"] += total.detach() * len(batch)
        stats["correct"] += (s_logits.argmax(1) == batch.labels).sum()
        stats["n"] += len(batch)
        for k, v in parts.items():
            stats.setdefault(k, torch.zeros((), device=self.device))
            stats[k] += v.detach() * len(batch)

    def train_loop(self) -> dict:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        stats = {k: torch.zeros((), device=self.device) for k in ("loss", "correct", "n")}
        skip = self.step_in_epoch  # resuming mid-epoch: replay the same order, skip done steps
        bar = tqdm(total=len(self.train_loader), initial=skip, disable=not (is_main() and self.cfg.run.progress),
                   desc=f"{self.role} epoch {self.epoch}", leave=False)
        t0, n_images = time.perf_counter(), 0
        for i, batch in enumerate(self.train_loader):
            if i < skip:
                continue
            self.train_step(batch, stats)
            self.step_in_epoch = i + 1
            n_images += len(batch)
            bar.update(1)
            if self.global_step % max(1, self.cfg.run.log_every) == 0:
                bar.set_postfix(loss=f"{(stats['loss'] / stats['n']).item():.3f}",
                                img_s=f"{n_images / (time.perf_counter() - t0):.0f}")
            if self.cfg.run.checkpoint_every and self.global_step % self.cfg.run.checkpoint_every == 0:
                self.save("last.pt")
            if self.cfg.run.max_steps and self.global_step >= self.cfg.run.max_steps:
                break
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
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
        if self.val_loader is None:
            return {}
        return evaluate_model(self.model, self.val_loader, self._autocast)

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
        self.global_step = ck["global_step"]
        torch.set_rng_state(ck["torch_rng"])
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------- fit
    def log(self, record: dict) -> None:
        if not is_main():
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, record["epoch"])
        self.tb.flush()

    def fit(self) -> dict:
        last = {}
        while self.epoch < self.epochs:
            t0 = time.perf_counter()
            train = self.train_loop()
            stopped = bool(self.cfg.run.max_steps and self.global_step >= self.cfg.run.max_steps)
            if self.step_in_epoch >= self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            val = self.val_loop()
            last = {"epoch": self.epoch, "step": self.global_step, **train,
                    **{f"val_{k}": v for k, v in val.items()}, "epoch_seconds": time.perf_counter() - t0}
            self.log(last)
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


@torch.no_grad()
def collect_logits(model, loader, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader (eval mode), on the CPU."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        with autocast():
            out = model(batch.student)
        logits.append(out.float())
        labels.append(batch.labels)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


@torch.no_grad()
def evaluate_model(model, loader, autocast) -> dict:
    model.eval()
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
