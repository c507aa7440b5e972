"""``loss.*``: the weight of each loss term (0 = not computed) and its settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from dataset_tools.settings import check_choices, setting

KD_OBJECTIVES = ("hinton", "teacher_smoothing")


@dataclass
class LossConfig:
    """Weights of the loss terms (0 = not computed) and their settings."""

    ce: float = setting(1.0, "weight of cross-entropy on the labels (mixed labels under mixing)")
    kd: float = setting(0.0, "weight of the KD term")
    rkd: float = setting(0.0, "weight of relational KD on the embeddings (Park et al. 2019)")
    crd: float = setting(0.0, "weight of contrastive representation distillation (Tian et al. 2020)")
    temperature: Union[float, str] = setting(4.0, "KD temperature T > 0, or auto: chosen on the "
                                             "validation split by the sweep (distill runs it if needed)")
    kd_objective: str = setting("hinton", "hinton: student and teacher at T, times T^2; "
                                "teacher_smoothing: the student at T = 1 against softmax(z_t / T)",
                                choices=KD_OBJECTIVES)
    rkd_distance_weight: float = setting(25.0, "RKD distance term (Park et al. 2019, Sec. 4)")
    rkd_angle_weight: float = setting(50.0, "RKD angle term (Park et al. 2019, Sec. 4)")
    crd_dim: int = setting(128, "CRD embedding size (Tian et al. 2020 / RepDistiller defaults)")
    crd_negatives: int = setting(4096, "CRD negatives per sample")
    crd_temperature: float = setting(0.07, "CRD softmax temperature")
    crd_momentum: float = setting(0.5, "CRD memory-bank momentum")

    def __post_init__(self):
        check_choices(self, "loss")
        for name in ("ce", "kd", "rkd", "crd", "rkd_distance_weight", "rkd_angle_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.ce == self.kd == self.rkd == self.crd == 0:
            raise ValueError("all loss weights (loss.ce/kd/rkd/crd) are 0: nothing to train")
        if self.temperature != "auto" and (isinstance(self.temperature, str) or self.temperature <= 0):
            raise ValueError(f"loss.temperature must be a number > 0 or 'auto', got {self.temperature!r}")
        if self.crd_temperature <= 0:
            raise ValueError("loss.crd_temperature must be > 0")
        if self.crd_dim < 1 or self.crd_negatives < 1:
            raise ValueError("loss.crd_dim and loss.crd_negatives must be >= 1")
        if not 0.0 <= self.crd_momentum < 1.0:
            raise ValueError(f"loss.crd_momentum must be in [0, 1), got {self.crd_momentum}")
