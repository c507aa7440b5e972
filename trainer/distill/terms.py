"""The loss-term registry: one module per term, each registering itself here.

A term is an ``nn.Module`` built as ``Term(loss_cfg, dims)`` whose
``forward(LossInputs)`` returns its unweighted value; ``needs`` names the
optional inputs it requires, so a missing one fails with the term's name
instead of deep inside it. Its weight is ``loss.<name>`` in the config (a
term with weight 0 is never built). A new loss is one module here plus its
fields in :class:`~trainer.distill.loss_config.LossConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

TERMS: Dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in TERMS:
            raise ValueError(f"loss term {name!r} is registered twice")
        cls.name = name
        TERMS[name] = cls
        return cls
    return add


@dataclass
class LossInputs:
    """Everything a term may read. ``target_probs`` is the (mixed) label
    distribution or hard labels; ``teacher_probs`` the teacher's distribution
    at its temperature (mixed like the batch); ``teacher_emb`` the teacher's
    embedding; ``indices`` the dataset sample indices."""

    student_logits: torch.Tensor
    student_emb: torch.Tensor
    target_probs: torch.Tensor
    teacher_probs: Optional[torch.Tensor] = None
    teacher_emb: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
