"""Losses against hand-computed cases (plain Python math, independent of the
implementation) plus the properties each loss must have."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.distill.ce import soft_cross_entropy
from trainer.distill.crd import CRDLoss
from trainer.distill.kd import kd_loss, teacher_probs
from trainer.distill.loss import DistillLoss
from trainer.distill.loss_config import LossConfig
from trainer.distill.rkd import rkd_loss


# ------------------------------------------------------------ python oracles
def py_softmax(z, t=1.0):
    e = [math.exp((v - max(z)) / t) for v in z]
    return [v / sum(e) for v in e]


def py_huber(a, b):  # smooth-L1 with beta 1
    return 0.5 * (a - b) ** 2 if abs(a - b) < 1 else abs(a - b) - 0.5


def py_dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def py_norm(v):
    return math.sqrt(py_dot(v, v))


def py_sub(a, b):
    return [x - y for x, y in zip(a, b)]


def py_rkd(s, t, w_d, w_a):
    """RKD by its definition: loops over pairs and triplets."""
    n = len(s)

    def dist_matrix(e):
        d = [[py_norm(py_sub(e[i], e[j])) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mean for j in range(n)] for i in range(n)]

    def cos_tensor(e):
        out = {}
        for a in range(n):
            for b in range(n):
                for c in range(n):
                    u, v = py_sub(e[b], e[a]), py_sub(e[c], e[a])
                    nu, nv = py_norm(u), py_norm(v)
                    out[a, b, c] = 0.0 if nu == 0 or nv == 0 else py_dot(u, v) / (nu * nv)
        return out

    ds, dt = dist_matrix(s), dist_matrix(t)
    l_d = sum(py_huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    cs, ct = cos_tensor(s), cos_tensor(t)
    l_a = sum(py_huber(cs[k], ct[k]) for k in cs) / n ** 3
    return w_d * l_d + w_a * l_a


def reference_rkd(s, t, w_d=25.0, w_a=50.0):
    """The difference-tensor formulation of the RKD authors' code (vectorised),
    a second oracle for larger batches."""
    def pdist(e):
        d = (e[:, None] - e[None]).norm(dim=2)
        return d / d[d > 0].mean()

    def angles(e):
        nd = F.normalize(e[None] - e[:, None], p=2, dim=2)
        return torch.bmm(nd, nd.transpose(1, 2))

    return (w_d * F.smooth_l1_loss(pdist(s), pdist(t))
            + w_a * F.smooth_l1_loss(angles(s), angles(t)))


# --------------------------------------------------------------------- CE
def test_soft_cross_entropy_hand_computed():
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    targets = [[0.7, 0.3, 0.0], [0.2, 0.0, 0.8]]
    expected = 0.0
    for z, y in zip(logits, targets):
        p = py_softmax(z)
        expected -= sum(yi * math.log(pi) for yi, pi in zip(y, p))
    expected /= 2
    got = soft_cross_entropy(torch.tensor(logits), torch.tensor(targets))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_equals_cross_entropy_for_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(6, 9) * 3
    labels = torch.randint(0, 9, (6,))
    ref = F.cross_entropy(logits, labels)
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(labels, 9).float()), ref)
    torch.testing.assert_close(soft_cross_entropy(logits, labels), ref)
    with pytest.raises(ValueError, match="match logits"):
        soft_cross_entropy(logits, torch.rand(6, 8))


# --------------------------------------------------------------------- KD
def test_kd_hand_computed_with_mixed_teacher_probabilities():
    t_logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    s_logits = [[1.0, 0.2, 0.3], [-0.5, 2.0, 1.0]]
    temp, lam = 3.0, 0.7
    single = [py_softmax(z, temp) for z in t_logits]
    mixed = [[lam * a + (1 - lam) * b for a, b in zip(single[i], single[1 - i])] for i in range(2)]
    expected = 0.0
    for p, z in zip(mixed, s_logits):
        q = py_softmax(z, temp)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = temp ** 2 * expected / 2

    probs = teacher_probs(torch.tensor(t_logits), temp)
    mixed_t = lam * probs + (1 - lam) * probs[[1, 0]]
    torch.testing.assert_close(mixed_t, torch.tensor(mixed))
    got = kd_loss(torch.tensor(s_logits), mixed_t, temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 8.0])
def test_kd_gradient_identity(temp):
    """d KD / d z = T * (softmax(z / T) - p) / B: the T^2 factor times 1/T from the softmax."""
    s = [[0.3, -1.2, 2.0, 0.1], [1.5, 0.0, -0.5, 0.7]]
    p = [[0.1, 0.2, 0.6, 0.1], [0.25, 0.25, 0.25, 0.25]]
    z = torch.tensor(s, requires_grad=True)
    kd_loss(z, torch.tensor(p), temp).backward()
    expected = [[temp * (qi - pi) / 2 for qi, pi in zip(py_softmax(row, temp), prow)]
                for row, prow in zip(s, p)]
    torch.testing.assert_close(z.grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_kd_gradient_scale_is_constant_for_large_temperature():
    """For zero-mean logits the gradient tends to (z - v) / (C B) as T grows:
    with T^2 it stays put, without it it would shrink like 1/T^2."""
    torch.manual_seed(0)
    z0, v = torch.randn(3, 5), torch.randn(3, 5)
    z0, v = z0 - z0.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    limit = (z0 - v) / (5 * 3)
    grads = {}
    for temp in (50.0, 100.0, 1000.0):
        z = z0.clone().requires_grad_(True)
        kd_loss(z, teacher_probs(v, temp), temp).backward()
        grads[temp] = z.grad
    for temp, g in grads.items():
        assert (g - limit).norm() / limit.norm() < 0.05, temp
    ratio = grads[1000.0].norm() / grads[100.0].norm()
    assert ratio.item() == pytest.approx(1.0, abs=0.01)


def test_kd_zero_for_identical_logits_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(4, 10) * 2
    for temp in (1.0, 4.0):
        assert kd_loss(logits, teacher_probs(logits, temp), temp).abs().item() < 1e-6
        other = logits + torch.randn(4, 10)
        assert kd_loss(other, teacher_probs(logits, temp), temp).item() > 1e-3
    # one-hot-like teachers (zeros in p) give a finite loss
    onehot = F.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    assert torch.isfinite(kd_loss(logits, onehot, 4.0))


# -------------------------------------------------------------------- RKD
def test_rkd_hand_computed():
    s = [[0.0, 1.0, 2.0], [1.0, 0.5, -1.0], [2.0, 2.0, 0.0], [-1.0, 0.0, 1.0]]
    t = [[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-2.0, -1.0]]
    for w_d, w_a in ((25.0, 50.0), (1.0, 0.0), (0.0, 1.0)):
        got = rkd_loss(torch.tensor(s), torch.tensor(t), w_d, w_a)
        assert got.item() == pytest.approx(py_rkd(s, t, w_d, w_a), rel=1e-4, abs=1e-6), (w_d, w_a)


def test_rkd_matches_difference_tensor_reference_on_a_larger_batch():
    torch.manual_seed(0)
    s, t = torch.randn(24, 64) + 3.0, torch.randn(24, 32) * 5
    torch.testing.assert_close(rkd_loss(s, t), reference_rkd(s, t), rtol=1e-4, atol=1e-5)
    s = s.requires_grad_(True)
    g1, = torch.autograd.grad(rkd_loss(s, t), s)
    g2, = torch.autograd.grad(reference_rkd(s, t), s)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-6)


def test_rkd_invariant_to_teacher_scale_rotation_translation():
    torch.manual_seed(0)
    s, t = torch.randn(10, 8), torch.randn(10, 6)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    base = rkd_loss(s, t)
    assert base.item() > 1e-3
    moved = 3.7 * t @ q + torch.randn(1, 6)
    torch.testing.assert_close(rkd_loss(s, moved), base, rtol=1e-4, atol=1e-6)
    # a student that is a scaled rotation of the teacher has nothing left to learn
    assert rkd_loss(0.2 * t @ q, t).item() < 1e-5


def test_rkd_is_float32_under_autocast():
    torch.manual_seed(0)
    s, t = torch.randn(32, 64) + 5, torch.randn(32, 48)
    ref = rkd_loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rkd_loss(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_rkd_gradients_finite_with_duplicate_embeddings():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 4)
    s[3], t[2] = s[1], t[0]
    s.requires_grad_(True)
    loss = rkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# -------------------------------------------------------------------- CRD
def py_crd(module, fs, ft, contrast_idx):
    """RepDistiller's CRD loss (ContrastMemory + ContrastLoss, eps = 1e-7)
    by loops; Z from this batch, as on the first call."""
    def embed(head, f):
        w, b = head.linear.weight.tolist(), head.linear.bias.tolist()
        out = [sum(wi * fi for wi, fi in zip(row, f)) + bi for row, bi in zip(w, b)]
        n = py_norm(out)
        return [o / n for o in out]

    n_data, temp = module.num_samples, module.temperature
    vs = [embed(module.embed_s, f) for f in fs]
    vt = [embed(module.embed_t, f) for f in ft]
    mem_s, mem_t = module.memory_s.tolist(), module.memory_t.tolist()
    # student anchor vs teacher memory, teacher anchor vs student memory
    out_s = [[math.exp(py_dot(mem_t[j], vs[i]) / temp) for j in row] for i, row in enumerate(contrast_idx)]
    out_t = [[math.exp(py_dot(mem_s[j], vt[i]) / temp) for j in row] for i, row in enumerate(contrast_idx)]
    total = 0.0
    for out in (out_s, out_t):
        flat = [v for row in out for v in row]
        z = sum(flat) / len(flat) * n_data
        m, pn, s = len(out[0]) - 1, 1.0 / n_data, 0.0
        for row in out:
            p = [v / z for v in row]
            s += math.log(p[0] / (p[0] + m * pn + 1e-7))
            s += sum(math.log(m * pn / (pi + m * pn + 1e-7)) for pi in p[1:])
        total += -s / len(out)
    return total, vs, vt


def test_crd_hand_computed_and_memory_update():
    torch.manual_seed(0)
    crd = CRDLoss(student_dim=4, teacher_dim=2, num_samples=6, dim=3, negatives=3,
                  temperature=0.07, momentum=0.8)
    fs, ft = [[0.5, -1.0, 2.0, 0.1], [1.0, 1.0, 0.0, -0.3]], [[1.0, 0.5], [-0.7, 2.0]]
    idx, contrast = [4, 1], [[4, 0, 2, 5], [1, 3, 3, 0]]
    expected, vs, vt = py_crd(crd, fs, ft, contrast)
    old_s, old_t = crd.memory_s.clone(), crd.memory_t.clone()

    got = crd(torch.tensor(fs), torch.tensor(ft), torch.tensor(idx), torch.tensor(contrast))
    assert got.item() == pytest.approx(expected, rel=1e-4)

    for memory, old, v in ((crd.memory_s, old_s, vs), (crd.memory_t, old_t, vt)):
        for row, i in enumerate(idx):
            mixed = [0.8 * a + 0.2 * b for a, b in zip(old[i].tolist(), v[row])]
            n = py_norm(mixed)
            assert memory[i].tolist() == pytest.approx([m / n for m in mixed], rel=1e-5, abs=1e-6)
        untouched = [i for i in range(6) if i not in idx]
        torch.testing.assert_close(memory[untouched], old[untouched], rtol=0, atol=0)

    # Z is fixed by the first batch
    log_z = crd.log_z.clone()
    assert torch.isfinite(log_z).all()
    crd(torch.randn(2, 4), torch.randn(2, 2), torch.tensor([0, 3]))
    torch.testing.assert_close(crd.log_z, log_z, rtol=0, atol=0)


def test_crd_negative_sampling_is_uniform_and_skips_the_positive():
    torch.manual_seed(0)
    crd = CRDLoss(4, 4, num_samples=5, dim=4, negatives=4000)
    positives = torch.tensor([0, 2, 4])
    idx = crd.sample_indices(positives)
    assert idx.shape == (3, 4001) and (idx[:, 0] == positives).all()
    for row, pos in zip(idx, positives.tolist()):
        counts = torch.bincount(row[1:], minlength=5).float() / 4000
        assert counts[pos] == 0
        others = torch.cat([counts[:pos], counts[pos + 1:]])
        assert ((others - 0.25).abs() < 0.04).all(), counts


def test_crd_loss_decreases_when_student_learns_teacher_embeddings():
    torch.manual_seed(0)
    n, teacher = 64, torch.randn(64, 16)
    student = torch.nn.Parameter(torch.randn(n, 32))
    crd = CRDLoss(32, 16, num_samples=n, dim=16, negatives=32)
    opt = torch.optim.Adam([student, *crd.parameters()], lr=0.02)
    epoch_losses = []
    for _ in range(12):
        total = 0.0
        for batch in torch.randperm(n).view(4, 16):
            loss = crd(student[batch], teacher[batch], batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        epoch_losses.append(total / 4)
    assert epoch_losses[-1] < 0.8 * epoch_losses[0], epoch_losses
    # the student's projected embeddings now single out their own teacher's
    with torch.no_grad():
        sim = crd.embed_s(student) @ crd.embed_t(teacher).t()
    assert (sim.argmax(1) == torch.arange(n)).float().mean() > 0.5


def test_crd_state_checkpoints_and_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    crd = CRDLoss(8, 6, num_samples=20, dim=4, negatives=5)
    fs, ft, idx = torch.randn(3, 8), torch.randn(3, 6), torch.tensor([1, 7, 19])
    crd(fs, ft, idx)  # sets Z and moves the memories away from their init
    state = crd.state_dict()
    assert {"memory_s", "memory_t", "log_z", "embed_s.linear.weight", "embed_t.linear.weight"} <= set(state)
    restored = CRDLoss(8, 6, num_samples=20, dim=4, negatives=5)
    restored.load_state_dict(state)
    contrast = crd.sample_indices(idx)
    a = copy.deepcopy(crd)(fs, ft, idx, contrast)
    b = restored(fs, ft, idx, contrast)
    torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = copy.deepcopy(crd)(fs.bfloat16(), ft.bfloat16(), idx, contrast)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, a, rtol=0.02, atol=0.0)
    with pytest.raises(IndexError, match="sample indices"):
        crd(fs, ft, torch.tensor([0, 1, 20]))


# ----------------------------------------------------------- DistillLoss
def test_distill_loss_is_the_weighted_sum_of_its_components():
    torch.manual_seed(0)
    cfg = LossConfig(ce=1.0, kd=0.5, rkd=0.3, crd=0.2, temperature=2.0, crd_negatives=8)
    crit = DistillLoss(cfg, student_dim=12, teacher_dim=10, num_samples=30)
    s_logits, s_emb = torch.randn(5, 7, requires_grad=True), torch.randn(5, 12, requires_grad=True)
    targets = F.one_hot(torch.tensor([0, 1, 2, 3, 4]), 7).float() * 0.6 + 0.4 / 7
    t_probs = teacher_probs(torch.randn(5, 7), 2.0)
    t_emb = torch.randn(5, 10)
    idx = torch.tensor([3, 9, 0, 29, 17])

    crd_copy = copy.deepcopy(crit.crd)
    torch.manual_seed(1)
    total, parts = crit(s_logits, s_emb, targets, t_probs, t_emb, idx)
    torch.manual_seed(1)  # same negatives for the standalone CRD
    expected = {"ce": soft_cross_entropy(s_logits, targets), "kd": kd_loss(s_logits, t_probs, 2.0),
                "rkd": rkd_loss(s_emb, t_emb, 25.0, 50.0), "crd": crd_copy(s_emb, t_emb, idx)}
    assert set(parts) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(parts[k], v.detach())
        assert not parts[k].requires_grad
    weighted = 1.0 * parts["ce"] + 0.5 * parts["kd"] + 0.3 * parts["rkd"] + 0.2 * parts["crd"]
    torch.testing.assert_close(total.detach(), weighted)
    total.backward()
    assert crit.crd.embed_s.linear.weight.grad.abs().sum() > 0
    assert s_emb.grad.abs().sum() > 0 and s_logits.grad.abs().sum() > 0


def test_distill_loss_skips_zero_weights_and_rejects_missing_inputs():
    crit = DistillLoss(LossConfig(ce=1.0))
    assert crit.crd is None and len(list(crit.parameters())) == 0
    total, parts = crit(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([0, 1, 3]))
    assert set(parts) == {"ce"}
    with pytest.raises(ValueError, match="loss.kd > 0 but the batch has no teacher_probs"):
        DistillLoss(LossConfig(kd=1.0))(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="loss.rkd > 0 but the batch has no teacher_emb"):
        DistillLoss(LossConfig(rkd=1.0))(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="num_samples"):
        DistillLoss(LossConfig(crd=1.0), student_dim=4)
    with pytest.raises(ValueError, match="all loss weights"):
        LossConfig(ce=0.0)
    with pytest.raises(ValueError, match="loss.kd"):
        LossConfig(kd=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda_under_bf16_autocast_match_cpu():
    torch.manual_seed(0)
    s_logits, s_emb, t_emb = torch.randn(6, 7), torch.randn(6, 12), torch.randn(6, 10)
    targets = F.one_hot(torch.arange(6), 7).float()
    t_probs = teacher_probs(torch.randn(6, 7), 4.0)
    cfg = LossConfig(ce=1.0, kd=0.5, rkd=0.3, temperature=4.0)
    ref_total, ref_parts = DistillLoss(cfg)(s_logits, s_emb, targets, t_probs, t_emb)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, parts = DistillLoss(cfg)(*(x.cuda() for x in (s_logits, s_emb, targets, t_probs, t_emb)))
    assert total.dtype == torch.float32
    for k in ref_parts:
        torch.testing.assert_close(parts[k].cpu(), ref_parts[k], rtol=1e-4, atol=1e-5)

    crd = CRDLoss(12, 10, num_samples=30, dim=8, negatives=5)
    idx = torch.tensor([3, 9, 0, 29, 17, 4])
    contrast = crd.sample_indices(idx)
    crd_gpu = copy.deepcopy(crd).cuda()
    ref = crd(s_emb, t_emb, idx, contrast)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = crd_gpu(s_emb.cuda(), t_emb.cuda(), idx.cuda(), contrast.cuda())
    # loose enough for TF32 matmuls, should a caller have enabled them
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(crd_gpu.memory_s.cpu(), crd.memory_s, rtol=1e-3, atol=1e-3)
