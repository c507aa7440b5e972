"""Model registry: ``create_model(name, num_classes, **kw)``.

Every model returns logits from ``forward(x)`` and ``(embedding, logits)``
from ``forward_features(x)`` / ``forward(x, return_features=True)``, exposes
``feature_dim`` and accepts any input size >= 8 px (adaptive pooling).

Names follow HobbitLong/RepDistiller (the CRD paper's code) for the CIFAR
models and torchvision for the ImageNet ones; lookup is case-insensitive.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from dataset_tools.errors import CqkdError
from trainer.models import cifar_resnet, imagenet, mobilenetv2, shufflenetv1, vgg, wrn
from trainer.models.base import DistillModel

_CIFAR: Dict[str, Callable[..., DistillModel]] = {
    "resnet8": cifar_resnet.resnet8,
    "resnet20": cifar_resnet.resnet20,
    "resnet32": cifar_resnet.resnet32,
    "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
    "resnet8x4": cifar_resnet.resnet8x4,
    "resnet32x4": cifar_resnet.resnet32x4,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg13": vgg.vgg13,
    "mobilenetv2": mobilenetv2.mobilenetv2,
    "shufflenetv1": shufflenetv1.shufflenetv1,
}
_IMAGENET: Dict[str, Callable[..., DistillModel]] = {
    "resnet18": imagenet.resnet18,
    "resnet50": imagenet.resnet50,
    "mobilenet_v3_small": imagenet.mobilenet_v3_small,
    "mobilenet_v3_large": imagenet.mobilenet_v3_large,
}
_REGISTRY = {**_CIFAR, **_IMAGENET}


class ModelError(CqkdError, KeyError):
    """An unknown model name (``model.teacher`` / ``model.student`` or a
    checkpoint's ``arch``); the message lists the valid names. Still a
    ``KeyError`` for code that caught the old error."""

    def __str__(self) -> str:  # KeyError would repr() the message (quotes)
        return str(self.args[0]) if self.args else ""


# RepDistiller's spellings of the two mobile students
_ALIASES = {"mobile_half": "mobilenetv2", "shufflev1": "shufflenetv1"}


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def is_imagenet_model(name: str) -> bool:
    return _canonical(name) in _IMAGENET


def _canonical(name: str) -> str:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(list_models())} "
                         f"(aliases: {', '.join(sorted(_ALIASES))}); fix model.teacher / "
                         f"model.student in the config")
    return key


def create_model(name: str, num_classes: int, **kw) -> DistillModel:
    """Build a randomly initialised model. ImageNet models accept
    ``low_res_stem: bool``. CIFAR models are low-resolution by design, so they
    accept and ignore ``low_res_stem`` (one config key serves every model) and
    take no other options."""
    key = _canonical(name)
    if key in _CIFAR:
        kw.pop("low_res_stem", None)
        if kw:
            raise TypeError(f"model {name!r} takes no options, got {sorted(kw)}")
    return _REGISTRY[key](num_classes=num_classes, **kw)


__all__ = ["DistillModel", "ModelError", "create_model", "list_models", "is_imagenet_model"]
