"""The mixed-target fidelity benchmark: a small real run against the online
teacher (the composition rule itself is the product's, tested in
tests/trainer/test_spatial_targets.py)."""
from __future__ import annotations

import math

from benchmarks.mix_fidelity import measure


def test_fidelity_run_against_the_online_teacher(teacher_run):
    cfg, *_ = teacher_run
    out = measure(cfg, batches=2, temperatures=[1.0, 4.0], grid=4)
    assert set(out["results"]) == {"mixup", "cutmix"}
    assert set(out["results"]["cutmix"]["T4"]) == {"probs", "logits", "spatial"}
    assert set(out["results"]["mixup"]["T1"]) == {"probs", "logits"}
    for by_t in out["results"].values():
        for by_a in by_t.values():
            for r in by_a.values():
                assert math.isfinite(r["kl"]) and r["kl"] >= -1e-6 and 0 <= r["top1_agreement"] <= 1
    # softening shrinks every divergence
    for a in ("probs", "logits"):
        assert out["results"]["mixup"]["T4"][a]["kl"] < out["results"]["mixup"]["T1"][a]["kl"]
