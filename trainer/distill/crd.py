"""Contrastive representation distillation (Tian et al. 2020) with memory banks."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed
from trainer.distill.terms import LossInputs, register


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
    optimised and checkpointed with the student via ``state_dict``.

    Under torchrun the ranks' banks are one bank: every rank gathers the
    batch's sample indices and (detached) head outputs of all ranks and applies
    the same momentum update, so the banks stay identical without ever being
    broadcast; the negatives are drawn for the global batch from the torch RNG
    (seeded alike on every rank, so the same draw) and each rank keeps its
    slice; ``Z`` is fixed from the first global batch. That is what one process
    would do with the global batch, except a sample that two ranks hold in the
    same step (only DistributedSampler's padding repeats, in an epoch's last
    batch) gets the lower rank's row. The heads' gradients are all-reduced by
    the trainer's DDP wrapper. All ranks must pass equal batch sizes (training
    drops the last partial batch).
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
        self._z_gathered = False  # torchrun: log Z of the first global batch is agreed on once

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
        world = distributed.world_size()
        all_indices = distributed.all_gather_cat(indices) if world > 1 else indices
        if contrast_idx is not None:
            idx = contrast_idx.long()
        elif world > 1:  # the global batch's draw, this rank's rows
            start = distributed.rank() * len(indices)
            idx = self.sample_indices(all_indices)[start:start + len(indices)]
        else:
            idx = self.sample_indices(indices)
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
                if world > 1 and not self._z_gathered:  # the global batch's mean, once
                    fresh = distributed.all_gather_cat(fresh[None]).logsumexp(0) - math.log(world)
                    self._z_gathered = True
                self.log_z.copy_(torch.where(torch.isnan(self.log_z), fresh, self.log_z))
            loss = self._nce(scores_s, self.log_z[0]) + self._nce(scores_t, self.log_z[1])
            with torch.no_grad():
                if world > 1:
                    v_s, v_t = self._global_rows(all_indices, torch.cat([v_s, v_t], dim=1).detach())
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    rows = memory[all_indices] * self.momentum + v.detach() * (1 - self.momentum)
                    memory.index_copy_(0, all_indices, F.normalize(rows, dim=1))
        return loss

    def _global_rows(self, all_indices: torch.Tensor, local: torch.Tensor):
        """Every rank's ``[v_s | v_t]`` rows for ``all_indices``, a sample held by
        two ranks given the lower rank's row everywhere, so the update writes
        the same value whatever order ``index_copy_`` takes (no host sync)."""
        rows = distributed.all_gather_cat(local)
        pos = torch.arange(len(all_indices), device=rows.device)
        first = torch.full((self.num_samples,), len(all_indices), dtype=torch.long, device=rows.device)
        first.scatter_reduce_(0, all_indices, pos, reduce="amin")
        rows = rows[first[all_indices]]
        return rows.split(rows.shape[1] // 2, dim=1)


@register("crd")
class CRDTerm(nn.Module):
    """``loss.crd``: CRD between the embeddings; holds the heads and memory
    banks (``dims``: student_dim, teacher_dim, num_samples)."""

    needs = frozenset({"teacher_emb", "indices"})

    def __init__(self, cfg, dims):
        super().__init__()
        if not (dims.get("student_dim") and dims.get("teacher_dim") and dims.get("num_samples")):
            raise ValueError("loss.crd > 0 needs student_dim, teacher_dim and num_samples "
                             f"(got {dims.get('student_dim')}, {dims.get('teacher_dim')}, "
                             f"{dims.get('num_samples')})")
        self.crd = CRDLoss(dims["student_dim"], dims["teacher_dim"], dims["num_samples"], cfg.crd_dim,
                           cfg.crd_negatives, cfg.crd_temperature, cfg.crd_momentum)

    def forward(self, x: LossInputs) -> torch.Tensor:
        return self.crd(x.student_emb, x.teacher_emb, x.indices)
