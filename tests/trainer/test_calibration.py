"""Calibration metrics against independent oracles.

ECE/MCE: torchmetrics' MulticlassCalibrationError (our code does not call it).
Everything else: hand-computed small cases, F.cross_entropy, direct counts.
torchmetrics is always given probabilities: on raw scores it guesses "logits
or probabilities?" from the value range, which would make the oracle depend
on the data.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

from trainer.evaluation.calibration import (CalibrationMeter, calibration_metrics,
                                 expected_calibration_error, reliability_diagram)

BINS = 15
EDGES = torch.linspace(0, 1, BINS + 1, dtype=torch.float32)  # torchmetrics' own edges


def tm_errors(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = BINS) -> tuple[float, float]:
    c = probs.shape[1]
    out = []
    for norm in ("l1", "max"):
        metric = MulticlassCalibrationError(num_classes=c, n_bins=n_bins, norm=norm)
        metric.update(probs, labels)
        out.append(float(metric.compute()))
    return out[0], out[1]


def assert_matches_torchmetrics(probs, labels, n_bins=BINS):
    ours = calibration_metrics(probs, labels, from_logits=False, n_bins=n_bins)
    ece, mce = tm_errors(probs, labels, n_bins)
    # torchmetrics sums in float32, we in float64: agree to float32 rounding.
    assert ours["ece"] == pytest.approx(ece, abs=2e-6)
    assert ours["mce"] == pytest.approx(mce, abs=2e-6)
    return ours


def probs_with_max(top: torch.Tensor, c: int, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """Rows whose largest entry is exactly ``top`` (at ``argmax``, default 0),
    the rest spread evenly (needs (1 - top) / (c - 1) < top)."""
    n = top.shape[0]
    rest = ((1 - top.double()) / (c - 1)).float()
    p = rest[:, None].repeat(1, c)
    col = torch.zeros(n, dtype=torch.long) if argmax is None else argmax
    p[torch.arange(n), col] = top
    return p


@pytest.mark.parametrize("seed,n,c,scale", [
    (0, 7, 2, 1.0), (1, 100, 10, 3.0), (2, 5000, 10, 2.0), (3, 2000, 100, 5.0), (4, 513, 3, 0.3),
])
def test_ece_mce_match_torchmetrics_random(seed, n, c, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    labels = torch.randint(0, c, (n,), generator=g)
    ours = assert_matches_torchmetrics(logits.softmax(1), labels)
    # The logits path must give the same numbers as the probability path.
    from_logits = calibration_metrics(logits, labels)
    assert from_logits["ece"] == pytest.approx(ours["ece"], abs=1e-6)
    assert from_logits["mce"] == pytest.approx(ours["mce"], abs=1e-6)
    assert expected_calibration_error(logits, labels) == pytest.approx(ours["ece"], abs=1e-6)


def test_confidences_exactly_on_bin_edges():
    # Max prob exactly equal to every edge k/15 (as float32 linspace values), k = 1..15.
    # Convention (same as torchmetrics): bins are left-closed [k/15, (k+1)/15), so an
    # edge value goes to the bin *above* it; Guo et al.'s code is right-closed.
    # Mid-bin samples too, so moving an edge sample to the neighbouring bin changes ECE.
    g = torch.Generator().manual_seed(0)
    top = torch.cat([EDGES[1:], (EDGES[:-1] + EDGES[1:]) / 2]).repeat(4)
    labels = torch.randint(0, 40, (top.shape[0],), generator=g)
    labels[::3] = 0  # argmax is class 0: a mix of right and wrong predictions
    assert_matches_torchmetrics(probs_with_max(top, 40), labels)


def test_bin_edge_goes_to_upper_bin_hand_computed():
    # conf 1/15 (wrong) and 1.5/15 (right), 15 bins: both land in bin [1/15, 2/15).
    top = torch.stack([EDGES[1], (EDGES[1] + EDGES[2]) / 2])
    probs = probs_with_max(top, 20)
    labels = torch.tensor([5, 0])
    m = calibration_metrics(probs, labels, from_logits=False)
    mean_conf = float(top.double().mean())
    assert m["ece"] == pytest.approx(abs(0.5 - mean_conf), abs=1e-7)
    # Right-closed binning would split them and give 0.5 * (1/15) + 0.5 * (1 - 1.5/15).
    assert m["ece"] != pytest.approx(0.5 / 15 + 0.5 * (1 - 1.5 / 15), abs=1e-3)


def test_confidence_exactly_one():
    # torchmetrics gives conf == 1.0 its own extra bin; we follow it. Hand case where
    # this matters: conf 1.0 wrong (gap 1.0) and conf 0.94 right (gap 0.06).
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.94, 0.03, 0.03]])
    labels = torch.tensor([1, 0])
    m = assert_matches_torchmetrics(probs, labels)
    assert m["ece"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.06, abs=1e-6)  # separate bins
    assert m["mce"] == pytest.approx(1.0, abs=1e-6)
    # Many saturated predictions mixed with others in the top bin.
    g = torch.Generator().manual_seed(1)
    top = torch.where(torch.rand(300, generator=g) < 0.5, torch.tensor(1.0),
                      0.94 + 0.05 * torch.rand(300, generator=g))
    labels = torch.randint(0, 2, (300,), generator=g)
    assert_matches_torchmetrics(probs_with_max(top, 5), labels)


def test_all_samples_in_one_bin():
    g = torch.Generator().manual_seed(2)
    top = 0.6 + 0.06 * torch.rand(500, generator=g)  # all in [9/15, 10/15)
    labels = torch.randint(0, 2, (500,), generator=g)
    m = assert_matches_torchmetrics(probs_with_max(top, 4), labels)
    acc = float((labels == 0).double().mean())
    assert m["ece"] == pytest.approx(abs(acc - float(top.double().mean())), abs=1e-6)
    assert m["mce"] == pytest.approx(m["ece"], abs=1e-9)  # one bin: max == mean


def test_argmax_ties():
    # Integer logits over 5 classes: many rows have tied maxima. Ties go to the lowest
    # index (torch.max), exactly as in torchmetrics.
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 3, (400, 5), generator=g).float()
    labels = torch.randint(0, 5, (400,), generator=g)
    assert_matches_torchmetrics(logits.softmax(1), labels)
    tie = torch.tensor([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])
    assert calibration_metrics(tie, torch.tensor([0, 0]), from_logits=False)["top1"] == 1.0
    assert calibration_metrics(tie, torch.tensor([1, 1]), from_logits=False)["top1"] == 0.0


def test_single_sample():
    probs = torch.tensor([[0.2, 0.7, 0.1]])
    m = assert_matches_torchmetrics(probs, torch.tensor([2]))
    assert m["ece"] == pytest.approx(0.7, abs=1e-6)
    m = assert_matches_torchmetrics(probs, torch.tensor([1]))
    assert m["ece"] == pytest.approx(0.3, abs=1e-6)
    assert m["adaptive_ece"] == pytest.approx(0.3, abs=1e-6)


def test_perfectly_calibrated_synthetic_data():
    # Labels drawn from the predicted distribution itself, so P(correct | conf) = conf
    # exactly. Binned ECE still has a positive finite-sample bias: per bin |acc - conf|
    # ~ sqrt(acc(1-acc)/n_b), so E[ECE] <~ sqrt(2/pi) * 0.5 * sqrt(bins/N) = 0.005 for
    # N = 1e5; we allow 0.01. Control: the same data made overconfident fails it.
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(100_000, 10, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    m = assert_matches_torchmetrics(logits.softmax(1), labels)
    assert m["ece"] < 0.01
    assert m["adaptive_ece"] < 0.01
    assert m["classwise_ece"] < 0.01
    assert m["oe"] < 0.01
    assert calibration_metrics(logits * 3, labels)["ece"] > 0.1


def test_confident_and_always_wrong():
    g = torch.Generator().manual_seed(5)
    top = 0.5 + 0.5 * torch.rand(1000, generator=g)
    labels = torch.randint(1, 6, (1000,), generator=g)  # argmax is class 0: never right
    m = assert_matches_torchmetrics(probs_with_max(top, 6), labels)
    mean_conf = float(top.double().mean())
    assert m["top1"] == 0.0
    assert m["ece"] == pytest.approx(mean_conf, abs=1e-6)
    assert m["adaptive_ece"] == pytest.approx(mean_conf, abs=1e-6)
    # acc_b = 0 in every bin, so OE = sum_b (n_b/N) conf_b^2 with conf_b the bin mean.
    bins = {}
    for c in top.double().tolist():  # random floats: none sits exactly on an edge
        bins.setdefault(int(c * BINS), []).append(c)
    expected = sum(len(v) / 1000 * (sum(v) / len(v)) ** 2 for v in bins.values())
    assert m["oe"] == pytest.approx(expected, abs=1e-6)


def test_adaptive_ece_hand_computed():
    # 6 samples, 3 equal-mass bins of 2 after sorting by confidence.
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.95])
    labels = torch.tensor([0, 1, 0, 0, 1, 0])  # argmax class 0: right, wrong, right, right, wrong, right
    m = calibration_metrics(probs_with_max(conf, 2), labels, from_logits=False, n_bins=3)
    # bins: {0.55 w, 0.6 r}, {0.7 r, 0.8 w}, {0.9 r, 0.95 r}
    expected = (2 / 6) * (abs(0.5 - 0.575) + abs(0.5 - 0.75) + abs(1.0 - 0.925))
    assert m["adaptive_ece"] == pytest.approx(expected, abs=1e-6)
    # 5 samples, 2 bins: rank r -> bin r*2//5, sizes 3 and 2.
    m = calibration_metrics(probs_with_max(conf[:5], 2), labels[:5], from_logits=False, n_bins=2)
    expected = (3 / 5) * abs(2 / 3 - (0.55 + 0.6 + 0.7) / 3) + (2 / 5) * abs(0.5 - 0.85)
    assert m["adaptive_ece"] == pytest.approx(expected, abs=1e-6)


def test_classwise_ece_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.1, 0.3]])
    labels = torch.tensor([0, 0, 2, 1])
    m = calibration_metrics(probs, labels, from_logits=False, n_bins=2)  # bins [0,.5) [.5,1)
    n = 4
    # class 0: p = .7 .1 .3 .6, y = 1 1 0 0; low bin {.1,.3}: |1 - .4|; high {.7,.6}: |1 - 1.3|
    c0 = (abs(1 - 0.4) + abs(1 - 1.3)) / n
    # class 1: p = .2 .8 .3 .1, y = 0 0 0 1; low {.2,.3,.1}: |1 - .6|; high {.8}: |0 - .8|
    c1 = (abs(1 - 0.6) + abs(0 - 0.8)) / n
    # class 2: p = .1 .1 .4 .3, y = 0 0 1 0; all low: |1 - .9|
    c2 = abs(1 - 0.9) / n
    assert m["classwise_ece"] == pytest.approx((c0 + c1 + c2) / 3, abs=1e-6)


def test_overconfidence_error_hand_computed():
    # 2 bins. Low bin [0, .5): conf .4 right, .3 right -> under-confident, contributes 0.
    # High bin [.5, 1): .9 wrong, .7 right, .8 wrong -> acc 1/3, conf .8.
    conf = torch.tensor([0.4, 0.3, 0.9, 0.7, 0.8])
    labels = torch.tensor([0, 0, 1, 0, 1])
    m = calibration_metrics(probs_with_max(conf, 10), labels, from_logits=False, n_bins=2)
    assert m["oe"] == pytest.approx((3 / 5) * 0.8 * (0.8 - 1 / 3), abs=1e-6)
    assert m["ece"] == pytest.approx((2 / 5) * abs(1 - 0.35) + (3 / 5) * abs(1 / 3 - 0.8), abs=1e-6)


def test_brier_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 2])
    m = calibration_metrics(probs, labels, from_logits=False)
    row0 = 0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2
    row1 = 0.1 ** 2 + 0.8 ** 2 + 0.9 ** 2
    assert m["brier"] == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_nll_matches_cross_entropy():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3000, 50, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 50, (3000,), generator=g)
    ref = float(F.cross_entropy(logits, labels))
    assert calibration_metrics(logits, labels)["nll"] == pytest.approx(ref, rel=1e-6)
    probs = logits.softmax(1)
    assert calibration_metrics(probs, labels, from_logits=False)["nll"] == pytest.approx(ref, rel=1e-6)
    assert calibration_metrics(logits.float(), labels)["nll"] == pytest.approx(ref, rel=1e-5)


def test_topk_matches_direct_count():
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(0, 6, (500, 12), generator=g).float()  # many ties
    labels = torch.randint(0, 12, (500,), generator=g)
    m = calibration_metrics(logits, labels, topk=(1, 2, 5))
    # Direct count: stable descending sort keeps the lower class index first among ties.
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    for k in (1, 2, 5):
        hits = sum(int(labels[i]) in order[i, :k].tolist() for i in range(500))
        assert m[f"top{k}"] == pytest.approx(hits / 500, abs=1e-12)
    assert m["top1"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()))


def test_meter_equals_one_shot_on_concatenated_batches():
    g = torch.Generator().manual_seed(8)
    sizes = [37, 0, 128, 1, 300]
    batches = [(torch.randn(s, 20, generator=g) * 3, torch.randint(0, 20, (s,), generator=g))
               for s in sizes]
    meter = CalibrationMeter()
    for x, y in batches:
        meter.update(x, y)
    x_all = torch.cat([b[0] for b in batches])
    y_all = torch.cat([b[1] for b in batches])
    got, ref = meter.compute(), calibration_metrics(x_all, y_all)
    assert len(meter) == sum(sizes) and got["n"] == sum(sizes)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert got["ece"] == pytest.approx(tm_errors(x_all.softmax(1), y_all)[0], abs=2e-6)


def test_reliability_diagram_png(tmp_path):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2000, 10, generator=g) * 3
    labels = torch.randint(0, 10, (2000,), generator=g)
    out = reliability_diagram(logits, labels, tmp_path / "plots" / "rel.png", title="test")
    assert out.exists() and out.stat().st_size > 10_000
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert 300 <= im.width <= 2000 and 300 <= im.height <= 2000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["rel.png"]  # no temp left
    meter = CalibrationMeter()
    meter.update(logits, labels)
    with Image.open(meter.reliability_diagram(tmp_path / "meter.png")) as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("case,match", [
    ("empty", "no samples"), ("nan", "NaN"), ("shape", "labels must be"),
    ("range", "out of range"), ("float_labels", "integer"), ("not_probs", "from_logits"),
])
def test_invalid_input_raises(case, match):
    x, y, from_logits = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), True
    if case == "empty":
        x, y = x[:0], y[:0]
    elif case == "nan":
        x[1, 2] = float("nan")
    elif case == "shape":
        y = y[:3]
    elif case == "range":
        y = torch.tensor([0, 1, 3, 0])
    elif case == "float_labels":
        y = y.float()
    elif case == "not_probs":
        from_logits = False
    with pytest.raises(ValueError, match=match):
        calibration_metrics(x, y, from_logits=from_logits)


def test_meter_defers_input_errors_to_compute():
    meter = CalibrationMeter()
    meter.update(torch.randn(4, 3), torch.tensor([0, 1, 7, 0]))  # no host sync here
    with pytest.raises(ValueError, match="out of range"):
        meter.compute()
    with pytest.raises(ValueError, match="no samples"):
        CalibrationMeter().compute()
    meter = CalibrationMeter()
    meter.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="classes"):
        meter.update(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(4000, 100, generator=g) * 3
    labels = torch.randint(0, 100, (4000,), generator=g)
    cpu = calibration_metrics(logits, labels)
    meter = CalibrationMeter()
    for xb, yb in zip(logits.cuda().split(999), labels.cuda().split(999)):
        meter.update(xb, yb)
    gpu = meter.compute()
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-5), key


def test_ece_noise_floor_is_the_ece_of_a_perfectly_calibrated_model():
    """Labels drawn from the model's own softmax make it calibrated by
    construction; torchmetrics' ECE on such labels, averaged over draws, is
    the floor (an independent computation: full labels, not top-label hits)."""
    from torchmetrics.classification import MulticlassCalibrationError

    from trainer.evaluation.calibration import ece_noise_floor

    torch.manual_seed(1)
    logits = torch.randn(2000, 10) * 2.0
    probs = logits.softmax(1)
    metric = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    gen = torch.Generator().manual_seed(2)
    oracle = sum(float(metric(probs, torch.multinomial(probs, 1, generator=gen).squeeze(1)))
                 for _ in range(100)) / 100
    floor = ece_noise_floor(logits, draws=200)
    assert floor == pytest.approx(oracle, rel=0.1)
    assert ece_noise_floor(logits[:400]) > 1.5 * floor  # fewer samples, a higher floor
    assert ece_noise_floor(logits, seed=3) == pytest.approx(floor, rel=0.05)
