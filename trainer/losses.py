"""Training losses: cross-entropy on (mixed) soft targets, KD (Hinton et al.
2015), RKD (Park et al. 2019), CRD (Tian et al. 2020), and ``DistillLoss``,
their weighted sum.

Everything is batched and device-agnostic. Losses are computed in float32
whatever the autocast dtype: KD/CE go through log-softmax, RKD through
cancellation-prone distance algebra, CRD through ``exp(s / 0.07)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossConfig:
    """Weights of the loss terms (0 = not computed) and their settings."""

    ce: float = 1.0
    kd: float = 0.0
    rkd: float = 0.0
    crd: float = 0.0
    temperature: float = 4.0  # KD temperature; the caller softens the teacher with it
    rkd_distance_weight: float = 25.0  # Park et al. 2019, Sec. 4 defaults
    rkd_angle_weight: float = 50.0
    crd_dim: int = 128  # Tian et al. 2020 / RepDistiller defaults from here on
    crd_negatives: int = 4096
    crd_temperature: float = 0.07
    crd_momentum: float = 0.5

    def __post_init__(self):
        for name in ("ce", "kd", "rkd", "crd", "rkd_distance_weight", "rkd_angle_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.ce == self.kd == self.rkd == self.crd == 0:
            raise ValueError("all loss weights (loss.ce/kd/rkd/crd) are 0: nothing to train")
        if self.temperature <= 0 or self.crd_temperature <= 0:
            raise ValueError("loss.temperature and loss.crd_temperature must be > 0")
        if self.crd_dim < 1 or self.crd_negatives < 1:
            raise ValueError("loss.crd_dim and loss.crd_negatives must be >= 1")
        if not 0.0 <= self.crd_momentum < 1.0:
            raise ValueError(f"loss.crd_momentum must be in [0, 1), got {self.crd_momentum}")


# ----------------------------------------------------------------- CE and KD
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against hard labels ``long [B]`` or target
    distributions ``[B, C]`` (one-hot, mixed with mixup/CutMix weights, ...)."""
    if targets.dtype.is_floating_point and targets.shape != logits.shape:
        raise ValueError(f"soft targets {tuple(targets.shape)} must match logits {tuple(logits.shape)}")
    if targets.dtype.is_floating_point:
        targets = targets.float()
    # F.cross_entropy takes class probabilities directly (torch >= 1.10)
    return F.cross_entropy(logits.float(), targets)


def teacher_probs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher distribution softened at ``temperature``: the KD target before
    it is mixed across samples."""
    return F.softmax(teacher_logits.float() / temperature, dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_probs_t: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || softmax(z_student / T))``, averaged over the batch.

    Takes probabilities, not teacher logits, because under mixup/CutMix the
    target is a mixture of two teachers' distributions, which no logit vector
    softened at T represents. The T^2 factor keeps the gradient scale (which
    is ``T * (q - p) / B``) roughly independent of T (Hinton et al. 2015)."""
    if teacher_probs_t.shape != student_logits.shape:
        raise ValueError(f"teacher probabilities {tuple(teacher_probs_t.shape)} must match "
                         f"student logits {tuple(student_logits.shape)}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    # kl_div treats 0 * log 0 as 0, so one-hot-like teacher targets are fine
    return F.kl_div(log_q, teacher_probs_t.float(), reduction="batchmean") * temperature ** 2


# ----------------------------------------------------------------------- RKD
def _distances(emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise Euclidean distances ``[B, B]`` (0 on the diagonal), the Gram
    matrix of the centred embeddings, and the mask of non-degenerate pairs.

    Built from the Gram matrix rather than the ``[B, B, D]`` difference tensor
    the reference code uses, so memory is O(B^2 + B^3) instead of O(B^2 D).
    Centring first (distances and angles are translation invariant) limits the
    cancellation in ``|a|^2 + |b|^2 - 2ab``."""
    e = emb.float().flatten(1)
    e = e - e.mean(0, keepdim=True)
    gram = e @ e.t()
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    off_diag = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    # pairs closer than 1e-5 of the mean squared distance are treated as
    # coincident (float32 cannot resolve their direction): angle term 0
    scale = (d2 * off_diag).sum() / off_diag.sum().clamp_min(1)
    valid = off_diag & (d2 > 1e-5 * scale)
    # "safe where": the masked-out branch must not produce inf/NaN gradients
    dist = torch.where(valid, d2, torch.ones_like(d2)).sqrt() * valid
    return dist, gram, valid


def _cosines(dist: torch.Tensor, gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``cos[a, b, c]`` of the angle at vertex ``a`` between ``e_b - e_a`` and
    ``e_c - e_a``; 0 where a pair is degenerate (as F.normalize of a zero
    vector gives in the reference code)."""
    diag = gram.diagonal()
    # <e_b - e_a, e_c - e_a> = G_bc - G_ab - G_ac + G_aa
    dots = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + diag[:, None, None]
    inv = valid / torch.where(valid, dist, torch.ones_like(dist))
    return dots * inv[:, :, None] * inv[:, None, :]


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor,
             w_dist: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    """Relational KD: ``w_dist * L_distance + w_angle * L_angle``.

    Distance term: Huber (smooth-L1, delta 1) between the pairwise distance
    matrices, each divided by its mean off-diagonal distance. Angle term:
    Huber between the cosines of all triplet angles. Means run over all
    ``B^2`` / ``B^3`` entries (degenerate ones are 0 on both sides), as in the
    authors' code, which the default weights 25 / 50 were tuned with. The two
    embeddings may have different widths."""
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"RKD needs the same batch on both sides, got {student_emb.shape[0]} "
                         f"student and {teacher_emb.shape[0]} teacher embeddings")
    # autocast would run the Gram matmuls in half precision, where the
    # distance algebra cancels badly
    with torch.autocast(student_emb.device.type, enabled=False):
        return _rkd_fp32(student_emb.float(), teacher_emb.float(), w_dist, w_angle)


def _rkd_fp32(student_emb: torch.Tensor, teacher_emb: torch.Tensor, w_dist: float,
              w_angle: float) -> torch.Tensor:
    loss = student_emb.new_zeros(())
    with torch.no_grad():
        t_dist, t_gram, t_valid = _distances(teacher_emb)
    s_dist, s_gram, s_valid = _distances(student_emb)
    if w_dist:
        # mean over valid pairs (dist is 0 elsewhere); no boolean indexing, so no device sync
        t_norm = t_dist / (t_dist.sum() / t_valid.sum().clamp_min(1))
        s_norm = s_dist / (s_dist.sum() / s_valid.sum().clamp_min(1))
        loss = loss + w_dist * F.smooth_l1_loss(s_norm, t_norm)
    if w_angle:
        with torch.no_grad():
            t_cos = _cosines(t_dist, t_gram, t_valid)
        loss = loss + w_angle * F.smooth_l1_loss(_cosines(s_dist, s_gram, s_valid), t_cos)
    return loss


# ----------------------------------------------------------------------- CRD
class Embed(nn.Module):
    """Linear projection to the shared contrastive space, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(nn.Module):
    """Contrastive representation distillation with memory banks of negatives,
    following RepDistiller's ``CRDLoss``/``ContrastMemory`` (NCE form):

    * heads project student and teacher embeddings to ``dim`` (L2-normed);
    * ``memory_s``/``memory_t`` hold one running embedding per training sample,
      updated with momentum after each step (and re-normalised);
    * each anchor is scored against the *other* side's memory at its own
      index (positive) and ``negatives`` uniformly drawn other indices:
      ``P = exp(v . m / tau) / Z``, ``Z`` fixed from the first batch as
      ``mean(exp(.)) * num_samples``;
    * NCE loss with noise ``P_n = 1 / num_samples``, summed over both anchor
      directions (teacher anchor vs student memory and vice versa).

    Computed in log space (``log(P / (P + K P_n))`` as a log-sigmoid), which
    is the same quantity without the overflow risk of ``exp(1 / 0.07)`` in low
    precision; the reference's ``1e-7`` epsilon is dropped. Negatives are
    drawn uniformly over all samples except the positive (the reference's
    default draws from other classes, which needs labels per index).

    Heads and memories are this module's parameters/buffers, so they are
    optimised and checkpointed with the student via ``state_dict``. Each
    process updates its own memory (no cross-process sync under DDP).
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_samples: int, dim: int = 128,
                 negatives: int = 4096, temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"CRD needs a dataset of >= 2 samples for negatives, got {num_samples}")
        self.num_samples, self.negatives = num_samples, negatives
        self.temperature, self.momentum = temperature, momentum
        self.embed_s = Embed(student_dim, dim)
        self.embed_t = Embed(teacher_dim, dim)
        stdv = 1.0 / math.sqrt(dim / 3)  # uniform init with unit expected row norm, as the reference
        self.register_buffer("memory_s", torch.rand(num_samples, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(num_samples, dim).mul_(2 * stdv).sub_(stdv))
        # log Z for the student-anchor and teacher-anchor scores; NaN = not set yet
        self.register_buffer("log_z", torch.full((2,), float("nan")))

    def sample_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + K]``: the positive index, then K uniform draws from the
        other ``num_samples - 1`` indices (with replacement)."""
        neg = torch.randint(0, self.num_samples - 1, (len(indices), self.negatives),
                            device=indices.device)
        neg = neg + (neg >= indices[:, None]).long()  # skip the positive, keep uniformity
        return torch.cat([indices[:, None], neg], dim=1)

    def _nce(self, scores: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
        """``-(sum log D1 + sum log D0) / B`` with ``D1 = P / (P + K P_n)`` for the
        positive, ``D0 = K P_n / (P + K P_n)`` for negatives; in logits
        ``x = log P - log(K P_n)`` these are ``logsigmoid(x)`` and ``logsigmoid(-x)``."""
        k = scores.shape[1] - 1
        x = scores - log_z - math.log(k / self.num_samples)
        log_d1 = F.logsigmoid(x[:, 0])
        log_d0 = F.logsigmoid(-x[:, 1:])
        return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, indices: torch.Tensor,
                contrast_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``indices``: dataset sample indices ``long [B]``; ``contrast_idx``
        overrides the sampled ``[B, 1 + K]`` indices (column 0 = positive)."""
        indices = indices.to(self.memory_s.device).long()
        # checked where it costs no device sync; on CUDA indexing asserts instead
        if not indices.is_cuda and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"CRD sample indices must lie in [0, {self.num_samples}); the memory "
                             "bank was sized for a different dataset")
        idx = self.sample_indices(indices) if contrast_idx is None else contrast_idx.long()
        with torch.autocast(self.memory_s.device.type, enabled=False):
            v_s = self.embed_s(student_emb.float())
            v_t = self.embed_t(teacher_emb.float())
            m_s = self.memory_s[idx]  # [B, 1 + K, dim], copies: later updates cannot race
            m_t = self.memory_t[idx]
            scores_s = torch.bmm(m_t, v_s[:, :, None]).squeeze(2) / self.temperature
            scores_t = torch.bmm(m_s, v_t[:, :, None]).squeeze(2) / self.temperature
            with torch.no_grad():
                # Z = mean(exp(score)) * N, fixed by the first batch (no host sync)
                fresh = torch.stack([s.flatten().logsumexp(0) - math.log(s.numel()) for s in
                                     (scores_s, scores_t)]) + math.log(self.num_samples)
                self.log_z.copy_(torch.where(torch.isnan(self.log_z), fresh, self.log_z))
            loss = self._nce(scores_s, self.log_z[0]) + self._nce(scores_t, self.log_z[1])
            with torch.no_grad():
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    rows = memory[indices] * self.momentum + v.detach() * (1 - self.momentum)
                    memory.index_copy_(0, indices, F.normalize(rows, dim=1))
        return loss


# ------------------------------------------------------------- combination
class DistillLoss(nn.Module):
    """``ce * CE + kd * KD + rkd * RKD + crd * CRD``; terms with weight 0 are
    skipped. Holds the CRD heads and memory banks (pass ``student_dim``,
    ``teacher_dim`` and ``num_samples`` when ``cfg.crd > 0``), so its
    parameters go to the optimizer and its ``state_dict`` to checkpoints."""

    def __init__(self, cfg: LossConfig, student_dim: Optional[int] = None,
                 teacher_dim: Optional[int] = None, num_samples: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.crd = None
        if cfg.crd > 0:
            if not (student_dim and teacher_dim and num_samples):
                raise ValueError("loss.crd > 0 needs student_dim, teacher_dim and num_samples "
                                 f"(got {student_dim}, {teacher_dim}, {num_samples})")
            self.crd = CRDLoss(student_dim, teacher_dim, num_samples, cfg.crd_dim,
                               cfg.crd_negatives, cfg.crd_temperature, cfg.crd_momentum)

    def forward(self, student_logits: torch.Tensor, student_emb: torch.Tensor,
                target_probs: torch.Tensor, teacher_probs_t: Optional[torch.Tensor] = None,
                teacher_emb: Optional[torch.Tensor] = None,
                indices: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns ``(total, {term: detached unweighted value})``."""
        c = self.cfg
        parts: Dict[str, torch.Tensor] = {}
        if c.ce > 0:
            parts["ce"] = soft_cross_entropy(student_logits, target_probs)
        if c.kd > 0:
            if teacher_probs_t is None:
                raise ValueError("loss.kd > 0 but no teacher probabilities were given")
            parts["kd"] = kd_loss(student_logits, teacher_probs_t, c.temperature)
        if c.rkd > 0 or c.crd > 0:
            if teacher_emb is None:
                raise ValueError("loss.rkd/crd > 0 but no teacher embedding was given")
        if c.rkd > 0:
            parts["rkd"] = rkd_loss(student_emb, teacher_emb, c.rkd_distance_weight, c.rkd_angle_weight)
        if c.crd > 0:
            if indices is None:
                raise ValueError("loss.crd > 0 needs the batch's dataset sample indices")
            parts["crd"] = self.crd(student_emb, teacher_emb, indices)
        weights = {"ce": c.ce, "kd": c.kd, "rkd": c.rkd, "crd": c.crd}
        total = sum(weights[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}
