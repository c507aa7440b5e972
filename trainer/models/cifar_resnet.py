"""CIFAR ResNets as used in the CRD paper (Tian et al. 2020) and its code,
HobbitLong/RepDistiller ``models/resnet.py``: a 3x3 stem, three stages of
BasicBlocks (strides 1, 2, 2), global average pooling, one linear layer.
Depth = 6n + 2. ``resnet8x4``/``resnet32x4`` use 4x wider stages.

Difference from the reference: the final ``AvgPool2d(8)`` is an adaptive
average pool so any input size >= 8 px works (identical output at 32 px).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trainer.models.base import DistillModel, init_conv_bn_linear
from trainer.models.registry import register_model


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(DistillModel):
    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        stem, *stage_widths = widths
        self.conv1 = conv3x3(3, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        c_in = stem
        stages = []
        for c_out, stride in zip(stage_widths, (1, 2, 2)):
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in
        init_conv_bn_linear(self)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(emb)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("cifar")
def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


@register_model("cifar")
def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


@register_model("cifar")
def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


@register_model("cifar")
def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


@register_model("cifar")
def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


@register_model("cifar")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


@register_model("cifar")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
