"""Temperature scaling: recovers a known temperature, never worsens NLL, agrees
with an independent grid search, rejects bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.evaluation.temperature import TemperatureResult, apply_temperature, fit_temperature


def calibrated_by_construction(seed: int, n: int = 20_000, c: int = 10):
    """True logits and labels sampled from softmax(true logits): a calibrated model."""
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, c, generator=g) * 1.5
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    return true_logits, labels


def grid_nll(logits: torch.Tensor, labels: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """NLL at every temperature of ``temps`` in one batched op: [T] float64."""
    z = logits.double()[None] / temps.double()[:, None, None]  # [T, N, C]
    z_y = z.gather(2, labels[None, :, None].expand(len(temps), -1, 1)).squeeze(2)
    return (torch.logsumexp(z, dim=2) - z_y).mean(1)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_known_overconfidence(seed):
    # logits = 3 * calibrated logits, so the MLE of T is consistent for 3. Across seeds
    # the estimate spreads by sd ~0.025 at N = 20k (20 seeds, max error 0.047);
    # tolerance 0.15 (5%) is ~6 sigma.
    true_logits, labels = calibrated_by_construction(seed)
    res = fit_temperature(true_logits * 3, labels)
    assert isinstance(res, TemperatureResult)
    assert res.temperature == pytest.approx(3.0, abs=0.15)
    assert res.ece_before > 0.2  # strongly overconfident before
    # After: only the binned-ECE sampling bias remains, ~sqrt(2/pi)*0.5*sqrt(15/N) ~ 0.011.
    assert res.ece_after < 0.02 < res.ece_before
    assert res.nll_after < res.nll_before


def test_recovers_known_underconfidence():
    true_logits, labels = calibrated_by_construction(2)
    res = fit_temperature(true_logits / 2, labels)
    assert res.temperature == pytest.approx(0.5, abs=0.03)
    assert res.ece_after < res.ece_before


def _cases():
    g = torch.Generator().manual_seed(3)
    true_logits, labels = calibrated_by_construction(4, n=2000)
    x = torch.randn(300, 5, generator=g)
    yield "calibrated", true_logits, labels
    yield "overconfident", true_logits * 4, labels
    yield "underconfident", true_logits * 0.3, labels
    yield "random_labels", true_logits, torch.randint(0, 10, (2000,), generator=g)
    yield "separable", x, x.argmax(1)  # optimum at T -> 0: clamped to the lower bound
    yield "constant", torch.zeros(50, 4), torch.randint(0, 4, (50,), generator=g)


@pytest.mark.parametrize("name,logits,labels", list(_cases()), ids=[c[0] for c in _cases()])
def test_nll_never_increases(name, logits, labels):
    res = fit_temperature(logits, labels)
    assert res.nll_after <= res.nll_before
    ref_before = float(F.cross_entropy(logits.double(), labels))
    assert res.nll_before == pytest.approx(ref_before, rel=1e-9)
    scaled = apply_temperature(logits.double(), res.temperature)
    assert res.nll_after == pytest.approx(float(F.cross_entropy(scaled, labels)), rel=1e-9)
    assert 0.01 <= res.temperature <= 100.0


@pytest.mark.parametrize("name,logits,labels", list(_cases())[:5], ids=[c[0] for c in _cases()][:5])
def test_matches_grid_search_minimum(name, logits, labels):
    # Independent check: brute-force grid over [0.01, 100] (ratio 1.047), then a fine
    # grid (ratio 1.001) around the coarse minimum.
    coarse = torch.logspace(-2, 2, 201, dtype=torch.float64)
    best = int(grid_nll(logits, labels, coarse).argmin())
    lo, hi = coarse[max(best - 1, 0)], coarse[min(best + 1, 200)]
    fine = torch.logspace(math.log10(lo), math.log10(hi), 101, dtype=torch.float64)
    nll = grid_nll(logits, labels, fine)
    best = int(nll.argmin())
    res = fit_temperature(logits, labels)
    fitted_nll = float(F.cross_entropy(logits.double() / res.temperature, labels))
    assert fitted_nll <= float(nll[best]) + 1e-9  # at least as good as every grid point
    step = math.log(float(fine[1] / fine[0]))
    assert abs(math.log(res.temperature) - math.log(float(fine[best]))) <= 2 * step


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_golden_section_fallback_matches_lbfgs(monkeypatch, scale):
    # Force the fallback path (LBFGS "fails") and check it reaches the same optimum.
    import trainer.evaluation.temperature as temperature
    true_logits, labels = calibrated_by_construction(7, n=2000)
    ref = fit_temperature(true_logits * scale, labels)
    assert ref.method == "lbfgs"
    monkeypatch.setattr(temperature, "_lbfgs", lambda *a, **k: (float("nan"), float("nan")))
    res = fit_temperature(true_logits * scale, labels)
    assert res.method == "golden-section"
    assert res.temperature == pytest.approx(ref.temperature, rel=1e-5)
    assert res.nll_after == pytest.approx(ref.nll_after, rel=1e-9)


def test_optimum_beyond_bounds_is_clamped():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 5, generator=g)
    low = fit_temperature(x, x.argmax(1), bounds=(0.1, 10.0))  # all right: T -> 0
    assert low.temperature == pytest.approx(0.1, rel=1e-12)
    high = fit_temperature(x, torch.randint(0, 5, (300,), generator=g), bounds=(0.1, 10.0))
    assert high.temperature == pytest.approx(10.0, rel=1e-12)  # random labels: T -> inf
    assert high.nll_after <= high.nll_before


def test_deterministic():
    true_logits, labels = calibrated_by_construction(5, n=3000)
    a = fit_temperature(true_logits * 2, labels)
    b = fit_temperature(true_logits * 2, labels)
    assert a == b


def test_apply_temperature():
    x = torch.randn(4, 3)
    assert torch.equal(apply_temperature(x, 2.0), x / 2.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(x, bad)


@pytest.mark.parametrize("case,match", [
    ("empty", "no samples"), ("nan", "NaN"), ("inf", "NaN or Inf"), ("shape", "labels must be"),
    ("range_high", "out of range"), ("range_negative", "out of range"),
    ("float_labels", "integer"), ("one_dim", r"\[N, C\]"), ("bounds", "bounds"),
])
def test_invalid_input_raises(case, match):
    x, y, kwargs = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), {}
    if case == "empty":
        x, y = x[:0], y[:0]
    elif case == "nan":
        x[2, 1] = float("nan")
    elif case == "inf":
        x[0, 0] = float("inf")
    elif case == "shape":
        y = y[:5]
    elif case == "range_high":
        y = torch.tensor([0, 1, 2, 3, 1, 2])
    elif case == "range_negative":
        y = torch.tensor([0, -1, 2, 0, 1, 2])
    elif case == "float_labels":
        y = y.float()
    elif case == "one_dim":
        x = x[:, 0]
    elif case == "bounds":
        kwargs = {"bounds": (2.0, 10.0)}
    with pytest.raises(ValueError, match=match):
        fit_temperature(x, y, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    true_logits, labels = calibrated_by_construction(6, n=5000)
    cpu = fit_temperature(true_logits * 3, labels)
    gpu = fit_temperature((true_logits * 3).cuda(), labels.cuda())
    assert gpu.temperature == pytest.approx(cpu.temperature, rel=1e-6)
    assert gpu.nll_after == pytest.approx(cpu.nll_after, rel=1e-6)
