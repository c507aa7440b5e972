"""The low-resolution stem rule (``low_res_stem=True``), one place for every
model family that supports it.

ImageNet classifiers shrink the input 4x in their stem (a stride-2 conv and,
in ResNets, a stride-2 max-pool) before any residual stage, which leaves a
16-64 px input with a 1x1 or 2x2 map long before the last stage. The rule
keeps more of the map:

* **ResNet families** (torchvision ``ResNet``: resnet*, resnext*,
  wide_resnet*; timm ``ResNet``: resnet*, resnet*d, resnext*, seresnet*,
  ecaresnet*, ...): the 7x7 stride-2 conv + 3x3 stride-2 max-pool become one
  3x3 stride-1 conv (freshly initialised) and no pool -- the usual CIFAR
  variant. Deep-stem variants (timm ``resnet*d``: three 3x3 convs) keep their
  convs and get stride 1 in the first one. Total stride 32 -> 8.
* **Mobile families** (torchvision ``MobileNetV2``, ``MobileNetV3``,
  ``EfficientNet``; timm ``EfficientNet`` and ``MobileNetV3``: efficientnet*,
  mobilenetv2*, mobilenetv3*, mnasnet*, ...): the first conv's stride goes
  2 -> 1, every other layer (and so the parameter count) unchanged. Total
  stride 32 -> 16; removing more strides would multiply the cost of the
  expensive late stages for little gain at these sizes.

Any other architecture (ViTs and Swin, whose patch embedding fixes the input
grid; ConvNeXt, RegNet, DenseNet, VGG, ...) raises :class:`StemError` naming
the supported families: set ``model.*_low_res_stem: false`` for it. The
project's CIFAR models are low-resolution by design and ignore the flag.
"""
from __future__ import annotations

from torch import nn

from dataset_tools.errors import CqkdError

SUPPORTED = ("torchvision ResNet (resnet*, resnext*, wide_resnet*)",
             "torchvision MobileNetV2 / MobileNetV3 / EfficientNet",
             "timm ResNet (resnet*, resnet*d, resnext*, seresnet*, ...)",
             "timm EfficientNet / MobileNetV3 (efficientnet*, mobilenetv2*, mobilenetv3*, mnasnet*, ...)")


class StemError(CqkdError, ValueError):
    """``low_res_stem=True`` for an architecture the rule does not cover."""


def low_res_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 conv with ``conv``'s channels, He-initialised."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _resnet_stem(net: nn.Module, name: str) -> None:
    """torchvision and timm ResNets share the attribute names conv1 / maxpool."""
    if not isinstance(net.maxpool, (nn.MaxPool2d, nn.Identity)):
        raise StemError(f"{name}: its stem pool is a {type(net.maxpool).__name__} with weights, "
                        f"not a max-pool; the low-resolution stem rule does not cover it "
                        f"(set model.*_low_res_stem: false)")
    if isinstance(net.conv1, nn.Conv2d):
        net.conv1 = low_res_conv(net.conv1)
    else:  # timm deep stem: Sequential of 3x3 convs, the first one strided
        first = next(m for m in net.conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    net.maxpool = nn.Identity()


def _first_conv_stride_one(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


def apply_low_res_stem(net: nn.Module, name: str) -> None:
    """Apply the rule (module doc) to ``net`` in place; ``name`` is for errors.
    Raises :class:`StemError` for an architecture it does not cover."""
    import torchvision.models as tvm

    if isinstance(net, tvm.ResNet):
        return _resnet_stem(net, name)
    if isinstance(net, (tvm.MobileNetV2, tvm.MobileNetV3, tvm.EfficientNet)):
        return _first_conv_stride_one(net.features[0][0])
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    if isinstance(net, ResNet):
        return _resnet_stem(net, name)
    if isinstance(net, (EfficientNet, MobileNetV3)):
        return _first_conv_stride_one(net.conv_stem)
    raise StemError(f"{name}: low_res_stem is not defined for {type(net).__name__}; it covers "
                    f"{'; '.join(SUPPORTED)}. Set model.teacher_low_res_stem / "
                    f"model.student_low_res_stem to false for this model (it then keeps its "
                    f"ImageNet stem; give it inputs of >= 64 px or pick a covered family)")
