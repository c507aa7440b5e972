"""Tests for pipelines/mixing.py (CPU, and the same on CUDA when present).

Oracles are independent of the module: images whose pixels encode (sample id,
row, column) let us count replaced pixels and see where they came from; box
scaling is checked against exact rational arithmetic (fractions.Fraction).
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from pipelines.batch import Batch, MixParams
from pipelines.mixing import (MixConfig, Mixer, apply_mix, box_edges, choose_mode, draw_params,
                              generator_for, kept_fraction, teacher_lam_bound)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"))]

MIXUP = MixConfig(p_mixup=1.0)
CUTMIX = MixConfig(p_cutmix=1.0)
CUTOUT = MixConfig(p_cutout=1.0, cutout_fraction=0.5)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def coded_images(B: int, H: int, W: int, device) -> torch.Tensor:
    """Channel 0 = sample id + 1 (identifies a pixel's source), channel 1 = row,
    channel 2 = column (a pasted pixel must come from the same location)."""
    ids = torch.arange(B, dtype=torch.float32).view(B, 1, 1).expand(B, H, W) + 1
    rows = torch.arange(H, dtype=torch.float32).view(1, H, 1).expand(B, H, W)
    cols = torch.arange(W, dtype=torch.float32).view(1, 1, W).expand(B, H, W)
    return torch.stack([ids, rows, cols], dim=1).to(device)


def make_batch(B=8, hw=(8, 8), teacher_hw=None, device="cpu", coded=True, seed=0) -> Batch:
    h, w = hw
    if coded:
        student = coded_images(B, h, w, device)
        teacher = coded_images(B, *teacher_hw, device) if teacher_hw else None
    else:
        g = torch.Generator().manual_seed(seed)
        student = torch.randn(B, 3, h, w, generator=g).to(device)
        teacher = torch.randn(B, 3, *teacher_hw, generator=g).to(device) if teacher_hw else None
    return Batch(student=student, labels=torch.arange(B, device=device) % 5,
                 indices=torch.arange(B, device=device),
                 boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).repeat(B, 1),
                 flips=torch.zeros(B, dtype=torch.bool, device=device),
                 view_ids=torch.zeros(B, dtype=torch.long, device=device), teacher=teacher)


def source_ids(x: torch.Tensor) -> torch.Tensor:
    """Which sample each pixel came from (long [B, H, W])."""
    return x[:, 0].round().long().cpu() - 1


def hand_edges(box, grid_hw, image_hw):
    """Exact pixel edges (y0, x0, y1, x1) of a normalized grid box on an image:
    each edge round-half-up(edge_px * H / h), in rationals."""
    (h, w), (H, W) = grid_hw, image_hw
    y0, x0 = round(float(box[0]) * h), round(float(box[1]) * w)
    y1, x1 = y0 + round(float(box[2]) * h), x0 + round(float(box[3]) * w)
    r = lambda e, n, d: math.floor(Fraction(e * n, d) + Fraction(1, 2))  # noqa: E731
    return r(y0, H, h), r(x0, W, w), r(y1, H, h), r(x1, W, w)


def rect_masks(edges, hw) -> torch.Tensor:
    """Bool [B, H, W], True inside each (y0, x0, y1, x1) given as Python ints
    (one vectorized comparison: elementwise per-pixel loops are too slow on a
    busy 2-core machine)."""
    e = torch.tensor(edges, dtype=torch.long).view(-1, 4, 1, 1)
    rows = torch.arange(hw[0]).view(1, -1, 1)
    cols = torch.arange(hw[1]).view(1, 1, -1)
    return (rows >= e[:, 0]) & (rows < e[:, 2]) & (cols >= e[:, 1]) & (cols < e[:, 3])


def assert_valid_perm(perm: torch.Tensor, B: int):
    assert perm.dtype == torch.long and perm.shape == (B,)
    assert torch.equal(perm.cpu().sort().values, torch.arange(B))


# ------------------------------------------------------------------- mixup

def test_mixup_exact_formula(device):
    batch = make_batch(B=16, hw=(8, 8), teacher_hw=(32, 32), device=device, coded=False)
    out = Mixer(MIXUP, seed=3)(batch, step=7)
    m = out.mix
    assert m.mode == "mixup" and m.boxes is None and m.perm.device.type == device.type
    assert_valid_perm(m.perm, 16)
    lam = m.lam.view(-1, 1, 1, 1)
    # computed as one lerp: equal to the textbook formula up to float rounding
    torch.testing.assert_close(out.student, lam * batch.student + (1 - lam) * batch.student[m.perm],
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.teacher, lam * batch.teacher + (1 - lam) * batch.teacher[m.perm],
                               atol=1e-6, rtol=1e-6)
    assert len(set(m.lam.tolist())) > 1  # per-sample lambdas


def test_mixup_lambda_distribution_and_per_batch_option():
    lams = torch.cat([draw_params(MIXUP, 0, s, 32, 8, 8).lam for s in range(200)])
    assert lams.min() > 0 and lams.max() < 1
    assert abs(lams.mean().item() - 0.5) < 0.02  # Beta(1,1): mean 0.5, SE ~0.004
    assert abs(lams.var().item() - 1 / 12) < 0.01  # uniform variance
    per_batch = MixConfig(p_mixup=1.0, per_sample_lambda=False)
    for s in range(5):
        lam = draw_params(per_batch, 0, s, 8, 8, 8).lam
        assert torch.all(lam == lam[0])
    # alpha < 1 puts mass near 0 and 1, alpha > 1 near 0.5
    def spread(alpha):
        cfg = MixConfig(p_mixup=1.0, mixup_alpha=alpha)
        return torch.cat([draw_params(cfg, 0, s, 64, 8, 8).lam for s in range(20)]).std().item()

    assert spread(0.2) > spread(1.0) > spread(8.0)


# ------------------------------------------------------------------ CutMix

@pytest.mark.parametrize("partner", ["randperm", "flip"])
def test_cutmix_lam_is_exact_replaced_fraction(device, partner):
    cfg = MixConfig(p_cutmix=1.0, partner=partner)
    B, h, w = 16, 8, 12
    batch = make_batch(B=B, hw=(h, w), device=device)
    clipped = counted = 0
    for step in range(60):
        out = Mixer(cfg, seed=1)(batch, step)
        m = out.mix
        assert m.mode == "cutmix" and m.target_lam is None
        assert_valid_perm(m.perm, B)
        if partner == "flip":
            assert torch.equal(m.perm.cpu(), torch.arange(B - 1, -1, -1))
        src = source_ids(out.student)
        perm, lam = m.perm.cpu(), m.lam.cpu()
        own = torch.arange(B).view(B, 1, 1)
        # every pixel comes from the sample itself or its partner, same location
        assert torch.all((src == own) | (src == perm.view(B, 1, 1)))
        assert torch.equal(out.student[:, 1:], batch.student[:, 1:])
        for i in torch.nonzero(perm != torch.arange(B)).flatten().tolist():
            replaced = int((src[i] != i).sum())
            assert lam[i] == torch.tensor(1 - replaced / (h * w), dtype=torch.float32)
            # the replaced pixels form exactly the recorded box
            y0, x0, y1, x1 = hand_edges(m.boxes[i].cpu(), (h, w), (h, w))
            expect = torch.zeros(h, w, dtype=torch.bool)
            expect[y0:y1, x0:x1] = True
            assert torch.equal(src[i] != i, expect)
            counted += 1
            if 0 < replaced and (y0 == 0 or x0 == 0 or y1 == h or x1 == w):
                clipped += 1
    assert counted > 200 and clipped > 20  # border-clipped boxes were exercised


@pytest.mark.parametrize("hw,teacher_hw",
                         [((8, 8), (32, 32)), ((8, 12), (24, 48)), ((4, 4), (4, 4))])
def test_cutmix_teacher_integer_multiple_same_box_and_partners(device, hw, teacher_hw):
    B = 12
    batch = make_batch(B=B, hw=hw, teacher_hw=teacher_hw, device=device)
    ky, kx = teacher_hw[0] // hw[0], teacher_hw[1] // hw[1]
    for step in range(20):
        out = Mixer(CUTMIX, seed=5)(batch, step)
        s_src, t_src = source_ids(out.student), source_ids(out.teacher)
        # teacher = student source map upsampled by whole pixels: same partners, same box
        up = s_src.repeat_interleave(ky, dim=1).repeat_interleave(kx, dim=2)
        assert torch.equal(t_src, up)
        moved = (t_src != torch.arange(B).view(B, 1, 1)).sum((1, 2)).double()
        has_partner = out.mix.perm.cpu() != torch.arange(B)
        t_frac = 1 - moved / (teacher_hw[0] * teacher_hw[1])
        assert torch.equal(t_frac.float()[has_partner], out.mix.lam.cpu()[has_partner])
        kf = kept_fraction(out.mix.boxes, hw, teacher_hw).cpu()
        assert torch.equal(kf, out.mix.lam.cpu())
        assert teacher_lam_bound(hw, teacher_hw) == 0.0


@pytest.mark.parametrize("hw,teacher_hw", [((16, 16), (24, 24)), ((24, 24), (224, 224)),
                                           ((7, 10), (16, 23))])
def test_cutmix_teacher_non_integer_scale_rounds_edges_within_bound(device, hw, teacher_hw):
    B = 16
    batch = make_batch(B=B, hw=hw, teacher_hw=teacher_hw, device=device)
    bound = teacher_lam_bound(hw, teacher_hw)
    max_diff = 0.0
    for step in range(15):
        out = Mixer(CUTMIX, seed=2)(batch, step)
        m = out.mix
        t_src = source_ids(out.teacher)
        perm = m.perm.cpu()
        edges = [hand_edges(box, hw, teacher_hw) for box in m.boxes.cpu()]
        inside = rect_masks(edges, teacher_hw)
        # same partner, box scaled with each edge rounded half up at the teacher grid
        expect = torch.where(inside, perm.view(B, 1, 1), torch.arange(B).view(B, 1, 1))
        assert torch.equal(t_src, expect)
        for (y0, x0, y1, x1), lam in zip(edges, m.lam.tolist()):
            t_kept = 1 - (y1 - y0) * (x1 - x0) / (teacher_hw[0] * teacher_hw[1])
            max_diff = max(max_diff, abs(t_kept - lam))
        kf = kept_fraction(m.boxes, hw, teacher_hw).cpu()
        assert torch.all((kf - m.lam.cpu()).abs() <= bound + 1e-6)
    assert max_diff <= bound + 1e-6
    print(f"teacher kept-fraction vs lam, {hw}->{teacher_hw}: max |diff| {max_diff:.5f} "
          f"(bound {bound:.5f})")


def test_box_edges_hand_computed():
    # 16 -> 24 (x1.5): edges 3 -> 4.5 -> 5, 8 -> 12; 16 -> 16 unchanged
    boxes = torch.tensor([[3 / 16, 0.0, 5 / 16, 1.0], [0.0, 15 / 16, 1 / 16, 1 / 16]])
    e = box_edges(boxes, (16, 16), (24, 24))
    assert e.tolist() == [[5, 0, 12, 24], [0, 23, 2, 24]]  # 22.5 -> 23, 1.5 -> 2
    assert box_edges(boxes, (16, 16)).tolist() == [[3, 0, 8, 16], [0, 15, 1, 16]]
    # empty box stays empty (lam = 1)
    empty = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert box_edges(empty, (8, 8), (20, 20)).tolist() == [[10, 10, 10, 10]]


# ------------------------------------------------------------------ cutout

def test_cutout_zeroes_box_and_keeps_targets(device):
    B, h, w = 10, 12, 12
    batch = make_batch(B=B, hw=(h, w), teacher_hw=(36, 36), device=device)
    batch.student[:, 1:] += 1  # make every pixel non-zero
    batch.teacher[:, 1:] += 1
    side = round(0.5 * h)
    interior = 0
    for step in range(30):
        out = Mixer(CUTOUT, seed=4)(batch, step)
        m = out.mix
        assert m.mode == "cutout"
        assert torch.equal(m.perm.cpu(), torch.arange(B)) and torch.all(m.target_lam == 1)
        assert torch.equal(out.one_hot(5), torch.nn.functional.one_hot(batch.labels, 5).float())
        for view, hw in ((out.student, (h, w)), (out.teacher, (36, 36))):
            zero = (view == 0).all(1).cpu()
            edges = [hand_edges(box, (h, w), hw) for box in m.boxes.cpu()]
            assert torch.equal(zero, rect_masks(edges, hw))
        zeros = (out.student == 0).all(1).sum((1, 2)).cpu().double()
        assert torch.equal((1 - zeros / (h * w)).float(), m.lam.cpu())
        bh, bw = (m.boxes[:, 2].cpu() * h).round(), (m.boxes[:, 3].cpu() * w).round()
        interior += int(((bh == side) & (bw == side)).sum())
        assert torch.all(bh <= side) and torch.all(bw <= side)  # clipped, never larger
        unchanged = ~(out.student == 0).all(1, keepdim=True)
        assert torch.equal(out.student[unchanged.expand_as(out.student)],
                           batch.student[unchanged.expand_as(batch.student)])
    assert interior > 0


# -------------------------------------------------------------------- none

def test_none_is_identity(device):
    batch = make_batch(B=6, hw=(8, 8), teacher_hw=(16, 16), device=device, coded=False)
    out = Mixer(MixConfig(), seed=0)(batch, step=3)
    assert out.mix.mode == "none" and torch.all(out.mix.lam == 1)
    assert torch.equal(out.student, batch.student) and torch.equal(out.teacher, batch.teacher)
    assert torch.equal(out.one_hot(5), torch.nn.functional.one_hot(batch.labels, 5).float())


# ------------------------------------------------------ reproducibility etc.

@pytest.mark.parametrize("cfg", [MIXUP, CUTMIX, CUTOUT], ids=["mixup", "cutmix", "cutout"])
def test_reproducible_and_input_untouched(device, cfg):
    batch = make_batch(B=8, hw=(8, 8), teacher_hw=(24, 24), device=device, coded=False)
    before = (batch.student.clone(), batch.teacher.clone())
    a = Mixer(cfg, seed=11)(batch, step=5)
    b = Mixer(cfg, seed=11)(batch, step=5)
    c = Mixer(cfg, seed=11)(batch, step=6)
    d = Mixer(cfg, seed=12)(batch, step=5)
    assert torch.equal(a.student, b.student) and torch.equal(a.teacher, b.teacher)
    assert torch.equal(a.mix.lam, b.mix.lam) and torch.equal(a.mix.perm, b.mix.perm)
    assert not torch.equal(a.student, c.student) and not torch.equal(a.student, d.student)
    assert torch.equal(batch.student, before[0]) and torch.equal(batch.teacher, before[1])
    assert batch.mix is None
    with pytest.raises(ValueError, match="already mixed"):
        Mixer(cfg, seed=11)(a, step=5)


def test_draws_made_ahead_are_each_steps_own():
    """The mixer draws several steps at once; whatever order steps come in
    (a resume jumps, the last batch is smaller), each step's parameters are
    draw_params of that step."""
    mixer = Mixer(MixConfig(p_mixup=0.3, p_cutmix=0.4, p_cutout=0.2), seed=4, ahead=8)
    full, last = make_batch(B=6, hw=(8, 8)), make_batch(B=5, hw=(8, 8))
    for step, batch in ((0, full), (1, full), (7, full), (8, full), (3, full), (9, last), (10, full), (40, full)):
        got, want = mixer.params(batch, step), draw_params(mixer.cfg, 4, step, len(batch), 8, 8)
        assert got.mode == want.mode, step
        for name in ("perm", "lam", "boxes", "target_lam", "mask"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), (step, name)


def test_torchrun_ranks_draw_their_own_params():
    """Rank 0 draws what one process draws; other ranks draw their own
    (reproducibly), so the global batch is not one draw repeated per rank."""
    for step in range(5):
        one = draw_params(CUTMIX, 3, step, 16, 8, 8)
        r0, r1 = (draw_params(CUTMIX, 3, step, 16, 8, 8, rank=r) for r in (0, 1))
        assert torch.equal(one.lam, r0.lam) and torch.equal(one.boxes, r0.boxes)
        assert torch.equal(r1.lam, draw_params(CUTMIX, 3, step, 16, 8, 8, rank=1).lam)
        assert not torch.equal(r0.perm, r1.perm) or not torch.equal(r0.lam, r1.lam)
    assert Mixer(CUTMIX, 3, rank=1).params(make_batch(B=16), 2).lam.equal(
        draw_params(CUTMIX, 3, 2, 16, 8, 8, rank=1).lam)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("cfg", [MIXUP, CUTMIX, CUTOUT], ids=["mixup", "cutmix", "cutout"])
def test_cuda_matches_cpu_and_does_not_sync(cfg):
    cpu = make_batch(B=8, hw=(8, 8), teacher_hw=(20, 20), coded=False)
    gpu = cpu.to("cuda")
    params = Mixer(cfg, seed=9).params(cpu, step=4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_gpu = apply_mix(gpu, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out_cpu = apply_mix(cpu, params)
    assert torch.allclose(out_gpu.student.cpu(), out_cpu.student, rtol=0, atol=1e-6)
    assert torch.allclose(out_gpu.teacher.cpu(), out_cpu.teacher, rtol=0, atol=1e-6)
    assert torch.equal(out_gpu.mix.lam.cpu(), out_cpu.mix.lam)


def test_channels_last_preserved():
    batch = make_batch(B=4, hw=(8, 8), coded=False)
    batch.student = batch.student.contiguous(memory_format=torch.channels_last)
    for cfg in (MIXUP, CUTMIX, CUTOUT):
        out = Mixer(cfg, seed=0)(batch, 1)
        assert out.student.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- targets

@pytest.mark.parametrize("cfg", [MIXUP, CUTMIX], ids=["mixup", "cutmix"])
def test_mix_targets_one_hot_and_teacher_probs(cfg):
    B, C = 12, 7
    batch = make_batch(B=B, hw=(8, 8))
    batch.labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(0))
    out = Mixer(cfg, seed=3)(batch, 2)
    m = out.mix
    oh = torch.nn.functional.one_hot(batch.labels, C).float()
    mixed = out.one_hot(C)
    lam = m.lam.view(-1, 1)
    torch.testing.assert_close(mixed, lam * oh + (1 - lam) * oh[m.perm], rtol=0, atol=1e-7)
    assert torch.allclose(mixed.sum(1), torch.ones(B), rtol=0, atol=1e-6)
    probs = torch.softmax(torch.randn(B, C, generator=torch.Generator().manual_seed(1)), 1)
    mp = m.mix_targets(probs)
    torch.testing.assert_close(mp, lam * probs + (1 - lam) * probs[m.perm], rtol=0, atol=1e-7)
    assert torch.allclose(mp.sum(1), torch.ones(B), rtol=0, atol=1e-6)


# ------------------------------------------------------------- mode choice

def test_mode_frequencies_follow_probabilities():
    cfg = MixConfig(p_mixup=0.3, p_cutmix=0.2, p_cutout=0.1)
    n = 4000
    counts = {"none": 0, "mixup": 0, "cutmix": 0, "cutout": 0}
    for step in range(n):
        counts[choose_mode(cfg, generator_for(7, step))] += 1
    for mode, p in (("mixup", 0.3), ("cutmix", 0.2), ("cutout", 0.1), ("none", 0.4)):
        assert abs(counts[mode] / n - p) < 0.03, counts  # SE <= 0.008
    # draw_params picks the same mode as choose_mode for the same (seed, step)
    for step in range(20):
        assert draw_params(cfg, 7, step, 4, 8, 8).mode == choose_mode(cfg, generator_for(7, step))


def test_config_validation():
    with pytest.raises(ValueError, match="sum to at most 1"):
        MixConfig(p_mixup=0.7, p_cutmix=0.5)
    with pytest.raises(ValueError, match="mixup_alpha"):
        MixConfig(p_mixup=0.5, mixup_alpha=0.0)
    with pytest.raises(ValueError, match="partner"):
        MixConfig(partner="shuffle")
    with pytest.raises(ValueError, match="cutout_fraction"):
        MixConfig(cutout_fraction=0.0)
    cfg = MixConfig(p_cutmix=0.5, per_sample_lambda=False)
    assert MixConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        MixConfig.from_dict({"p_mix": 1.0})
    with pytest.raises(TypeError, match="float"):
        b = make_batch(B=2, hw=(4, 4))
        b.student = b.student.to(torch.uint8)
        Mixer(MIXUP, 0)(b, 0)
    assert isinstance(draw_params(MixConfig(), 0, 0, 3, 4, 4), MixParams)
