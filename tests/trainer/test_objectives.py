"""The KD objectives of both seeds against hand-computed values, the teacher
temperature of each targets strategy, and the sweep's choice rule."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipelines.batch import MixParams
from trainer.distill.loss import DistillLoss
from trainer.distill.loss_config import LossConfig
from trainer.distill.targets import CachedTargets
from trainer.sweep import choose

Z_S = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
Z_T = [[3.0, 1.0, 0.0], [0.0, 4.0, 1.0]]


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def kd_value(cfg: LossConfig, teacher_t: float) -> float:
    probs = torch.tensor([softmax(z, teacher_t) for z in Z_T])
    total, _ = DistillLoss(cfg)(torch.tensor(Z_S), torch.zeros(2, 4), torch.tensor([0, 1]), probs)
    return total.item()


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_hinton_kd_hand_computed(t):
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batch mean."""
    want = t * t * sum(kl(softmax(zt, t), softmax(zs, t)) for zs, zt in zip(Z_S, Z_T)) / 2
    got = kd_value(LossConfig(ce=0.0, kd=1.0, temperature=t), t)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_teacher_smoothing_hand_computed(t):
    """KL(softmax(z_t/T) || softmax(z_s)): the student stays at T = 1, no T^2."""
    want = sum(kl(softmax(zt, t), softmax(zs)) for zs, zt in zip(Z_S, Z_T)) / 2
    got = kd_value(LossConfig(ce=0.0, kd=1.0, temperature=t, kd_objective="teacher_smoothing"), t)
    assert got == pytest.approx(want, rel=1e-5)
    if t > 1:  # differs from Hinton's form for T != 1
        hinton = kd_value(LossConfig(ce=0.0, kd=1.0, temperature=t), t)
        assert abs(hinton - got) > 1e-3


def test_objective_with_ce_is_the_weighted_sum():
    t, w_ce, w_kd = 2.0, 0.3, 0.7
    labels = [0, 1]
    ce = -sum(math.log(softmax(zs)[y]) for zs, y in zip(Z_S, labels)) / 2
    kd = sum(kl(softmax(zt, t), softmax(zs)) for zs, zt in zip(Z_S, Z_T)) / 2
    got = kd_value(LossConfig(ce=w_ce, kd=w_kd, temperature=t, kd_objective="teacher_smoothing"), t)
    assert got == pytest.approx(w_ce * ce + w_kd * kd, rel=1e-5)


def test_bad_objective_and_temperature_are_rejected():
    with pytest.raises(ValueError, match="loss.kd_objective=.symmetric. is not one of hinton, teacher_smoothing"):
        LossConfig(kd=1.0, kd_objective="symmetric")
    with pytest.raises(ValueError, match="number > 0 or 'auto'"):
        LossConfig(kd=1.0, temperature="warm")
    with pytest.raises(ValueError, match="must be resolved"):
        DistillLoss(LossConfig(kd=1.0, temperature="auto"))


class FakeCache:
    """Two samples x one view; logits Z_T, features [[1, 2], [3, 5]]."""

    num_classes, feature_dim = 3, 2

    def __init__(self, features=True):
        self.features = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]]) if features else None

    def lookup(self, idx, views, temperature=1.0):  # dense rows: exact at every T
        return torch.tensor(Z_T)[idx]

    def lookup_features(self, idx, views):
        return self.features[idx, views]

    def require_features(self):
        if self.features is None:
            raise RuntimeError("no features")
        return self


def batch(mix=None):
    return SimpleNamespace(indices=torch.tensor([0, 1]), view_ids=torch.tensor([0, 0]), mix=mix)


def test_calibrated_teacher_divides_by_the_fitted_temperature_before_smoothing():
    """The engine hands CachedTargets T_cal * T; the targets are softmax(z / (T_cal T))."""
    t_cal, t = 1.7, 2.0
    probs, emb = CachedTargets(FakeCache(), t_cal * t)(batch())
    want = torch.tensor([softmax(z, t_cal * t) for z in Z_T])
    torch.testing.assert_close(probs, want)
    assert emb is None


def test_cached_mixing_of_probabilities_logits_and_features():
    mix = MixParams("mixup", perm=torch.tensor([1, 0]), lam=torch.tensor([0.75, 0.75]))
    w = mix.target_weight.unsqueeze(1)
    p = torch.tensor([softmax(z, 2.0) for z in Z_T])
    probs, emb = CachedTargets(FakeCache(), 2.0, "probs", need_features=True)(batch(mix))
    torch.testing.assert_close(probs, w * p + (1 - w) * p[[1, 0]])
    f = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    torch.testing.assert_close(emb, w * f + (1 - w) * f[[1, 0]])
    z = torch.tensor(Z_T)
    probs, _ = CachedTargets(FakeCache(), 2.0, "logits")(batch(mix))
    torch.testing.assert_close(probs, torch.softmax((w * z + (1 - w) * z[[1, 0]]) / 2.0, dim=1))


def test_cached_rkd_crd_refuse_a_cache_without_features():
    with pytest.raises(RuntimeError, match="no features"):
        CachedTargets(FakeCache(features=False), 4.0, need_features=True)
    with pytest.raises(ValueError, match="cached_mix"):
        CachedTargets(FakeCache(), 4.0, "average")


def run(t, top1, ece, obj="hinton"):
    return {"temperature": t, "val_top1": top1, "val_ece": ece, "objective": obj}


def test_sweep_choice_rule_on_a_known_case():
    runs = [run(1, 0.50, 0.20), run(2, 0.495, 0.05), run(4, 0.45, 0.01), run(8, 0.30, 0.005)]
    # T=4 and T=8 are better calibrated but more than 1 point less accurate
    assert choose(runs, 0.01)["temperature"] == 2
    assert choose(runs, 0.06)["temperature"] == 4  # a looser tolerance admits T=4
    assert choose(runs, 0.0)["temperature"] == 1  # only the most accurate run
    tie = [run(4, 0.5, 0.05), run(2, 0.5, 0.05), run(1, 0.49, 0.05)]
    assert choose(tie, 0.02)["temperature"] == 2  # equal ECE and top-1: the lower T
    with pytest.raises(ValueError, match="finite"):
        choose([run(1, float("nan"), 0.1)], 0.01)
