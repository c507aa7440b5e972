"""Fold a fitted temperature into a model's classifier: ``logits / T`` at no
cost at inference.

A calibrated student keeps the temperature fitted on the validation split
inside its weights instead of beside them, so every consumer of the
checkpoint (``evaluate``, an export, a user's own inference code) gets the
calibrated probabilities without knowing about temperature scaling. Every
model of the registry ends in a linear classifier (``DistillModel.head``:
embedding -> logits), and ``(W x + b) / T = (W / T) x + b / T``. The fold is
checked on a random embedding, so an architecture whose head is not that
linear layer is refused instead of silently mis-scaled.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dataset_tools.errors import CqkdError


def _classifier(model: nn.Module, num_classes: int) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not linears:
        raise CqkdError(f"{type(model).__name__}: no linear classifier with {num_classes} outputs to fold "
                        f"the temperature into; set distill.calibrate_student=false")
    return linears[-1]


@torch.no_grad()
def fold_temperature(model: nn.Module, temperature: float, num_classes: int) -> None:
    """Divide ``model``'s logits by ``temperature`` by scaling its final
    linear layer in place (see module docstring)."""
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    linear = _classifier(model, num_classes)
    was_training = model.training
    model.eval()
    emb = torch.randn(4, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
    before = model.head(emb) if hasattr(model, "head") else linear(emb)
    linear.weight.div_(t)
    if linear.bias is not None:
        linear.bias.div_(t)
    after = model.head(emb) if hasattr(model, "head") else linear(emb)
    model.train(was_training)
    if not torch.allclose(after, before / t, rtol=1e-4, atol=1e-5):
        linear.weight.mul_(t)  # undo: the head is not this linear layer alone
        if linear.bias is not None:
            linear.bias.mul_(t)
        raise CqkdError(f"{type(model).__name__}: its classifier is not a final linear layer, so the "
                        f"temperature cannot be folded into it; set distill.calibrate_student=false")
