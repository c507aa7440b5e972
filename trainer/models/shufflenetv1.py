"""ShuffleNetV1 (Zhang et al. 2018) student of the CRD paper, following
HobbitLong/RepDistiller ``models/ShuffleNetv1.py`` ``ShuffleV1``: a 1x1
stride-1 stem to 24 channels, three stages (240, 480, 960 channels; 4, 8, 4
units; 3 groups), each stage opening with a stride-2 unit whose output is
concatenated with an average-pooled shortcut.

Reference quirks kept because they set the parameter count: the first 1x1
group conv of a unit is ungrouped when its input has 24 channels, and the
stem is a 1x1 conv. Difference: adaptive average pooling instead of
``avg_pool2d(4)`` (identical at 32 px, where the final map is 4x4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.base import DistillModel
from trainer.models.registry import register_model


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        mid = c_out // 4
        g1 = 1 if c_in == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle = nn.ChannelShuffle(g1)  # torch's op, same permutation as the reference
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(DistillModel):
    def __init__(self, out_planes: Sequence[int] = (240, 480, 960),
                 num_blocks: Sequence[int] = (4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c_in, stages = 24, []
        for c_out, n in zip(out_planes, num_blocks):
            # the stride-2 opener produces c_out - c_in channels; the pooled input fills the rest
            units = [ShuffleUnit(c_in, c_out - c_in, 2, groups)]
            units += [ShuffleUnit(c_out, c_out, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb)


@register_model("cifar", aliases=("shufflev1",))
def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)
