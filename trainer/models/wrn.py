"""Wide ResNets (Zagoruyko & Komodakis 2016) in the form the CRD paper uses
(HobbitLong/RepDistiller ``models/wrn.py``): pre-activation blocks, depth
6n + 4, widths (16, 16k, 32k, 64k), BN-ReLU before global pooling.

Difference from the reference: adaptive average pooling instead of
``avg_pool2d(8)`` so any input size >= 8 px works (same result at 32 px).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.base import DistillModel, init_conv_bn_linear
from trainer.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv x2. When the shape changes, the shortcut is a 1x1 conv
    applied to the *activated* input (as in the reference implementation)."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.drop_rate = drop_rate
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(DistillModel):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100,
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages, c_in = [], widths[0]
        for c_out, stride in zip(widths[1:], (1, 2, 2)):
            stages.append(nn.Sequential(*[
                PreActBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, drop_rate)
                for j in range(n)]))
            c_in = c_out
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in
        init_conv_bn_linear(self)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(emb)


@register_model("cifar")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


@register_model("cifar")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@register_model("cifar")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@register_model("cifar")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
