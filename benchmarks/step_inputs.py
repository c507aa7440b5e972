"""Synthetic inputs of the training-step benchmark (:mod:`benchmarks.step`):
device-resident batches, a stand-in loader, and a random teacher checkpoint
plus logit cache written through the trainer's own writers, so every mode's
``Trainer`` is built by the production code with only its loader replaced."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ALL_MODES = ("ce", "kd_cached", "kd_online", "kd_cached_cutmix")
@dataclass
class StepSettings:
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    teacher_resolution: int = 32
    student_resolution: int = 16
    batch_size: int = 128
    num_classes: int = 100
    num_samples: int = 50000  # rows of the synthetic logit cache (CIFAR-100 train size)
    num_views: int = 4
    modes: tuple[str, ...] = ALL_MODES
    warmup: int = 3  # untimed steps per mode
    steps: int = 10  # minimum steps per timed block
    block_seconds: float = 2.0  # cheap modes run more steps per block, to last this long
    repeats: int = 5  # timed rounds
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    cache_dtype: str = "float16"
    seed: int = 0


class SyntheticLoader:
    """Stands in for a ``pipelines`` loader where the Trainer asks for one:
    the store facts the Trainer reads, and a long nominal epoch (so the LR
    schedule stays away from its end). Batches are fed to ``train_step``
    directly, never through this object."""

    def __init__(self, s: StepSettings, student_resolution: int):
        self.store = SimpleNamespace(num_samples=s.num_samples, num_classes=s.num_classes,
                                     fingerprint=f"sha256:synthetic-{s.num_samples}-{s.num_classes}")
        self.cfg = SimpleNamespace(student_resolution=student_resolution)

    def __len__(self) -> int:
        return 10**6

    def __iter__(self):
        raise RuntimeError("SyntheticLoader holds no data: feed batches to Trainer.train_step")

    def set_epoch(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


def bench_trainer_class():
    from trainer.engine import Trainer

    class BenchTrainer(Trainer):
        """The production Trainer with its loaders replaced (only ``create_loader``)."""

        def __init__(self, cfg, role, loader):
            self._synthetic_loader = loader
            super().__init__(cfg, role)

        def create_loader(self, train: bool):
            return self._synthetic_loader

    return BenchTrainer


def make_batches(s: StepSettings, device: torch.device, count: int = 4) -> list:
    """``count`` distinct device-resident batches with a teacher view, valid
    (index, view id) pairs for the synthetic cache and the view contract's boxes."""
    from pipelines.batch import Batch
    from pipelines.views import ViewConfig, view_params

    g = torch.Generator().manual_seed(s.seed)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    views = ViewConfig(seed=s.seed, num_views=s.num_views)
    out = []
    for _ in range(count):
        b = s.batch_size
        idx = torch.randint(0, s.num_samples, (b,), generator=g)
        vid = torch.randint(0, s.num_views, (b,), generator=g)
        boxes, flips = view_params(views, idx.numpy(), vid.numpy())

        def img(res):
            return torch.randn(b, 3, res, res, generator=g).to(device).contiguous(memory_format=fmt)

        out.append(Batch(student=img(s.student_resolution), teacher=img(s.teacher_resolution),
                         labels=torch.randint(0, s.num_classes, (b,), generator=g).to(device),
                         indices=idx.to(device), view_ids=vid.to(device),
                         boxes=torch.from_numpy(boxes).to(device),
                         flips=torch.from_numpy(flips).to(device)))
    return out


def base_config(s: StepSettings, root: Path):
    from trainer.recipe import Config

    cfg = Config()
    cfg.run = replace(cfg.run, name="bench", out_dir=str(root), seed=s.seed, device=s.device,
                      amp=s.amp, compile=s.compile, progress=False)
    cfg.data = replace(cfg.data, batch_size=s.batch_size, teacher_resolution=s.teacher_resolution,
                       student_resolution=s.student_resolution, student_factor=0.0,
                       num_views=s.num_views, view_seed=s.seed,
                       channels_last=s.channels_last, num_workers=0)
    cfg.model = replace(cfg.model, teacher=s.teacher, student=s.student)
    cfg.distill = replace(cfg.distill, cache_dtype=s.cache_dtype,
                          teacher_checkpoint=str(root / "teacher.pt"))
    cfg.loss = replace(cfg.loss, ce=1.0, kd=1.0, temperature=4.0)
    return cfg


def write_synthetic_teacher_and_cache(s: StepSettings, cfg) -> None:
    """A randomly initialised teacher checkpoint and a cache of random logits
    keyed to it, through the trainer's own writers."""
    from trainer.checkpoint import save_checkpoint, weights_hash
    from trainer.data import cache_key
    from trainer.distill.logit_cache import fill_cache
    from trainer.distributed import setup as setup_distributed
    from trainer.run_settings import amp_dtype
    from trainer.models import create_model

    torch.manual_seed(s.seed)
    stem = cfg.model.teacher_low_res_stem
    sd = create_model(s.teacher, s.num_classes, low_res_stem=stem).state_dict()
    whash = weights_hash(sd)
    save_checkpoint(cfg.teacher_checkpoint, {"arch": s.teacher, "num_classes": s.num_classes,
                                             "low_res_stem": stem, "model": sd, "weights_hash": whash})
    fingerprint = SyntheticLoader(s, s.student_resolution).store.fingerprint
    rng = np.random.default_rng(s.seed)

    def view_batches(v):
        idx = np.arange(s.num_samples)
        yield idx, lambda: (3 * rng.standard_normal((s.num_samples, s.num_classes))).astype(np.float32)

    device = setup_distributed(cfg)  # where the Trainer will look the rows up
    key = cache_key(cfg, whash, fingerprint, device=device, amp=amp_dtype(cfg, device))
    fill_cache(cfg.cache_path, key, s.num_samples, s.num_classes, s.num_views, view_batches,
               dtype=s.cache_dtype)


def mode_config(cfg, mode: str):
    from pipelines.mixing import MixConfig

    if mode == "ce":
        return replace(cfg, distill=replace(cfg.distill, targets="none"),
                       loss=replace(cfg.loss, kd=0.0), run=replace(cfg.run, tag=mode))
    targets = "online" if mode == "kd_online" else "cached"
    mix = MixConfig(p_cutmix=1.0) if mode == "kd_cached_cutmix" else MixConfig()
    return replace(cfg, distill=replace(cfg.distill, targets=targets), mix=mix,
                   run=replace(cfg.run, tag=mode))
