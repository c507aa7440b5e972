"""The interface every model in the registry implements.

The trainer needs logits for CE/KD and the pooled embedding for RKD/CRD from
one forward pass, so each model splits into ``embed`` (backbone + global
pooling, ``[B, feature_dim]``) and ``head`` (the classifier).

Where the architecture allows it, ``embed`` itself splits at the global
average pool: ``features_map(x)`` is the last spatial feature map
``[B, spatial_channels, h, w]`` and ``pool_features(map)`` the global pooling
(plus whatever the model puts between the pool and the classifier), so
``embed(x) == pool_features(features_map(x))``. The teacher cache stores that
map, area-pooled to a small grid, so a CutMix target can be composed from the
two source views' maps before the head (:mod:`trainer.distill.spatial`). A
grid of cells can be fed to ``pool_features`` like the full map because
average pooling of area-pooled cells is the average of the map (exactly when
the map's sides divide by the grid). Models without such a split (token
models, max/avg-max pooling) raise :class:`SpatialFeaturesUnavailable`
from ``features_map``.
"""
from __future__ import annotations

import abc
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from dataset_tools.errors import CqkdError


class SpatialFeaturesUnavailable(CqkdError, ValueError):
    """The architecture has no spatial feature map before a global average pool."""


class DistillModel(nn.Module, abc.ABC):
    """Subclasses set ``self.feature_dim`` and implement ``head`` and either
    ``features_map`` (then ``embed`` is its global average pool and
    ``spatial_channels`` defaults to ``feature_dim``) or ``embed`` itself (then
    :meth:`spatial_unavailable` says why there is no map)."""

    feature_dim: int

    def spatial_unavailable(self) -> Optional[str]:
        """``None`` when :meth:`features_map` works, else why it does not."""
        if type(self).features_map is DistillModel.features_map:
            return f"{type(self).__name__} does not implement features_map"
        return None

    @property
    def spatial_channels(self) -> int:
        """Channels of :meth:`features_map` (what the teacher cache stores per cell)."""
        return self.feature_dim

    def spatial_error(self) -> SpatialFeaturesUnavailable:
        """The error :meth:`features_map` raises where there is no map, naming the fix."""
        return SpatialFeaturesUnavailable(
            f"{self.spatial_unavailable()}: this architecture has no spatial feature map before a "
            f"global average pool, so a teacher cache cannot store one for composing CutMix targets; "
            f"fill the cache with distill.cache_spatial=never (or auto) and train with "
            f"distill.cached_mix=auto or logits, or use a convolutional teacher")

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last spatial feature map, the input of the global pool: ``[B, spatial_channels, h, w]``."""
        raise self.spatial_error()

    def pool_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """Global average pooling of a feature map (or of a grid of its cells): ``[B, feature_dim]``."""
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + global pooling: ``[B, feature_dim]``."""
        return self.pool_features(self.features_map(x))

    @abc.abstractmethod
    def head(self, emb: torch.Tensor) -> torch.Tensor:
        """The classifier: embedding -> logits."""

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [B, feature_dim], logits [B, num_classes])``."""
        emb = self.embed(x)
        return emb, self.head(emb)

    def forward_spatial(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(feature map, embedding, logits)`` from one pass (the cache fill)."""
        fmap = self.features_map(x)
        emb = self.pool_features(fmap)
        return fmap, emb, self.head(emb)

    def head_module_names(self) -> list[str]:
        """The submodules :meth:`pool_features` and :meth:`head` call (the
        outermost ones), found by running them on a one-cell map: what a
        caller that only composes maps needs on its device. A model whose
        head uses parameters outside a module call overrides this."""
        names = {id(m): n for n, m in self.named_modules() if n}
        called: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: called.append(names[id(mod)]))
                 for m in self.modules() if id(m) in names]
        p = next(self.parameters())
        try:
            with torch.no_grad():
                self.head(self.pool_features(torch.zeros(1, self.spatial_channels, 1, 1,
                                                         device=p.device, dtype=p.dtype)))
        finally:
            for h in hooks:
                h.remove()
        return [n for n in dict.fromkeys(called) if not any(n.startswith(o + ".") for o in called)]

    def forward(self, x: torch.Tensor,
                return_features: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        emb, logits = self.forward_features(x)
        return (emb, logits) if return_features else logits


def init_conv_bn_linear(module: nn.Module, linear_std: float | None = None) -> None:
    """He-normal (fan_out) convs, unit/zero BN, zero linear bias: the
    initialisation the RepDistiller CIFAR models use."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
