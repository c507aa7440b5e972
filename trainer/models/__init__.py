"""Models: ``create_model(name, num_classes, low_res_stem=...)``.

Every model returns logits from ``forward(x)`` and ``(embedding, logits)``
from ``forward_features(x)`` / ``forward(x, return_features=True)`` and
exposes ``feature_dim`` (:class:`~trainer.models.base.DistillModel`); where
the architecture has one, ``features_map(x)`` is the map before the global
average pool (``embed = pool_features(features_map(x))``), which the teacher
cache stores for composing CutMix targets.

Names (:mod:`trainer.models.registry`): the project's models (the CIFAR
models of the KD/CRD literature, RepDistiller spellings, and a few
torchvision ImageNet models), ``torchvision/<name>`` and ``timm/<name>`` for
any classifier those libraries build (:mod:`trainer.models.library`).
``python -m trainer.models [--source ...] [PATTERN]`` lists them. Weights
files (state dict, safetensors, timm checkpoints) load through
:mod:`trainer.models.weights`.
"""
from __future__ import annotations

# importing the model modules registers the project's models
from trainer.models import cifar_resnet, imagenet, mobilenetv2, shufflenetv1, vgg, wrn  # noqa: F401
from trainer.models.base import DistillModel
from trainer.models.registry import (ModelError, create_model, is_imagenet_model, is_model, list_models,
                                     resolve)
from trainer.models.stems import StemError

__all__ = ["DistillModel", "ModelError", "StemError", "create_model", "list_models", "is_imagenet_model",
           "is_model", "resolve"]
