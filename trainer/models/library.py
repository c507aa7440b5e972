"""Any torchvision or timm classifier in the :class:`DistillModel` interface.

``torchvision/<name>`` builds ``torchvision.models.get_model(name,
weights=None, num_classes=N)``; ``timm/<name>`` builds
``timm.create_model(name, pretrained=False, num_classes=N)``. Nothing is
ever downloaded: pretrained weights come in through ``model.teacher_weights``
(:mod:`trainer.models.weights`).

The library's module stays whole under ``.net``, parameters at the paths the
library gives them, so a state dict saved from the plain library model loads
into ``.net`` unchanged (and one saved from this wrapper, ``net.`` + those
paths, into the wrapper).

The embedding RKD / CRD use is the input of the final linear classifier,
taken through each library's own feature API:

* **timm**: ``forward_head(forward_features(x), pre_logits=True)`` (pooling,
  and whatever norm / pre-logits MLP the model puts before its classifier);
  logits = ``get_classifier()`` of it, which is ``forward(x)`` exactly
  (timm's head dropout is 0 unless asked for, and this module never asks).
  Models with two classifiers (timm's distilled ViTs) are refused.
* **torchvision**: the final ``nn.Linear`` under ``fc`` / ``classifier`` /
  ``heads`` / ``head`` (the names torchvision's classifiers use) is replaced in
  place by :class:`_DeferredLinear` -- the same parameters at the same path,
  but its forward passes the embedding through -- so ``net(x)`` is the
  embedding and :meth:`head` applies the linear layer. A dropout directly
  before that layer (in its ``Sequential``, or googlenet / inception_v3's
  ``dropout``) moves into :meth:`head` as well, so the embedding is never
  dropped out. Models without a linear classifier (squeezenet) are refused.
  googlenet and inception_v3 are built without their auxiliary heads.

The spatial feature map (:meth:`DistillModel.features_map`, what the
teacher cache may store for composing CutMix targets) is the input of the
model's one global **average** pool over an NCHW map:

* **timm**: ``forward_features(x)``, pooled by ``forward_head(map,
  pre_logits=True)``, when the model has exactly one ``SelectAdaptivePool2d``
  and it averages an NCHW map (ResNets, ConvNeXts, EfficientNets, ...); token
  models (ViT: no such pool), NHWC maps (Swin) and max / avg-max pools are
  refused.
* **torchvision**: the input of ``net.avgpool``, caught by a forward hook,
  when that pool is global (output 1x1) and nothing but flatten / dropout
  lies between it and the final linear layer (ResNets, RegNets, EfficientNets,
  GoogLeNet, ...); VGG (7x7 pool + MLP), ConvNeXt (norm after the pool),
  MobileNetV3 (MLP; the project's ``mobilenet_v3_*`` wrappers have a map)
  and models pooling without ``avgpool`` (DenseNet, MobileNetV2, ShuffleNetV2)
  are refused.

``low_res_stem=True`` applies :func:`trainer.models.stems.apply_low_res_stem`
(ResNet and mobile families; any other architecture is an error).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dataset_tools.errors import CqkdError
from trainer.models.base import DistillModel
from trainer.models.stems import apply_low_res_stem


class UnsupportedModel(CqkdError, ValueError):
    """A library model this wrapper cannot split into embedding + classifier."""


class LibraryModel(DistillModel):
    """Common part: ``self.net`` is the library's module, ``weights_prefix``
    the prefix its parameters carry in this wrapper's state dict, and
    ``classifier_name`` the path (inside ``net``) of the final linear layer."""

    weights_prefix = "net."
    classifier_name: str

    def __init__(self, name: str, net: nn.Module, low_res_stem: bool):
        super().__init__()
        self.name = name
        if low_res_stem:
            apply_low_res_stem(net, name)
        self.net = net


class TimmClassifier(LibraryModel):
    def __init__(self, name: str, net: nn.Module, low_res_stem: bool = False):
        super().__init__(name, net, low_res_stem)
        classifier = net.get_classifier()
        if not isinstance(classifier, nn.Module):
            raise UnsupportedModel(f"{name}: has {len(classifier)} classifier heads "
                                   f"({type(net).__name__}); use a variant with one classifier")
        self.classifier_name = next(n for n, m in net.named_modules() if m is classifier)
        self.feature_dim = int(getattr(classifier, "in_features", 0)
                               or getattr(net, "head_hidden_size", 0) or net.num_features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net.get_classifier()(emb)

    def spatial_unavailable(self) -> Optional[str]:
        from timm.layers import SelectAdaptivePool2d
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool

        pools = [m for m in self.net.modules() if isinstance(m, SelectAdaptivePool2d)]
        if len(pools) != 1:
            return f"{self.name} has {len(pools)} global pools (SelectAdaptivePool2d), not one"
        inner = pools[0].pool
        if isinstance(inner, nn.AdaptiveAvgPool2d) and inner.output_size in (1, (1, 1)):
            return None
        if isinstance(inner, FastAdaptiveAvgPool) and tuple(inner.dim) == (2, 3):
            return None
        return (f"{self.name}'s global pool is {pools[0]!r} ({type(inner).__name__}), not an average "
                f"over an NCHW map")

    @property
    def spatial_channels(self) -> int:
        return int(self.net.num_features)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_unavailable():
            raise self.spatial_error()
        return self.net.forward_features(x)

    def pool_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(fmap, pre_logits=True)


class _DeferredLinear(nn.Linear):
    """A classifier layer whose forward is the identity: the network's own
    forward then ends at the embedding; :meth:`classify` applies the layer.
    ``drop`` is the dropout probability moved here from just before it."""

    drop = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        if self.drop:
            emb = F.dropout(emb, self.drop, self.training)
        return F.linear(emb, self.weight, self.bias)


_CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


def _final_linear(net: nn.Module, name: str) -> str:
    for attr in _CLASSIFIER_ATTRS:
        module = getattr(net, attr, None)
        if isinstance(module, nn.Module):
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                return attr + ("." + linears[-1] if linears[-1] else "")
    raise UnsupportedModel(f"{name}: no linear classifier under {'/'.join(_CLASSIFIER_ATTRS)} "
                           f"({type(net).__name__}); the trainer needs one to take the embedding "
                           f"for RKD/CRD. Pick another torchvision model or its timm version")


class TorchvisionClassifier(LibraryModel):
    def __init__(self, name: str, net: nn.Module, low_res_stem: bool = False):
        super().__init__(name, net, low_res_stem)
        path = self.classifier_name = _final_linear(net, name)
        linear = net.get_submodule(path)
        deferred = _DeferredLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        deferred.weight, deferred.bias = linear.weight, linear.bias
        parent_path, _, leaf = path.rpartition(".")
        parent = net.get_submodule(parent_path)
        if isinstance(parent, nn.Sequential) and leaf.isdigit() and int(leaf) > 0 \
                and isinstance(parent[int(leaf) - 1], nn.Dropout):
            deferred.drop = parent[int(leaf) - 1].p
            parent[int(leaf) - 1] = nn.Identity()
        elif path == "fc" and isinstance(getattr(net, "dropout", None), nn.Dropout):
            deferred.drop, net.dropout = net.dropout.p, nn.Identity()  # googlenet, inception_v3
        net.set_submodule(path, deferred)
        self._deferred = (deferred,)  # a plain tuple, so the layer is not registered twice
        self.feature_dim = linear.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self._deferred[0].classify(emb)

    def head_module_names(self) -> list[str]:
        # the deferred layer's weights are used by classify(), not by a module call
        return [n for n in super().head_module_names() if n != "net." + self.classifier_name] \
            + ["net." + self.classifier_name]

    def spatial_unavailable(self) -> Optional[str]:
        pool = getattr(self.net, "avgpool", None)
        if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
            return f"{self.name} has no global average pool at .avgpool (found {pool!r})"
        parent_path, _, leaf = self.classifier_name.rpartition(".")
        if parent_path:
            parent = self.net.get_submodule(parent_path)
            before = list(parent.children())[:int(leaf)] if leaf.isdigit() else [None]
            if not all(isinstance(m, (nn.Dropout, nn.Identity, nn.Flatten)) for m in before):
                return (f"{self.name} has {', '.join(type(m).__name__ for m in before)} between its "
                        f"global pool and its classifier")
        return None

    def forward_spatial(self, x: torch.Tensor):
        if self.spatial_unavailable():
            raise self.spatial_error()
        caught = {}

        def catch(module, inputs, output):  # returns None: the pool's output is left as it is
            caught["map"] = inputs[0]

        hook = self.net.avgpool.register_forward_hook(catch)
        try:
            emb = self.net(x)
        finally:
            hook.remove()
        return caught["map"], emb, self.head(emb)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_spatial(x)[0]

    def pool_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net.avgpool(fmap), 1)


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def timm_names() -> list[str]:
    import timm

    return sorted(timm.list_models())


def build_torchvision(name: str, num_classes: int, low_res_stem: bool = False) -> TorchvisionClassifier:
    import torchvision.models as tvm

    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    net = tvm.get_model(name, weights=None, num_classes=num_classes, **extra)
    return TorchvisionClassifier(f"torchvision/{name}", net, low_res_stem)


def build_timm(name: str, num_classes: int, low_res_stem: bool = False) -> TimmClassifier:
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    return TimmClassifier(f"timm/{name}", net, low_res_stem)
