"""Relational knowledge distillation (Park et al. 2019): distance and angle structure of the embeddings."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from trainer.distill.terms import LossInputs, register


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


@register("rkd")
class RKDTerm(torch.nn.Module):
    """``loss.rkd``: RKD between the student's and the teacher's embeddings."""

    needs = frozenset({"teacher_emb"})

    def __init__(self, cfg, dims):
        super().__init__()
        self.w_dist, self.w_angle = cfg.rkd_distance_weight, cfg.rkd_angle_weight

    def forward(self, x: LossInputs) -> torch.Tensor:
        return rkd_loss(x.student_emb, x.teacher_emb, self.w_dist, self.w_angle)
