"""torchvision ImageNet architectures (randomly initialised; nothing is
downloaded) wrapped in the :class:`DistillModel` interface.

``low_res_stem=True`` adapts the stem to 16-64 px inputs by the rule in
:mod:`trainer.models.stems` (ResNets: one 3x3 stride-1 conv and no max-pool,
32 px -> 4x4 final map instead of 1x1; MobileNetV3: the first conv at
stride 1, 32 px -> 2x2).

Embedding = globally pooled backbone features before ``classifier``/``fc``
(ResNet-18: 512, ResNet-50: 2048, MobileNetV3 small/large: 576/960). For
MobileNetV3 that is before its 2-layer classifier MLP, so the embedding is
not touched by the classifier's dropout.
"""
from __future__ import annotations

import torch
import torchvision.models as tvm

from trainer.models.base import DistillModel
from trainer.models.registry import register_model
from trainer.models.stems import apply_low_res_stem


class TorchvisionResNet(DistillModel):
    def __init__(self, net: tvm.ResNet, low_res_stem: bool = False):
        super().__init__()
        if low_res_stem:
            apply_low_res_stem(net, type(net).__name__)
        self.net = net
        self.feature_dim = net.fc.in_features

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net.fc(emb)


class TorchvisionMobileNetV3(DistillModel):
    def __init__(self, net: tvm.MobileNetV3, low_res_stem: bool = False):
        super().__init__()
        if low_res_stem:
            apply_low_res_stem(net, type(net).__name__)
        self.net = net
        self.feature_dim = net.classifier[0].in_features

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(emb)


@register_model("imagenet")
def resnet18(num_classes: int = 1000, low_res_stem: bool = False) -> TorchvisionResNet:
    return TorchvisionResNet(tvm.resnet18(weights=None, num_classes=num_classes), low_res_stem)


@register_model("imagenet")
def resnet50(num_classes: int = 1000, low_res_stem: bool = False) -> TorchvisionResNet:
    return TorchvisionResNet(tvm.resnet50(weights=None, num_classes=num_classes), low_res_stem)


@register_model("imagenet")
def mobilenet_v3_small(num_classes: int = 1000, low_res_stem: bool = False) -> TorchvisionMobileNetV3:
    return TorchvisionMobileNetV3(tvm.mobilenet_v3_small(weights=None, num_classes=num_classes),
                                  low_res_stem)


@register_model("imagenet")
def mobilenet_v3_large(num_classes: int = 1000, low_res_stem: bool = False) -> TorchvisionMobileNetV3:
    return TorchvisionMobileNetV3(tvm.mobilenet_v3_large(weights=None, num_classes=num_classes),
                                  low_res_stem)
