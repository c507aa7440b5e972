"""Temperature scaling (Guo et al. 2017): one scalar T > 0 fitted on held-out
logits by minimizing NLL of ``softmax(logits / T)``.

We optimize ``log T`` (keeps T > 0, better conditioned) with
``torch.optim.LBFGS`` + strong-Wolfe line search in float64. NLL is convex in
``1/T`` (logsumexp of a linear function minus a linear term), hence unimodal in
``log T``. If LBFGS converges beyond the bounds (e.g. T -> 0 when every
prediction is right, T -> inf for random labels) the nearest bound is the
bounded optimum; if it fails (non-finite, not stationary) a golden-section
search over the bounded ``log T`` interval finds the minimum instead.
Both are deterministic for fixed inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.evaluation.calibration import DEFAULT_BINS, expected_calibration_error, validate_inputs

DEFAULT_BOUNDS = (0.01, 100.0)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class TemperatureResult:
    temperature: float
    nll_before: float  # at T = 1
    nll_after: float  # at the fitted T; never above nll_before
    ece_before: float
    ece_after: float
    method: str  # "lbfgs", "lbfgs-clamped" (optimum beyond a bound), "golden-section"
    # (LBFGS failed) or "identity" (T = 1 was already best)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T``; raises ValueError unless T is a finite positive number."""
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return logits / t


def _nll(logits64: torch.Tensor, labels: torch.Tensor, log_t) -> torch.Tensor:
    return F.cross_entropy(logits64 * torch.exp(-log_t), labels)


def _lbfgs(logits64, labels, max_iter: int) -> tuple[float, float]:
    """Returns (log T, |d NLL / d log T| at the end)."""
    log_t = torch.zeros((), dtype=torch.float64, device=logits64.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(logits64, labels, log_t)
        loss.backward()
        return loss

    opt.step(closure)
    log_t.grad = None
    loss = _nll(logits64, labels, log_t)
    (grad,) = torch.autograd.grad(loss, log_t)
    return float(log_t.detach()), abs(float(grad))


def _golden_section(logits64, labels, lo: float, hi: float, iters: int = 64) -> float:
    """Minimum of the unimodal NLL(log T) on [lo, hi] (interval shrinks 0.618^iters)."""
    def f(x: float) -> float:
        return float(_nll(logits64, labels, torch.tensor(x, dtype=torch.float64)))

    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    # The bounds themselves are candidates (optimum at an end of the interval).
    cands = [(f(lo), lo), (fc, c), (fd, d), (f(hi), hi)]
    return min(cands)[1]


@torch.no_grad()
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *,
                    bounds: tuple[float, float] = DEFAULT_BOUNDS, max_iter: int = 100,
                    grad_tol: float = 1e-6, n_bins: int = DEFAULT_BINS) -> TemperatureResult:
    """Fit T on held-out ``logits [N, C]`` and integer ``labels [N]``.

    Raises ValueError on empty input, NaN/Inf logits, shape mismatch or labels
    outside ``[0, C)``. The fitted T lies in ``bounds``.
    """
    validate_inputs(logits, labels, from_logits=True, where="fit_temperature")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (0 < lo < 1 < hi and math.isfinite(hi)):
        raise ValueError(f"fit_temperature: bounds must satisfy 0 < lo < 1 < hi, got {bounds}")
    z = logits.detach().double()
    y = labels.long()
    log_lo, log_hi = math.log(lo), math.log(hi)

    with torch.enable_grad():
        log_t, grad = _lbfgs(z, y, max_iter)
    method = "lbfgs"
    if math.isfinite(log_t) and grad <= grad_tol and not log_lo <= log_t <= log_hi:
        # A stationary point of this unimodal NLL is its minimum, so the best T
        # inside the bounds is the nearest bound (e.g. T -> 0 when all are right).
        log_t, method = min(max(log_t, log_lo), log_hi), "lbfgs-clamped"
    elif not (math.isfinite(log_t) and grad <= grad_tol):
        log_t, method = _golden_section(z, y, log_lo, log_hi), "golden-section"

    zero = torch.zeros((), dtype=torch.float64)
    nll_before = float(_nll(z, y, zero))
    nll_after = float(_nll(z, y, torch.tensor(log_t, dtype=torch.float64)))
    if not nll_after <= nll_before:  # only by rounding; never return a worse T
        log_t, nll_after, method = 0.0, nll_before, "identity"
    temperature = min(max(math.exp(log_t), lo), hi)  # exp(log(hi)) can overshoot by an ulp
    ece_before = expected_calibration_error(z, y, n_bins=n_bins)
    ece_after = expected_calibration_error(apply_temperature(z, temperature), y, n_bins=n_bins)
    return TemperatureResult(temperature, nll_before, nll_after, ece_before, ece_after, method)


def crossfit_ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """ECE after temperature scaling, measured without fitting and scoring on
    the same samples: T fitted on the even-indexed half is scored on the odd
    half and vice versa (2-fold cross-fitting), the two ECEs averaged. What
    a temperature fitted on held-out data can be expected to give on new data."""
    even, odd = torch.arange(0, len(labels), 2), torch.arange(1, len(labels), 2)
    eces = []
    for fit_idx, score_idx in ((even, odd), (odd, even)):
        t = fit_temperature(logits[fit_idx], labels[fit_idx]).temperature
        eces.append(expected_calibration_error(logits[score_idx] / t, labels[score_idx]))
    return sum(eces) / 2
