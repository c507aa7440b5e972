"""The held-out validation split made at convert time (``convert.py --val-fraction``).

The rule, a pure function of the labels in source order, the fraction F and
the seed S (no randomness from anywhere else, so the same source, F and S
always give the same parts):

* items are grouped by class (label), keeping their source order;
* a class with ``n_c`` items gives ``k_c = round(F * n_c)`` of them to the
  val part (Python's ``round``: halves go to the even integer, e.g.
  ``round(0.25 * 10) == 2``), clamped to ``1 <= k_c <= n_c - 1`` when
  ``n_c >= 2``; a class with a single item keeps it in the train part
  (``k_c = 0``), and F = 0 holds out nothing;
* which ``k_c`` items: the first ``k_c`` entries of
  ``numpy.random.default_rng([S, c]).permutation(n_c)`` (``c`` the class
  index), taken as positions within the class's items;
* everything else is the train part.

Positions are indices into the source listing (``open_source(...).items``,
i.e. after any files the listing itself skipped), returned sorted, so a
store written from a part keeps source order and its sample ``i`` is source
item ``positions[i]`` (unless a file was rejected while decoding).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["holdout_count", "stratified_holdout"]


def _check(fraction: float, seed: int) -> None:
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction)
            and 0 <= fraction < 1):
        raise ValueError(f"fraction {fraction!r}: must be in [0, 1)")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed {seed!r}: must be an integer >= 0")


def holdout_count(n: int, fraction: float) -> int:
    """How many of a class's ``n`` items go to the val part (see module doc)."""
    if n < 2 or fraction <= 0:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def stratified_holdout(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` class by class.

    -> ``(train_positions, val_positions)``: sorted int64 arrays, disjoint,
    together every position. Raises ValueError for a fraction outside
    [0, 1), a negative seed or a negative label.
    """
    _check(fraction, seed)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0 (found {int(labels.min())})")
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # in source order
        k = holdout_count(len(members), fraction)
        if k:
            pick = np.random.default_rng([int(seed), int(c)]).permutation(len(members))[:k]
            val.append(members[pick])
    val_pos = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    is_val = np.zeros(labels.size, bool)
    is_val[val_pos] = True
    return np.flatnonzero(~is_val).astype(np.int64), val_pos.astype(np.int64)
