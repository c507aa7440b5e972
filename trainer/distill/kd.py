"""Logit distillation against the teacher's distribution (Hinton et al. 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.distill.terms import LossInputs, register


def teacher_probs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher distribution softened at ``temperature``: the KD target before
    it is mixed across samples."""
    return F.softmax(teacher_logits.float() / temperature, dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_probs_t: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || softmax(z_student / T))``, averaged over the batch.

    Takes probabilities, not teacher logits, because under mixup/CutMix the
    target is a mixture of two teachers' distributions, which no logit vector
    softened at T represents. The T^2 factor keeps the gradient scale (which
    is ``T * (q - p) / B``) roughly independent of T (Hinton et al. 2015)."""
    if teacher_probs_t.shape != student_logits.shape:
        raise ValueError(f"teacher probabilities {tuple(teacher_probs_t.shape)} must match "
                         f"student logits {tuple(student_logits.shape)}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    # kl_div treats 0 * log 0 as 0, so one-hot-like teacher targets are fine
    return F.kl_div(log_q, teacher_probs_t.float(), reduction="batchmean") * temperature ** 2


@register("kd")
class KDTerm(torch.nn.Module):
    """``loss.kd``: KL from the teacher's distribution (softened at the teacher
    temperature and, under mixing, mixed by :mod:`trainer.distill.targets`) to
    the student's. ``loss.kd_objective`` sets the student's side:

    * ``hinton``: the student at T as well, times T^2 (Hinton et al. 2015);
      large T drives logit matching, so the student inherits the teacher's
      sharpness;
    * ``teacher_smoothing``: the student at T = 1 against the smoothed
      teacher, ``KL(softmax(z_t / T) || softmax(z_s))``; large T hands the
      student a higher-entropy target.
    """

    needs = frozenset({"teacher_probs"})

    def __init__(self, cfg, dims):
        super().__init__()
        if cfg.temperature == "auto":
            raise ValueError("loss.temperature=auto must be resolved (by the sweep) before "
                             "the loss is built")
        self.student_temperature = float(cfg.temperature) if cfg.kd_objective == "hinton" else 1.0

    def forward(self, x: LossInputs) -> torch.Tensor:
        return kd_loss(x.student_logits, x.teacher_probs, self.student_temperature)
