"""What a run is set up with before its loop starts: seeding, the autocast
dtype, the role settings (what differs between training the teacher and a
student, resolved once), the calibrated teacher's temperature and the
torchrun wrapping of the trainable modules."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer.distill.loss_config import LossConfig
from trainer.recipe import Config


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


def calibrated_temperature(cfg: Config, teacher_hash: str) -> float:
    """The teacher temperature fitted on the validation split by ``calibrate``
    (``temperature.json``), checked to belong to this teacher and split."""
    path = cfg.temperature_file
    if not path.is_file():
        raise ValueError(f"{path}: no fitted temperature; run 'python -m trainer calibrate "
                         f"--config ...' first (it fits T on data.val_store)")
    rec = json.loads(path.read_text())
    if rec.get("teacher_weights_hash") != teacher_hash:
        raise ValueError(f"{path}: fitted for another teacher; re-run 'python -m trainer calibrate'")
    if rec.get("store") != cfg.data.val_store or rec.get("split") != "val":
        raise ValueError(f"{path}: fitted on {rec.get('store')!r}, not the validation split "
                         f"{cfg.data.val_store!r}; re-run 'python -m trainer calibrate'")
    return float(rec["temperature"])


@dataclass(frozen=True)
class RoleSettings:
    """What differs between training the teacher and a student, resolved once."""

    arch: str
    low_res_stem: bool
    out_dir: Path
    epochs: int
    loss: LossConfig
    targets: str  # none | cached | online
    mixing: bool
    calibrate: bool = False  # distill.calibrate_student: fold a val-fitted temperature at the end


def role_settings(cfg: Config, role: str) -> RoleSettings:
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be teacher or student, got {role!r}")
    if role == "teacher":  # plain CE at full resolution: the usual overconfident teacher
        return RoleSettings(cfg.model.teacher, cfg.model.teacher_low_res_stem, cfg.teacher_dir,
                            cfg.optim.teacher_epochs or cfg.optim.epochs,
                            replace(cfg.loss, ce=1.0, kd=0.0, rkd=0.0, crd=0.0), "none", False)
    if cfg.distill.targets not in TARGET_MODES:
        raise ValueError(f"distill.targets must be one of {TARGET_MODES}, got {cfg.distill.targets!r}")
    loss = cfg.loss
    if cfg.distill.targets == "none":
        loss = replace(loss, kd=0.0, rkd=0.0, crd=0.0)
    return RoleSettings(cfg.model.student, cfg.model.student_low_res_stem, cfg.student_dir,
                        cfg.optim.epochs, loss, cfg.distill.targets, cfg.mix.enabled,
                        cfg.distill.calibrate_student)


TARGET_MODES = ("cached", "online", "none")


def ddp_wrap(model: torch.nn.Module, criterion: torch.nn.Module, device: torch.device):
    """``(DDP(model), loss module)`` for a torchrun run: gradients of every
    trainable module are all-reduced. The criterion is wrapped too when it has
    trainable parameters (CRD's projection heads), with ``forward_sync_buffers=False``:
    its buffers (CRD memory banks) are broadcast from rank 0 once, at wrapping,
    and then kept identical by the loss itself (:mod:`trainer.distill.crd`);
    they are far too big to broadcast every step.
    Checkpoints keep the plain modules' keys (``unwrap``)."""
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    loss_fn = ddp(criterion, device_ids=ids, forward_sync_buffers=False) \
        if any(p.requires_grad for p in criterion.parameters()) else criterion
    return ddp(model, device_ids=ids), loss_fn
