"""The mixed-target fidelity benchmark: its spatial composition rule and a
small real run against the online teacher."""
from __future__ import annotations

import math

import torch

from benchmarks.mix_fidelity import compose_cutmix_map, measure


def test_spatial_composition_rule():
    maps = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    perm = torch.tensor([1, 0])
    nothing = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    # no box: the pooled embedding of each sample's own map
    torch.testing.assert_close(compose_cutmix_map(maps, perm, nothing, 2), maps.mean(dim=(2, 3)))
    # the top-left quarter pasted: that cell comes from the partner, the rest stays
    quarter = nothing.clone()
    quarter[:, :, :4, :4] = True
    cells = torch.nn.functional.adaptive_avg_pool2d(maps, 2)
    want = (cells.sum(dim=(2, 3)) - cells[:, :, 0, 0] + cells[perm][:, :, 0, 0]) / 4
    torch.testing.assert_close(compose_cutmix_map(maps, perm, quarter, 2), want)


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
