"""A fake teacher for the teacher-cache tests: deterministic logits and
embeddings per view, and the ``view_batches`` a cache fill takes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.distill.logit_cache import CacheKey


@dataclass(frozen=True)
class FakeTeacher:
    """``n`` samples, ``views`` views, ``classes`` logits (std ``scale``) and
    ``dim``-d ReLU'd embeddings per view; fills in batches of ``batch`` in a
    seeded order per view (any deterministic order works)."""

    n: int
    views: int
    classes: int
    batch: int
    dim: int
    scale: float

    def key(self, **kw) -> CacheKey:
        base = dict(teacher_hash="sha256:t", data_fingerprint="sha256:d",
                    views={"seed": 0, "num_views": self.views}, teacher_resolution=32)
        base.update(kw)
        return CacheKey(**base)

    def true_logits(self, v: int) -> np.ndarray:
        return (np.random.default_rng(v).standard_normal((self.n, self.classes)) * self.scale).astype(np.float32)

    def true_features(self, v: int) -> np.ndarray:
        g = np.random.default_rng(1000 + v)
        return np.maximum(g.standard_normal((self.n, self.dim)) * 3, 0).astype(np.float32)

    def batches(self, v: int, calls=None, features: bool = False):
        order = np.random.default_rng(100 + v).permutation(self.n)
        table, ftable = self.true_logits(v), self.true_features(v)
        for s in range(0, self.n, self.batch):
            idx = order[s:s + self.batch]

            def compute(idx=idx, s=s):
                if calls is not None:
                    calls.append((v, s))
                return (table[idx], ftable[idx]) if features else table[idx]
            yield idx, compute

    def fbatches(self, v: int, calls=None):
        return self.batches(v, calls, features=True)


class Interrupt(Exception):
    """Raised by :func:`interrupted_at` to stop a fill part-way."""


def interrupted_at(view_batches, view: int, batch: int):
    """``view_batches`` that raise :class:`Interrupt` at batch ``batch`` of view ``view``."""
    def vb(v):
        for i, item in enumerate(view_batches(v)):
            if (v, i) == (view, batch):
                raise Interrupt
            yield item
    return vb
