"""CutMix teacher targets composed from cached spatial maps.

With cached targets the teacher never sees the mixed image. For a CutMix
batch the cache's spatial maps give a closer stand-in than mixing the two
views' outputs: each (sample, view) row holds the teacher's last feature map
(the input of its global average pool) area-pooled to ``grid x grid`` cells.
The target of sample ``i`` pasted with partner ``j = perm[i]`` in box ``b``:

* each cell mixes its own and the partner's cell by the fraction ``f`` of the
  cell the box covers, ``(1 - f) * cells_i + f * cells_j``
  (:func:`compose_cutmix`);
* the composed grid goes through the teacher's own global pooling and head
  (:class:`SpatialHead`): the embedding is ``pool_features(composed)`` and
  the logits ``head(embedding)``.

The embedding is exactly the pooled embedding of the composed map, so cached
RKD / CRD under CutMix get it too, instead of a linear mix of the two
embeddings. What stays approximate is what the teacher's receptive fields do
across the box edge (and, within a cell, where in the cell the box lies).
Measured against the online teacher on the demo's data:
docs/design/teacher_cache.md.

The fractions are the exact overlap of the normalized boxes (whole pixels of
the student grid they were drawn on) with each cell, as a product of the
row and column overlaps; where the student grid divides by ``grid`` this is
the area pooling of the student-grid box mask. Everything is batched on the
device; nothing reads back to the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dataset_tools.progress import log_line
from trainer.distill.cache_parts import CacheError
from trainer.distributed import is_main


def cell_fractions(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, 1, grid, grid]``: the fraction of each cell of the unit square
    that each normalized box ``(y0, x0, h, w)`` covers: the product of its
    covered shares along y and x (both axes in one op each: this runs every
    CutMix step, where each op's dispatch costs more than its arithmetic)."""
    edges = torch.arange(grid + 1, device=boxes.device, dtype=torch.float32) / grid
    box = boxes.float().view(-1, 2, 2, 1)  # [B, (start, size), (y, x), 1]
    start = box[:, 0]
    covered = torch.minimum(edges[1:], start + box[:, 1]) - torch.maximum(edges[:-1], start)
    share = covered.clamp_min_(0).mul_(grid)  # [B, (y, x), grid]
    return (share[:, 0, :, None] * share[:, 1, None, :]).unsqueeze(1)


def mix_fractions(mix, grid: int) -> torch.Tensor:
    """:func:`cell_fractions` of a CutMix batch's :class:`~pipelines.batch.MixParams`.
    Where the student grid its mask was drawn on divides into ``grid`` cells,
    the fractions are exactly the mask's area pooling: two ops instead of the
    box formula's ten (this runs every CutMix step, where each op's dispatch
    costs more than its arithmetic)."""
    mask = mix.mask
    if mask is not None and mask.shape[-2] % grid == 0 and mask.shape[-1] % grid == 0:
        return F.avg_pool2d(mask.float(), (mask.shape[-2] // grid, mask.shape[-1] // grid))
    return cell_fractions(mix.boxes, grid)


def compose_cutmix(cells: torch.Tensor, perm: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Cells ``[B, D, g, g]`` of each sample's own view -> the composed cells
    of its CutMix image, each cell ``cells + f * (cells[perm] - cells)`` with
    ``frac`` ``[B, 1, g, g]`` the share of the cell the pasted box covers
    (:func:`mix_fractions`). One ``lerp``; ``index_select`` gathers the
    partners ~3x faster than advanced indexing on the CPU."""
    return torch.lerp(cells, cells.index_select(0, perm), frac.to(cells.dtype))


class SpatialHead(nn.Module):
    """The teacher from a (composed) grid of cells to ``(embedding, logits)``:
    only the modules its pooling and classifier use
    (:meth:`~trainer.models.base.DistillModel.head_module_names`) are
    registered here, so ``.to(device)`` moves just those; the backbone stays
    where it was loaded and is never run."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        teacher.eval()
        self._teacher = (teacher,)  # a plain tuple: the backbone is not registered
        self.used = nn.ModuleList([teacher.get_submodule(n) for n in teacher.head_module_names()])

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = self._teacher[0]
        emb = teacher.pool_features(cells)
        return emb, teacher.head(emb)


def load_spatial_head(cfg, num_classes: int, cache_teacher_hash: str, device) -> SpatialHead:
    """The run's teacher (its checkpoint, or ``model.teacher_weights``; see
    :mod:`trainer.teacher`) loaded on the CPU, with its pooling and head on
    ``device``. Its weights must be the ones the cache was filled with."""
    from trainer.teacher import load_teacher

    teacher, whash = load_teacher(cfg, num_classes, "cpu")
    if whash != cache_teacher_hash:
        raise CacheError(f"the teacher ({cfg.model.teacher}, weights {whash}) is not the one the "
                         f"teacher cache was filled with ({cache_teacher_hash}); refill the cache")
    if teacher.spatial_unavailable():
        raise teacher.spatial_error()
    return SpatialHead(teacher).to(device)


def spatial_head_for(cfg, cache, num_classes: int, device, mixing: bool = True) -> Optional[SpatialHead]:
    """The head ``CachedTargets`` composes CutMix targets with, or ``None``
    where it will not: ``distill.cached_mix`` is ``probs`` / ``logits``, or
    ``auto`` and the recipe draws no CutMix batch or the cache has no maps
    (said once on the log). ``spatial`` requires the maps."""
    mode = cfg.distill.cached_mix
    cutmix = mixing and cfg.mix.p_cutmix > 0
    if mode == "spatial":
        cache.require_spatial()
    elif mode != "auto" or not cutmix:
        return None
    elif not cache.spatial_grid:
        if is_main():
            log_line(f"cached targets: {cache.path} has no spatial maps, so CutMix targets mix cached "
                     f"logits (refill with distill.cache_spatial=always to compose them from the maps)")
        return None
    return load_spatial_head(cfg, num_classes, cache.key.teacher_hash, device)
