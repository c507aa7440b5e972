"""VGG with BatchNorm for CIFAR as in the CRD paper (HobbitLong/RepDistiller
``models/vgg.py``; its registry maps ``vgg8``/``vgg13`` to the ``_bn``
variants): five conv blocks, max-pool between the first four, no FC stack,
global average pooling and one linear classifier on 512 channels.

The fourth pool is applied only for inputs of >= 64 px (the reference applies
it exactly at 64 px), so a 32 px input reaches the last block at 4x4.
Differences from the reference: a trailing ReLU is folded into each block
(the reference applies it in ``forward``), and the 64 px test is ">=".
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trainer.models.base import DistillModel, init_conv_bn_linear
from trainer.models.registry import register_model

# conv widths per block: the reference's configurations "S" (vgg8) and "B" (vgg13)
CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def conv_block(c_in: int, widths: Sequence[int]) -> nn.Sequential:
    layers = []
    for c_out in widths:
        # bias=True with BN, as in the reference (it counts towards the parameters)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers)


class VGG(DistillModel):
    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        blocks, c_in = [], 3
        for widths in cfg:
            blocks.append(conv_block(c_in, widths))
            c_in = widths[-1]
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.classifier = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in
        init_conv_bn_linear(self, linear_std=0.01)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        pool_before_last = x.shape[-2] >= 64
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < 3 or (i == 3 and pool_before_last):
                x = self.pool(x)
        return x

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


@register_model("cifar")
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CFGS["vgg8"], num_classes)


@register_model("cifar")
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CFGS["vgg13"], num_classes)
