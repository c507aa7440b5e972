"""The declared config sections of a run (YAML files in ``configs/``).

``python -m trainer JOB --config configs/cifar100.yaml optim.lr=0.1 ...``
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.mixing import MixConfig
from pipelines.views import ViewConfig
from trainer.distill.loss_config import KD_OBJECTIVES, LossConfig


def _choice(key: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(map(str, valid))}")


@dataclass
class RunSection:
    name: str = "cifar100"  # runs/<name>/ holds teacher, cache and students
    tag: str = "student"  # sub-folder of one distillation run (e.g. kd, kd_cutmix)
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # bitwise-reproducible CPU runs (resume equality)
    checkpoint_every: int = 0  # steps between checkpoints (0: end of each epoch only)
    log_every: int = 50  # steps between progress-bar/metric syncs
    resume: bool = False
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    progress: bool = True

    def __post_init__(self):
        _choice("run.amp", self.amp, ("auto", "off", "bf16", "fp16"))

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class DataSection:
    train_store: str = "stores/cifar100/train"
    # held out from the training data (convert --val-fraction): everything fitted
    # or chosen (temperature scaling, the KD temperature, the sweep) uses it
    val_store: str = "stores/cifar100/val"
    test_store: str = "stores/cifar100/test"  # read only by evaluate and the reports
    backend: str = "reference"  # reference | ffcv | dali
    batch_size: int = 128
    eval_batch_size: int = 500
    num_workers: int = 2
    teacher_resolution: int = 32  # the teacher sees full-resolution views
    student_resolution: int = 16  # the student's low resolution (absolute size)
    student_factor: float = 0.0  # > 0: student_resolution = teacher_resolution * factor
    lowres: bool = False  # read the student view from the low-res companion store
    scale: tuple[float, float] = ViewConfig.scale  # view defaults: pipelines/views.py
    ratio: tuple[float, float] = ViewConfig.ratio
    flip: bool = ViewConfig.flip
    num_views: int = 4  # K replayable views (cache rows per sample); 0 = fresh crops
    view_seed: int = 0  # seeds the view contract and the epoch order; run.seed seeds
    # model init and mixing, so student seeds can share one teacher-logit cache
    channels_last: bool = False

    @property
    def student_size(self) -> int:
        if self.student_factor > 0:
            return max(8, round(self.teacher_resolution * self.student_factor))
        return self.student_resolution


@dataclass
class ModelSection:
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    # torchvision ImageNet models only (CIFAR models are low-resolution by design):
    # a 3x3 stride-1 stem without max-pool, for inputs of a few dozen pixels
    teacher_low_res_stem: bool = False
    student_low_res_stem: bool = True


@dataclass
class OptimSection:
    epochs: int = 240
    teacher_epochs: int = 0  # epochs of the teacher job (0: same as epochs)
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step
    milestones: tuple[float, ...] = (0.625, 0.75, 0.875)  # fractions of training (step)
    gamma: float = 0.1
    warmup_epochs: float = 0.0

    def __post_init__(self):
        _choice("optim.schedule", self.schedule, ("cosine", "step"))


@dataclass
class DistillSection:
    targets: str = "cached"  # cached (logit cache) | online (teacher runs) | none (supervised)
    cache_dtype: str = "float16"
    temperature_from_calibration: bool = False  # use the calibrated T as the KD temperature
    # the calibrated teacher: its logits divided by the temperature fitted on the
    # validation split (python -m trainer calibrate) before smoothing at loss.temperature
    calibrated_teacher: bool = False
    cached_mix: str = "probs"  # cached targets under mixing: mix probabilities | logits
    # teacher-cache format (trainer/distill/teacher_cache.py): dense (every logit,
    # loaded whole onto the device) | topk (top-k logits + tail summary, memory-mapped)
    # | auto: dense while the dense logits take at most cache_dense_max_gb
    cache_format: str = "auto"
    cache_topk: int = 32  # logits kept per row by the topk format
    cache_dense_max_gb: float = 4.0
    # teacher embeddings for RKD/CRD: auto (dense: stored; topk: only if loss.rkd/crd > 0) | always | never
    cache_features: str = "auto"

    def __post_init__(self):
        _choice("distill.targets", self.targets, ("cached", "online", "none"))
        _choice("distill.cache_dtype", self.cache_dtype, ("float16", "float32"))
        _choice("distill.cached_mix", self.cached_mix, ("probs", "logits"))
        _choice("distill.cache_format", self.cache_format, ("auto", "dense", "topk"))
        _choice("distill.cache_features", self.cache_features, ("auto", "always", "never"))
        if not 1 <= self.cache_topk < 2 ** 16:
            raise ValueError(f"distill.cache_topk={self.cache_topk} must be in [1, 65535] (class ids "
                             f"are stored as uint16)")
        if self.cache_dense_max_gb < 0:
            raise ValueError(f"distill.cache_dense_max_gb={self.cache_dense_max_gb} must be >= 0")
    teacher_checkpoint: str = ""  # default: runs/<name>/teacher/final.pt


@dataclass
class SweepSection:
    """``python -m trainer sweep`` (and ``loss.temperature: auto``): short
    students from the cache over temperatures x objectives x calibrated
    teacher; the choice is the lowest validation ECE among the runs whose
    validation top-1 is within ``top1_tolerance`` of the best run's."""

    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    objectives: tuple[str, ...] = ("hinton", "teacher_smoothing")
    calibrated: tuple[bool, ...] = (False, True)
    epochs: int = 0  # epochs of each sweep student (0: optim.epochs)
    top1_tolerance: float = 0.01

    def __post_init__(self):
        for o in self.objectives:
            _choice("sweep.objectives", o, KD_OBJECTIVES)
        if self.top1_tolerance < 0 or self.epochs < 0:
            raise ValueError("sweep.top1_tolerance and sweep.epochs must be >= 0")


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
