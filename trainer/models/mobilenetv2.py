"""MobileNetV2 student of the CRD paper: HobbitLong/RepDistiller
``models/mobilenetv2.py`` ``mobile_half`` (expansion 6, width 0.5), which the
paper and its tables call "MobileNetV2".

Written here rather than taken from torchvision because the reference block
differs from ``torchvision.models.mobilenetv2.InvertedResidual``: it keeps the
1x1 expansion conv even for expansion 1 and uses ReLU instead of ReLU6, and
its stem has stride 2 with the first two stages at stride 1. Those details set
the published parameter count, so they are reproduced.

Difference from the reference: adaptive average pooling (the reference uses a
fixed pool sized for 32 px inputs; 32 px -> 2x2 final map either way).
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.models.base import DistillModel, init_conv_bn_linear
from trainer.models.registry import register_model


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; identity shortcut
    when stride 1 and the width is unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            conv_bn_relu(c_in, hidden, 1),
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(DistillModel):
    def __init__(self, expand: int = 6, width_mult: float = 0.5, num_classes: int = 100):
        super().__init__()
        # (expansion, channels, repeats, first stride)
        setting = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
                   (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        c_in = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, c_in, 3, stride=2)
        stages = []
        for t, c, n, s in setting:
            c_out = int(c * width_mult)
            stages.append(nn.Sequential(*[InvertedResidual(c_in if j == 0 else c_out, c_out,
                                                           s if j == 0 else 1, t)
                                          for j in range(n)]))
            c_in = c_out
        self.blocks = nn.Sequential(*stages)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(c_in, last, 1)
        self.classifier = nn.Linear(last, num_classes)
        self.feature_dim = last
        init_conv_bn_linear(self, linear_std=0.01)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.blocks(self.conv1(x)))

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


@register_model("cifar", aliases=("mobile_half",))
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: the CRD paper's MobileNetV2 student."""
    return MobileNetV2(expand=6, width_mult=0.5, num_classes=num_classes)
