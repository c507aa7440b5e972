"""Calibration metrics from logits (or probabilities) and integer labels.

All metrics are batched torch ops on the scores' device (CPU or CUDA) and come
back as plain Python floats (fractions, not percent):

``top1``, ``top5``  top-k accuracy.
``ece``, ``mce``    top-label expected / maximum calibration error, equal-width
                    bins (Guo et al. 2017).
``adaptive_ece``    the same with equal-mass bins (Nixon et al. 2019).
``classwise_ece``   per-class equal-width binned error of p(class) against
                    1[label == class], averaged over classes (Kull et al. 2019).
``nll``             mean negative log-likelihood of the label.
``brier``           mean over samples of sum over classes of (p - onehot)^2.
``oe``              overconfidence error (Thulasidasan et al. 2019).

Binning convention (kept identical to torchmetrics' ``CalibrationError``, so
``ece``/``mce`` equal ``MulticlassCalibrationError(norm='l1'/'max')``):
boundaries are ``torch.linspace(0, 1, n_bins + 1)`` in float32 and a
confidence ``c`` lands in bin ``k`` with ``b[k] <= c < b[k+1]`` (left-closed;
Guo et al.'s reference code is right-closed, so a confidence exactly on an
edge such as 1/15 goes one bin higher here). A confidence of exactly 1.0 gets
an extra bin of its own, as in torchmetrics; merging it into the last bin
could only lower ECE (triangle inequality). Confidences are binned as float32
like torchmetrics does; per-bin sums are accumulated in float64. Argmax ties
go to the lowest class index (``torch.max``), as in torchmetrics.

Written by hand (not torchmetrics) because torchmetrics has no adaptive,
classwise or overconfidence error, and its metric objects keep every score.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from dataset_tools.atomic import atomic_write_bytes

DEFAULT_BINS = 15
PROB_SUM_TOLERANCE = 1e-3

PathLike = Union[str, os.PathLike]


def check_shapes(scores: torch.Tensor, labels: torch.Tensor, where: str = "scores") -> None:
    """Metadata-only checks (no device sync): scores ``[N, C]`` float with
    C >= 2, labels ``[N]`` integer on the same device."""
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(f"{where}: expected torch tensors, got {type(scores).__name__} "
                         f"and {type(labels).__name__}")
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"{where}: scores must be [N, C] with C >= 2 classes, got shape "
                         f"{tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{where}: scores must be a float tensor, got {scores.dtype}")
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"{where}: labels must be [N] = [{scores.shape[0]}] to match scores "
                         f"{tuple(scores.shape)}, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{where}: labels must be integer class indices, got {labels.dtype}; "
                         "pass hard labels (e.g. soft_targets.argmax(1))")
    if labels.device != scores.device:
        raise ValueError(f"{where}: scores on {scores.device} but labels on {labels.device}; "
                         "move both to the same device")


def validate_inputs(scores: torch.Tensor, labels: torch.Tensor, *, from_logits: bool = True,
                    where: str = "scores") -> None:
    """Eager validation (syncs with the device): shapes, non-empty, finite
    scores, labels in ``[0, C)``, and for probabilities rows summing to 1."""
    check_shapes(scores, labels, where)
    if scores.shape[0] == 0:
        raise ValueError(f"{where}: no samples (N = 0); evaluate on a non-empty set")
    problem = _input_problems(scores, labels, from_logits)
    flags = torch.stack(problem).tolist()
    _raise_for_flags(flags, where, from_logits)


def _input_problems(scores, labels, from_logits) -> list[torch.Tensor]:
    """Device bool scalars: [non-finite scores, labels out of range, bad probs]."""
    c = scores.shape[1]
    bad_values = ~torch.isfinite(scores).all()
    bad_labels = ((labels < 0) | (labels >= c)).any()
    if from_logits:
        bad_probs = torch.zeros((), dtype=torch.bool, device=scores.device)
    else:
        row_err = (scores.double().sum(1) - 1).abs()
        bad_probs = (scores < 0).any() | (row_err > PROB_SUM_TOLERANCE).any()
    return [bad_values, bad_labels, bad_probs]


def _raise_for_flags(flags: Sequence[bool], where: str, from_logits: bool) -> None:
    bad_values, bad_labels, bad_probs = flags
    if bad_values:
        raise ValueError(f"{where}: scores contain NaN or Inf; check the model outputs "
                         "(e.g. fp16 overflow) before measuring calibration")
    if bad_labels:
        raise ValueError(f"{where}: labels out of range [0, C); check the label mapping "
                         "matches the number of classes in the scores")
    if bad_probs:
        raise ValueError(f"{where}: from_logits=False but rows are not probabilities "
                         f"(negative or not summing to 1 within {PROB_SUM_TOLERANCE}); "
                         "pass from_logits=True for raw logits")


def _bin_index(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """torchmetrics' rule: bucketize against float32 linspace edges, right=True,
    minus one; 1.0 lands in the extra bin ``n_bins`` (clamped for rounding)."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=values.device)
    idx = torch.bucketize(values.float().contiguous(), edges, right=True) - 1
    return idx.clamp_(0, n_bins)


def _binned_sums(bins: torch.Tensor, conf: torch.Tensor, hit: torch.Tensor, n_slots: int):
    """Per-bin count, sum of confidence and sum of hits (float64)."""
    shape = (n_slots,)
    count = torch.zeros(shape, dtype=torch.float64, device=conf.device)
    s_conf = torch.zeros_like(count)
    s_hit = torch.zeros_like(count)
    count.scatter_add_(0, bins, torch.ones_like(conf, dtype=torch.float64))
    s_conf.scatter_add_(0, bins, conf.double())
    s_hit.scatter_add_(0, bins, hit.double())
    return count, s_conf, s_hit


def _bin_errors(count, s_conf, s_hit, n_total: int) -> dict[str, float]:
    """ECE, MCE and OE from per-bin sums."""
    nonempty = count > 0
    safe = count.clamp(min=1)
    mean_conf, mean_acc = s_conf / safe, s_hit / safe
    gap = (mean_acc - mean_conf).abs()
    weight = count / n_total
    ece = (weight * gap).sum()
    mce = torch.where(nonempty, gap, torch.zeros_like(gap)).max()
    oe = (weight * mean_conf * (mean_conf - mean_acc).clamp(min=0)).sum()
    return {"ece": float(ece), "mce": float(mce), "oe": float(oe)}


def _adaptive_ece(conf: torch.Tensor, hit: torch.Tensor, n_bins: int) -> float:
    """Equal-mass bins: sort confidences (stable, so ties keep sample order) and
    give the sample of rank r bin ``r * n_bins // N``; bin sizes differ by at
    most one. Equal confidences can straddle a bin boundary."""
    n = conf.shape[0]
    order = torch.sort(conf, stable=True).indices
    bins = torch.arange(n, device=conf.device) * n_bins // n
    count, s_conf, s_hit = _binned_sums(bins, conf[order], hit[order], n_bins)
    return float(((s_hit - s_conf).abs() / n).sum())


def _one_hot(y: torch.Tensor, c: int) -> torch.Tensor:
    # Comparison instead of F.one_hot, whose range checks may sync on CUDA.
    return y[:, None] == torch.arange(c, device=y.device)[None, :]


def _label_ranks(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of the label's score; ties count as ranked above the label
    only for lower class indices (consistent with argmax's lowest-index rule)."""
    s_y = probs.gather(1, labels[:, None])
    cls = torch.arange(probs.shape[1], device=probs.device)
    ahead = (probs > s_y) | ((probs == s_y) & (cls[None, :] < labels[:, None]))
    return ahead.sum(1)


class CalibrationMeter:
    """Accumulates calibration statistics over batches without host syncs.

    Per sample it keeps only the top-label confidence, correctness, top-k hits,
    NLL and Brier term on the input device (~15 bytes/sample; adaptive ECE needs
    every confidence), and per-class bin sums for classwise ECE. Input problems
    (NaN, labels out of range) are flagged on device and raised in compute().
    """

    def __init__(self, n_bins: int = DEFAULT_BINS, *, from_logits: bool = True,
                 topk: Sequence[int] = (1, 5)):
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        if not topk or any(int(k) < 1 for k in topk):
            raise ValueError(f"topk must be positive ints, got {topk!r}")
        self.n_bins = n_bins
        self.from_logits = from_logits
        self.topk = tuple(int(k) for k in topk)
        self.reset()

    def reset(self) -> None:
        self.num_classes: Optional[int] = None
        self._conf: list[torch.Tensor] = []
        self._hit: list[torch.Tensor] = []
        self._topk_hit: list[torch.Tensor] = []
        self._nll: list[torch.Tensor] = []
        self._brier: list[torch.Tensor] = []
        self._cls_sums: Optional[torch.Tensor] = None  # [3, C, n_bins + 1]
        self._flags: Optional[torch.Tensor] = None  # [3] bool, see _input_problems

    @torch.no_grad()
    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        check_shapes(scores, labels, "CalibrationMeter.update")
        n, c = scores.shape
        if self.num_classes is None:
            self.num_classes = c
        elif c != self.num_classes:
            raise ValueError(f"CalibrationMeter.update: got {c} classes after "
                             f"{self.num_classes}; use one meter per label space")
        if n == 0:
            return
        flags = torch.stack(_input_problems(scores, labels, self.from_logits))
        self._flags = flags if self._flags is None else self._flags | flags
        # Clamp so a bad label cannot trigger a device-side assert; compute() raises.
        y = labels.long().clamp(0, c - 1)
        work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        if self.from_logits:
            logp = F.log_softmax(work, dim=1)
            probs = logp.exp()
            nll = -logp.gather(1, y[:, None]).squeeze(1)
        else:
            probs = work
            nll = -torch.log(probs.gather(1, y[:, None]).squeeze(1))
        conf, pred = probs.max(dim=1)
        ranks = _label_ranks(probs, y)
        onehot = _one_hot(y, c)
        brier = (probs - onehot.to(probs.dtype)).square().sum(1)
        self._conf.append(conf.float())
        self._hit.append(pred == y)
        self._topk_hit.append(torch.stack([ranks < k for k in self.topk], dim=1))
        self._nll.append(nll.float())
        self._brier.append(brier.float())
        self._accumulate_classwise(probs, onehot)

    def _accumulate_classwise(self, probs: torch.Tensor, onehot: torch.Tensor) -> None:
        c, slots = probs.shape[1], self.n_bins + 1
        flat = (_bin_index(probs, self.n_bins)
                + torch.arange(c, device=probs.device)[None, :] * slots).reshape(-1)
        count, s_p, s_y = _binned_sums(flat, probs.reshape(-1),
                                       onehot.reshape(-1), c * slots)
        sums = torch.stack([count, s_p, s_y]).view(3, c, slots)
        self._cls_sums = sums if self._cls_sums is None else self._cls_sums + sums

    def __len__(self) -> int:
        return sum(t.shape[0] for t in self._conf)

    def _gathered(self):
        if not self._conf:
            raise ValueError("CalibrationMeter: no samples were added; call update() "
                             "with at least one non-empty batch before compute()")
        _raise_for_flags(self._flags.tolist(), "CalibrationMeter", self.from_logits)
        return torch.cat(self._conf), torch.cat(self._hit)

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        conf, hit = self._gathered()
        n = conf.shape[0]
        out: dict[str, float] = {}
        topk_acc = torch.cat(self._topk_hit).double().mean(0).tolist()
        for k, acc in zip(self.topk, topk_acc):
            out[f"top{k}"] = acc
        bins = _bin_index(conf, self.n_bins)
        out.update(_bin_errors(*_binned_sums(bins, conf, hit, self.n_bins + 1), n))
        out["adaptive_ece"] = _adaptive_ece(conf, hit, self.n_bins)
        count, s_p, s_y = self._cls_sums
        out["classwise_ece"] = float(((s_y - s_p).abs().sum(1) / n).mean())
        # mean top-label confidence: confidence - top1 > 0 is over-confidence
        out["confidence"] = float(conf.double().mean()) if n else float("nan")
        out["nll"] = float(torch.cat(self._nll).double().mean())
        out["brier"] = float(torch.cat(self._brier).double().mean())
        out["n"] = n
        return out

    def reliability_diagram(self, path: PathLike, title: Optional[str] = None) -> Path:
        conf, hit = self._gathered()
        return _plot_reliability(conf.cpu(), hit.cpu(), Path(path), title, self.n_bins)


def calibration_metrics(scores: torch.Tensor, labels: torch.Tensor, *, from_logits: bool = True,
                        n_bins: int = DEFAULT_BINS, topk: Sequence[int] = (1, 5)
                        ) -> dict[str, float]:
    """All metrics of this module on one set of scores ``[N, C]`` and labels ``[N]``.
    Raises ValueError on empty, non-finite or mismatched input."""
    validate_inputs(scores, labels, from_logits=from_logits, where="calibration_metrics")
    meter = CalibrationMeter(n_bins, from_logits=from_logits, topk=topk)
    meter.update(scores, labels)
    return meter.compute()


@torch.no_grad()
def expected_calibration_error(scores: torch.Tensor, labels: torch.Tensor, *,
                               from_logits: bool = True, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE alone (cheaper than calibration_metrics); same binning."""
    validate_inputs(scores, labels, from_logits=from_logits, where="expected_calibration_error")
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    probs = work.softmax(1) if from_logits else work
    conf, pred = probs.max(dim=1)
    conf = conf.float()
    sums = _binned_sums(_bin_index(conf, n_bins), conf, pred == labels, n_bins + 1)
    return _bin_errors(*sums, conf.shape[0])["ece"]


@torch.no_grad()
def ece_noise_floor(scores: torch.Tensor, *, from_logits: bool = True, n_bins: int = DEFAULT_BINS,
                    draws: int = 200, seed: int = 0) -> float:
    """The binned ECE a perfectly calibrated model with these confidences
    would show on this many samples: each sample's top-label correctness is
    drawn as Bernoulli(its confidence), ``draws`` times (seeded), and the
    mean ECE is returned. The binned estimator is biased upwards by sampling
    noise (~0.03 on 2,000 samples at 40 % accuracy); ECEs near this floor,
    and differences smaller than it, say nothing about calibration.
    Hand-written: torchmetrics has the ECE, not its expectation under
    perfect calibration."""
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    conf = (work.softmax(1) if from_logits else work).max(dim=1).values.float()
    bins = _bin_index(conf, n_bins)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        hit = torch.rand(conf.shape, generator=gen).to(conf.device) < conf
        total += _bin_errors(*_binned_sums(bins, conf, hit, n_bins + 1), conf.shape[0])["ece"]
    return total / draws


@torch.no_grad()
def reliability_curve(scores: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS, *,
                      from_logits: bool = True) -> dict[str, torch.Tensor]:
    """The reliability curve: per non-empty bin (this module's binning, so
    ``sum(count * |accuracy - confidence|) / N`` is ``ece``) the mean
    confidence, the accuracy and the sample count, as float64 CPU tensors."""
    validate_inputs(scores, labels, from_logits=from_logits, where="reliability_curve")
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    conf, pred = (work.softmax(1) if from_logits else work).max(dim=1)
    conf = conf.float()
    count, s_conf, s_hit = _binned_sums(_bin_index(conf, n_bins), conf, pred == labels, n_bins + 1)
    keep = count > 0
    return {"confidence": (s_conf / count.clamp(min=1))[keep].cpu(),
            "accuracy": (s_hit / count.clamp(min=1))[keep].cpu(), "count": count[keep].cpu()}


def reliability_diagram(scores: torch.Tensor, labels: torch.Tensor, path: PathLike,
                        title: Optional[str] = None, n_bins: int = DEFAULT_BINS, *,
                        from_logits: bool = True) -> Path:
    """Write a reliability diagram PNG to ``path`` (atomically) and return the path."""
    validate_inputs(scores, labels, from_logits=from_logits, where="reliability_diagram")
    meter = CalibrationMeter(n_bins, from_logits=from_logits, topk=(1,))
    meter.update(scores, labels)
    return meter.reliability_diagram(path, title)


def _plot_reliability(conf: torch.Tensor, hit: torch.Tensor, path: Path,
                      title: Optional[str], n_bins: int) -> Path:
    # Figure + Agg canvas directly (no pyplot): no global backend state, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = conf.shape[0]
    count, s_conf, s_hit = _binned_sums(_bin_index(conf, n_bins), conf, hit, n_bins + 1)
    ece = _bin_errors(count, s_conf, s_hit, n)["ece"]
    # Display only: fold the exact-1.0 bin into the last bar (ECE above keeps it separate).
    count, s_conf, s_hit = (torch.cat([t[:-2], t[-2:].sum(0, keepdim=True)])
                            for t in (count, s_conf, s_hit))
    safe = count.clamp(min=1)
    acc, mconf = (s_hit / safe).numpy(), (s_conf / safe).numpy()
    filled = (count > 0).numpy()
    width = 1.0 / n_bins
    centers = (torch.arange(n_bins, dtype=torch.float64) + 0.5).numpy() * width

    fig = Figure(figsize=(5, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[filled], acc[filled], width=width, color="tab:blue", edgecolor="black",
            linewidth=0.6, label="Accuracy")
    top.bar(centers[filled], (mconf - acc)[filled], bottom=acc[filled], width=width,
            color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="Gap")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="Perfect calibration")
    handles, labels_ = top.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none"))
    labels_.append(f"ECE = {100 * ece:.2f}% ({n_bins} bins, N = {n})")
    top.legend(handles, labels_, loc="upper left", fontsize=8)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy", title=title or "Reliability diagram")
    bottom.bar(centers, (count / n).numpy(), width=width, color="tab:gray", edgecolor="black",
               linewidth=0.6)
    bottom.axvline(float(conf.double().mean()), color="tab:red", linestyle="--",
                   label="Mean confidence")
    bottom.axvline(float(hit.double().mean()), color="tab:blue", linestyle="-",
                   label="Accuracy")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="Confidence", ylabel="Fraction of samples")

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path
