"""Cross-entropy against hard labels or (mixed) soft targets: the supervised term."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.distill.terms import LossInputs, register


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against hard labels ``long [B]`` or target
    distributions ``[B, C]`` (one-hot, mixed with mixup/CutMix weights, ...)."""
    if targets.dtype.is_floating_point and targets.shape != logits.shape:
        raise ValueError(f"soft targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
    if targets.dtype.is_floating_point:
        targets = targets.float()
    # F.cross_entropy takes class probabilities directly (torch >= 1.10)
    return F.cross_entropy(logits.float(), targets)


@register("ce")
class CETerm(torch.nn.Module):
    """``loss.ce``: cross-entropy against the batch's (mixed) label distribution."""

    needs = frozenset()

    def __init__(self, cfg, dims):
        super().__init__()

    def forward(self, x: LossInputs) -> torch.Tensor:
        return soft_cross_entropy(x.student_logits, x.target_probs)
