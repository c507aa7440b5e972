"""The one type that crosses from ``pipelines/`` into ``trainer/``.

Every backend yields :class:`Batch`; the trainer never sees anything else, so
backends are interchangeable behind it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class MixParams:
    """What mixing did to a batch, so targets (labels, teacher probabilities)
    can be mixed the same way later.

    ``perm[i]`` is the partner of sample ``i``; ``lam[i]`` is the weight of
    sample ``i``'s own content (for CutMix/cutout: the exact fraction of its
    pixels that were kept, after clipping and rounding); ``boxes`` are the
    pasted/erased regions as normalized ``(y0, x0, h, w)``, ``None`` for mixup.
    For cutout the partner is "nothing": ``perm`` is the identity and the
    targets are left unchanged (``target_lam`` is all ones).
    """

    mode: str
    perm: torch.Tensor  # long [B]
    lam: torch.Tensor  # float32 [B], weight of the sample's own content
    boxes: Optional[torch.Tensor] = None  # float32 [B, 4]
    target_lam: Optional[torch.Tensor] = None  # float32 [B]; defaults to lam
    # bool [B, 1, h, w]: the boxes as a mask on the student grid they were drawn on
    # (drawn with them on the host, so applying them is one torch.where)
    mask: Optional[torch.Tensor] = None

    @property
    def target_weight(self) -> torch.Tensor:
        return self.lam if self.target_lam is None else self.target_lam

    def mix_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Mix per-sample target distributions ``[B, C]`` with this batch's
        partners and weights (one-hot labels, teacher probabilities, ...)."""
        w = self.target_weight.to(targets.dtype).unsqueeze(1)
        # w * targets + (1 - w) * targets[perm] as one lerp (two ops, not six:
        # this runs on every mixed step, where dispatch outweighs the arithmetic)
        return torch.lerp(targets.index_select(0, self.perm), targets, w)


@dataclass
class Batch:
    """A batch on the training device.

    ``student``: low-resolution images, float, normalized with the store's
    mean/std, ``[B, 3, h, w]`` (channels_last memory format when configured).
    ``teacher``: full-resolution images of the *same crop boxes*, only when the
    teacher runs online. ``boxes``/``flips``/``view_ids`` identify the view
    (see :mod:`pipelines.views`) so cached teacher logits can be looked up.
    """

    student: torch.Tensor
    labels: torch.Tensor  # long [B]
    indices: torch.Tensor  # long [B], dataset sample indices
    boxes: torch.Tensor  # float32 [B, 4] normalized (y0, x0, h, w)
    flips: torch.Tensor  # bool [B]
    view_ids: torch.Tensor  # long [B]
    teacher: Optional[torch.Tensor] = None
    mix: Optional[MixParams] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.student.device

    def to(self, device, non_blocking: bool = True) -> "Batch":
        def move(x):
            return x.to(device, non_blocking=non_blocking) if torch.is_tensor(x) else x

        changes = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "mix"}
        if self.mix is not None:
            m = self.mix
            changes["mix"] = replace(m, perm=move(m.perm), lam=move(m.lam), boxes=move(m.boxes),
                                     target_lam=move(m.target_lam), mask=move(m.mask))
        return replace(self, **changes)

    def one_hot(self, num_classes: int) -> torch.Tensor:
        """Label targets ``[B, C]``, mixed if the batch was mixed. A scatter
        into zeros: ``F.one_hot`` first scans the labels for their range, which
        is most of its cost at this size."""
        labels = self.labels
        t = torch.zeros(labels.shape[0], num_classes, device=labels.device)
        t.scatter_(1, labels.view(-1, 1), 1.0)
        return self.mix.mix_targets(t) if self.mix is not None else t
