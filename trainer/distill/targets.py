"""Teacher targets, one strategy per ``distill.targets`` mode.

Each strategy turns a (possibly mixed) batch into ``(teacher_probs,
teacher_emb)``: the teacher's distribution at the teacher temperature and its
penultimate embedding, both mixed like the batch.

* ``none``: no teacher (supervised student).
* ``cached``: rows of the teacher cache (:mod:`trainer.distill.teacher_cache`)
  for the batch's (sample, view) pairs, looked up at the teacher temperature
  (a top-k cache reconstructs the distribution at that temperature). The
  teacher never saw the mixed image, so the mixed target is an approximation
  (``distill.cached_mix``): ``probs`` mixes the per-sample distributions like
  the labels, ``logits`` mixes the logits before the softmax, ``spatial``
  composes CutMix batches from the cache's spatial maps through the teacher's
  head (:mod:`trainer.distill.spatial`; the cache must have them) and mixes
  logits otherwise, and ``auto`` (the default) is ``spatial`` when the cache
  has the maps and ``logits`` when not. The rule (the closest to the online
  teacher that costs under 10 % of a step) and the measurements:
  docs/design/teacher_cache.md. Embeddings are the cached penultimate
  features, mixed linearly like the labels, except on composed CutMix
  batches, where they are the pooled composed map; RKD/CRD refuse a cache
  without them, so cached and online RKD/CRD train the same method.
* ``online``: the teacher runs on the mixed full-resolution view (exact).

The teacher temperature is ``T_cal * T`` with the calibrated teacher
(``distill.calibrated_teacher``: its logits divided by the temperature fitted
on the validation split, then smoothed at ``T``) and ``T`` otherwise.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch

from trainer.distill.kd import teacher_probs
from trainer.distill.spatial import compose_cutmix, mix_fractions

MIX_MODES = ("auto", "spatial", "logits", "probs")


class NoTargets:
    teacher_dim = 0

    def __call__(self, batch):
        return None, None


class CachedTargets:
    """Targets from a filled cache; ``need_features`` when RKD/CRD are on;
    ``head``: the teacher's :class:`~trainer.distill.spatial.SpatialHead`
    (required by ``spatial``; with ``auto``, CutMix batches are composed when
    it is given; :func:`trainer.distill.spatial.spatial_head_for` decides)."""

    def __init__(self, cache, temperature: float, mix_mode: str = "auto", need_features: bool = False,
                 head: Optional[torch.nn.Module] = None):
        if mix_mode not in MIX_MODES:
            raise ValueError(f"distill.cached_mix must be one of {MIX_MODES}, got {mix_mode!r}")
        if need_features:
            cache.require_features()
        if mix_mode == "spatial":
            cache.require_spatial()
            if head is None:
                raise ValueError("distill.cached_mix=spatial needs the teacher's head (spatial_head_for)")
        self.cache, self.temperature, self.mix_mode = cache, float(temperature), mix_mode
        self.need_features = need_features
        self.head = head if mix_mode in ("auto", "spatial") else None
        self.teacher_dim = cache.feature_dim if need_features else cache.num_classes

    def __call__(self, batch):
        mix = batch.mix
        if mix is not None and mix.mode == "cutmix" and self.head is not None:
            return self._composed(batch)  # auto / spatial (the head is only given for them)
        logits = self.cache.lookup(batch.indices, batch.view_ids, self.temperature)
        emb = self.cache.lookup_features(batch.indices, batch.view_ids) if self.need_features else None
        if mix is None:
            return teacher_probs(logits, self.temperature), emb
        if emb is not None:
            emb = mix.mix_targets(emb)
        if self.mix_mode == "probs":
            return mix.mix_targets(teacher_probs(logits, self.temperature)), emb
        return teacher_probs(mix.mix_targets(logits), self.temperature), emb

    @torch.no_grad()
    def _composed(self, batch):
        cells = self.cache.lookup_spatial(batch.indices, batch.view_ids)
        emb, logits = self.head(compose_cutmix(cells, batch.mix.perm, mix_fractions(batch.mix, cells.shape[-1])))
        return teacher_probs(logits.float(), self.temperature), (emb.float() if self.need_features else None)


class OnlineTargets:
    """The teacher runs on ``batch.teacher`` (the mixed full-resolution view)."""

    def __init__(self, teacher: torch.nn.Module, temperature: float,
                 autocast: Optional[Callable] = None):
        self.teacher, self.temperature = teacher.eval(), float(temperature)
        self.autocast = autocast or nullcontext
        self.teacher_dim = teacher.feature_dim

    @torch.no_grad()
    def __call__(self, batch):
        with self.autocast():
            emb, logits = self.teacher.forward_features(batch.teacher)
        return teacher_probs(logits.float(), self.temperature), emb.float()
