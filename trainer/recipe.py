"""The declared config sections of a run (YAML files in ``configs/``).

``python -m trainer JOB --config configs/cifar100.yaml optim.lr=0.1 ...``

Every key is declared with :func:`dataset_tools.settings.setting` (default,
one line of help, valid values), which ``--help-config`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataset_tools.settings import ConfigError, check_choices, setting
from pipelines.loader import BACKENDS
from pipelines.mixing import MixConfig
from pipelines.views import ViewConfig
from trainer.distill.loss_config import KD_OBJECTIVES, LossConfig


@dataclass
class RunSection:
    """Where a run writes and how it runs."""

    name: str = setting("cifar100", "runs/<out_dir>/<name>/ holds the teacher, its cache and the students")
    tag: str = setting("student", "sub-folder of one distillation run (e.g. kd, kd_cutmix)")
    out_dir: str = setting("runs", "folder of all runs")
    seed: int = setting(0, "seeds model init and mixing (data.view_seed seeds the views)")
    device: str = setting("auto", "auto (CUDA if present, else CPU) | cpu | cuda | cuda:N")
    amp: str = setting("auto", "mixed precision; auto: bf16 on CUDA, off on CPU",
                       choices=("auto", "off", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")
    deterministic: bool = setting(False, "bitwise-reproducible CPU runs (resume equality)")
    checkpoint_every: int = setting(0, "steps between checkpoints (0: end of each epoch only)")
    log_every: int = setting(50, "steps between progress-bar/metric syncs")
    val_every: int = setting(1, "validate after every N-th epoch and after the last (0: the last only)")
    resume: bool = setting(False, "continue from <run folder>/last.pt; refused if the recipe changed")
    max_steps: int = setting(0, "stop after this many optimizer steps, resumable (0: no limit)")
    progress: bool = setting(True, "progress bar on a terminal, one line per epoch or 10 % in logs")

    def __post_init__(self):
        check_choices(self, "run")
        if self.val_every < 0:
            raise ConfigError(f"run.val_every must be >= 0, got {self.val_every}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"run.device={self.device!r} is not a device: auto, cpu, cuda "
                                  f"or cuda:N") from None

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class DataSection:
    """Stores, loader backend, resolutions and the replayable views."""

    train_store: str = setting("stores/cifar100/train", "the training split (a converted store)")
    val_store: str = setting("stores/cifar100/val", "held out from the training data (convert "
                             "--val-fraction): everything fitted or chosen uses it")
    test_store: str = setting("stores/cifar100/test", "read only by evaluate and the reports")
    backend: str = setting("memory", "loader backend: memory (the decoded split held on the training "
                           "device: small datasets, the fastest) | ffcv | dali (stream from disk: large "
                           "datasets) | reference (the oracle)", choices=tuple(BACKENDS))
    batch_size: int = setting(128, "training batch size (per process)")
    eval_batch_size: int = setting(500, "batch size of validation, evaluation and the cache fill")
    num_workers: int = setting(2, "loader worker processes / threads")
    teacher_resolution: int = setting(32, "the teacher's full-resolution view (pixels)")
    student_resolution: int = setting(16, "the student's low resolution (pixels)")
    student_factor: float = setting(0.0, "> 0: student resolution = teacher_resolution x factor")
    lowres: bool = setting(False, "read the student view from the low-res companion store")
    scale: tuple[float, float] = setting(ViewConfig.scale, "random-resized-crop area range")
    ratio: tuple[float, float] = setting(ViewConfig.ratio, "random-resized-crop aspect ratio range")
    flip: bool = setting(ViewConfig.flip, "random horizontal flip")
    num_views: int = setting(4, "K replayable views (cache rows per sample); 0 = fresh crops")
    view_seed: int = setting(0, "seeds the views and the epoch order, so student seeds share a cache")
    channels_last: bool = setting(False, "channels-last memory format")

    def __post_init__(self):
        check_choices(self, "data")

    @property
    def student_size(self) -> int:
        if self.student_factor > 0:
            return max(8, round(self.teacher_resolution * self.student_factor))
        return self.student_resolution


@dataclass
class ModelSection:
    """Teacher and student architectures, and an imported teacher."""

    teacher: str = setting("resnet32x4", "a project model (resnet32x4, wrn_40_2, ...), torchvision/<name> "
                           "or timm/<name> (python -m trainer.models --source all lists them)")
    student: str = setting("resnet8x4", "the student's architecture (same names as model.teacher)")
    teacher_low_res_stem: bool = setting(False, "3x3 stride-1 stem without max-pool for the teacher "
                                         "(inputs of a few dozen pixels; trainer/models/stems.py)")
    student_low_res_stem: bool = setting(True, "the same for the student; CIFAR models ignore it")
    teacher_weights: str = setting("", "import the teacher: a state dict, safetensors file or timm "
                                   "checkpoint of model.teacher; the teacher job fine-tunes from it")


@dataclass
class OptimSection:
    """SGD with momentum and the learning-rate schedule."""

    epochs: int = setting(240, "epochs of a student (and of the teacher unless teacher_epochs)")
    teacher_epochs: int = setting(0, "epochs of the teacher job (0: same as epochs)")
    lr: float = setting(0.05, "peak learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(True, "Nesterov momentum")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    schedule: str = setting("cosine", "learning-rate schedule", choices=("cosine", "step"))
    milestones: tuple[float, ...] = setting((0.625, 0.75, 0.875), "step schedule: where lr drops, "
                                            "as fractions of training")
    gamma: float = setting(0.1, "step schedule: lr factor at each milestone")
    warmup_epochs: float = setting(0.0, "linear warm-up epochs")

    def __post_init__(self):
        check_choices(self, "optim")


@dataclass
class DistillSection:
    """Where the student's teacher targets come from, and the teacher cache."""

    targets: str = setting("cached", "cached (logit cache) | online (the teacher runs) | none "
                           "(supervised)", choices=("cached", "online", "none"))
    cache_dtype: str = setting("float16", "storage type of the teacher cache",
                               choices=("float16", "float32"))
    temperature_from_calibration: bool = setting(False, "use the calibrated T as the KD temperature")
    calibrated_teacher: bool = setting(False, "divide the teacher's logits by the T fitted on val "
                                       "(calibrate) before smoothing at loss.temperature")
    cached_mix: str = setting("auto", "cached targets under mixing: auto (CutMix composed from the "
                              "cache's spatial maps when it has them, else mixed logits) | spatial "
                              "(requires the maps) | logits | probs",
                              choices=("auto", "spatial", "logits", "probs"))
    cache_format: str = setting("auto", "teacher-cache format: dense (every logit, loaded whole onto "
                                "the device) | topk (top-k logits + tail summary, memory-mapped) | "
                                "auto (dense while it takes at most cache_dense_max_gb)",
                                choices=("auto", "dense", "topk"))
    cache_topk: int = setting(32, "logits kept per row by the topk format")
    cache_dense_max_gb: float = setting(4.0, "auto: the largest dense cache (GB of logits)")
    cache_features: str = setting("auto", "teacher embeddings for RKD/CRD: auto (dense: stored; topk: "
                                  "only if loss.rkd/crd > 0) | always | never",
                                  choices=("auto", "always", "never"))
    cache_spatial: str = setting("auto", "store the teacher's last feature map per view, area-pooled, for "
                                 "composing CutMix targets: auto (dense cache, teacher with a map, maps "
                                 "<= cache_dense_max_gb) | always | never",
                                 choices=("auto", "always", "never"))
    cache_spatial_grid: int = setting(4, "cells per side of the stored spatial maps")
    calibrate_student: bool = setting(False, "after training, fit the student's temperature on the "
                                      "validation split and fold it into its classifier (a calibrated "
                                      "student at no inference cost)")
    teacher_checkpoint: str = setting("", "the teacher (default: runs/<name>/teacher/final.pt)")

    def __post_init__(self):
        check_choices(self, "distill")
        if not 1 <= self.cache_topk < 2 ** 16:
            raise ConfigError(f"distill.cache_topk={self.cache_topk} must be in [1, 65535] (class ids "
                              f"are stored as uint16)")
        if self.cache_dense_max_gb < 0:
            raise ConfigError(f"distill.cache_dense_max_gb={self.cache_dense_max_gb} must be >= 0")
        if not 1 <= self.cache_spatial_grid <= 32:
            raise ConfigError(f"distill.cache_spatial_grid={self.cache_spatial_grid} must be in [1, 32] "
                              f"(cells per side of the stored teacher maps)")


@dataclass
class SweepSection:
    """The temperature sweep (``python -m trainer sweep``, ``loss.temperature: auto``).

    Short students from the cache over temperatures x objectives x calibrated
    teacher, refined by bisection; the choice is the lowest validation ECE
    among the runs whose validation top-1 is close to the best run's
    (trainer/sweep.py states the rule)."""

    temperatures: tuple[float, ...] = setting((1.0, 2.0, 4.0, 8.0), "KD temperatures to try")
    objectives: tuple[str, ...] = setting(("hinton", "teacher_smoothing"), "KD objectives to try",
                                          choices=KD_OBJECTIVES)
    calibrated: tuple[bool, ...] = setting((False, True), "calibrated teacher off / on to try")
    epochs: int = setting(0, "epochs of each sweep student (0: optim.epochs)")
    top1_tolerance: float = setting(0.01, "runs within this of the best val top-1 compete on ECE")
    top1_standard_errors: float = setting(1.0, "... or within this many binomial standard errors of the "
                                          "best val top-1, whichever is larger (one-standard-error rule)")
    refine: int = setting(2, "bisection steps per series where val over-confidence changes sign "
                          "between two temperatures (0: the grid only)")

    def __post_init__(self):
        check_choices(self, "sweep")
        if min(self.top1_tolerance, self.top1_standard_errors, self.epochs, self.refine) < 0:
            raise ValueError("sweep.top1_tolerance, top1_standard_errors, epochs and refine must be >= 0")


# The keys that change neither a run's weights nor its metrics: how a run is
# shown, logged, checkpointed and resumed, where its folder lies, and how fast
# its data is read (the teacher cache's key leaves them out too). A resumed run
# may differ from its first start in these (trainer/run_record.py); the
# sweep's fingerprint leaves them out (trainer/sweep.py).
NON_RESULT_KEYS = ("run.out_dir", "run.progress", "run.log_every", "run.checkpoint_every",
                   "run.resume", "run.val_every", "data.num_workers", "data.eval_batch_size")


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mix: MixConfig = field(default_factory=MixConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    sweep: SweepSection = field(default_factory=SweepSection)

    # --- where each job's outputs live -------------------------------------
    @property
    def teacher_dir(self) -> Path:
        return self.run.root / "teacher"

    @property
    def teacher_checkpoint(self) -> Path:
        return Path(self.distill.teacher_checkpoint) if self.distill.teacher_checkpoint \
            else self.teacher_dir / "final.pt"

    @property
    def temperature_file(self) -> Path:
        return self.teacher_dir / "temperature.json"

    def cache_file(self, fmt: str) -> Path:
        """The teacher cache of format ``fmt`` (``dense``: an HDF5 file; ``topk``:
        a directory); ``trainer.data.teacher_cache_path`` resolves ``auto``."""
        stem = f"logits_K{self.data.num_views}_r{self.data.teacher_resolution}"
        if fmt == "dense":
            return self.run.root / f"{stem}.h5"
        if fmt == "topk":
            return self.run.root / f"{stem}_top{self.distill.cache_topk}.topk"
        raise ValueError(f"cache format must be dense or topk, got {fmt!r}")

    @property
    def cache_path(self) -> Path:
        """The dense cache file (what ``cache_format: auto`` resolves to on small data)."""
        return self.cache_file("dense")

    @property
    def student_dir(self) -> Path:
        return self.run.root / self.run.tag

    @property
    def sweep_dir(self) -> Path:
        return self.run.root / "sweep"

    @property
    def sweep_file(self) -> Path:
        return self.sweep_dir / "sweep.json"
