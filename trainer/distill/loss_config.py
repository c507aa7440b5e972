"""``loss.*``: the weight of each loss term (0 = not computed) and its settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

KD_OBJECTIVES = ("hinton", "teacher_smoothing")


@dataclass
class LossConfig:
    """Weights of the loss terms (0 = not computed) and their settings."""

    ce: float = 1.0
    kd: float = 0.0
    rkd: float = 0.0
    crd: float = 0.0
    # KD temperature T (> 0), or "auto": chosen on the validation split by the
    # sweep job (python -m trainer sweep), which distill runs first if needed
    temperature: Union[float, str] = 4.0
    # hinton: student and teacher both at T, times T^2 (Hinton et al. 2015);
    # teacher_smoothing: the student at T = 1 against softmax(z_teacher / T)
    kd_objective: str = "hinton"
    rkd_distance_weight: float = 25.0  # Park et al. 2019, Sec. 4 defaults
    rkd_angle_weight: float = 50.0
    crd_dim: int = 128  # Tian et al. 2020 / RepDistiller defaults from here on
    crd_negatives: int = 4096
    crd_temperature: float = 0.07
    crd_momentum: float = 0.5

    def __post_init__(self):
        for name in ("ce", "kd", "rkd", "crd", "rkd_distance_weight", "rkd_angle_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.ce == self.kd == self.rkd == self.crd == 0:
            raise ValueError("all loss weights (loss.ce/kd/rkd/crd) are 0: nothing to train")
        if self.temperature != "auto" and (isinstance(self.temperature, str) or self.temperature <= 0):
            raise ValueError(f"loss.temperature must be a number > 0 or 'auto', got {self.temperature!r}")
        if self.crd_temperature <= 0:
            raise ValueError("loss.crd_temperature must be > 0")
        if self.kd_objective not in KD_OBJECTIVES:
            raise ValueError(f"loss.kd_objective must be one of {KD_OBJECTIVES}, got {self.kd_objective!r}")
        if self.crd_dim < 1 or self.crd_negatives < 1:
            raise ValueError("loss.crd_dim and loss.crd_negatives must be >= 1")
        if not 0.0 <= self.crd_momentum < 1.0:
            raise ValueError(f"loss.crd_momentum must be in [0, 1), got {self.crd_momentum}")
