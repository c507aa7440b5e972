"""The interface every model in the registry implements.

The trainer needs logits for CE/KD and the pooled embedding for RKD/CRD from
one forward pass, so each model splits into ``embed`` (backbone + global
pooling, ``[B, feature_dim]``) and ``head`` (the final linear layer).
"""
from __future__ import annotations

import abc

from typing import Tuple, Union

import torch
from torch import nn


class DistillModel(nn.Module, abc.ABC):
    """Subclasses set ``self.feature_dim`` and implement ``embed`` and ``head``."""

    feature_dim: int

    @abc.abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + global pooling: ``[B, feature_dim]``."""

    @abc.abstractmethod
    def head(self, emb: torch.Tensor) -> torch.Tensor:
        """The classifier: embedding -> logits."""

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [B, feature_dim], logits [B, num_classes])``."""
        emb = self.embed(x)
        return emb, self.head(emb)

    def forward(self, x: torch.Tensor,
                return_features: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        emb, logits = self.forward_features(x)
        return (emb, logits) if return_features else logits


def init_conv_bn_linear(module: nn.Module, linear_std: float | None = None) -> None:
    """He-normal (fan_out) convs, unit/zero BN, zero linear bias: the
    initialisation the RepDistiller CIFAR models use."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
