"""``DistillLoss``: the weighted sum of the registered loss terms.

Terms (:mod:`trainer.distill.terms`): cross-entropy on (mixed) soft targets
(``ce``), KD (Hinton et al. 2015; ``kd``), RKD (Park et al. 2019; ``rkd``),
CRD (Tian et al. 2020; ``crd``). Everything is batched and device-agnostic.
Losses are computed in float32 whatever the autocast dtype: KD/CE go through
log-softmax, RKD through cancellation-prone distance algebra, CRD through
``exp(s / 0.07)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

# importing the term modules registers them
from trainer.distill import ce, crd, kd, rkd  # noqa: F401
from trainer.distill.loss_config import LossConfig
from trainer.distill.terms import TERMS, LossInputs


class DistillLoss(nn.Module):
    """``sum_t weight_t * term_t`` over the terms whose weight (``loss.<t>``)
    is > 0. Holds the terms' parameters and buffers (CRD heads and memory
    banks: pass ``student_dim``, ``teacher_dim`` and ``num_samples``), so its
    parameters go to the optimizer and its ``state_dict`` to checkpoints."""

    def __init__(self, cfg: LossConfig, student_dim: Optional[int] = None,
                 teacher_dim: Optional[int] = None, num_samples: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        dims = {"student_dim": student_dim, "teacher_dim": teacher_dim, "num_samples": num_samples}
        self.weights = {name: float(getattr(cfg, name)) for name in TERMS if getattr(cfg, name) > 0}
        self.terms = nn.ModuleDict({name: TERMS[name](cfg, dims) for name in self.weights})

    @property
    def crd(self):
        """The CRD loss module (heads + memory banks), or None."""
        term = self.terms["crd"] if "crd" in self.terms else None
        return term.crd if term is not None else None

    def forward(self, student_logits: torch.Tensor, student_emb: torch.Tensor,
                target_probs: torch.Tensor, teacher_probs_t: Optional[torch.Tensor] = None,
                teacher_emb: Optional[torch.Tensor] = None,
                indices: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns ``(total, {term: detached unweighted value})``."""
        x = LossInputs(student_logits, student_emb, target_probs, teacher_probs_t, teacher_emb, indices)
        parts: Dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            missing = [n for n in sorted(term.needs) if getattr(x, n) is None]
            if missing:
                raise ValueError(f"loss.{name} > 0 but the batch has no {', '.join(missing)} "
                                 f"(distill.targets=none gives no teacher)")
            parts[name] = term(x)
        total = None  # the weighted sum in as few ops as possible: one add(alpha=w) per further term
        for k, v in parts.items():
            w = self.weights[k]
            if total is None:
                total = v if w == 1.0 else v * w
            else:
                total = torch.add(total, v, alpha=w)
        return total, {k: v.detach() for k, v in parts.items()}
