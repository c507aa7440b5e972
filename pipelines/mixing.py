"""On-device mixing augmentation: mixup, CutMix, cutout (or none), one mode per batch.

Two halves, so the apply path never waits on the device:

1. :func:`draw_params` draws everything random for one batch on the CPU from a
   NumPy generator seeded by ``(seed, step)``: the mode, the partner
   permutation, the lambdas and the boxes (B numbers each). The same step
   gives the same mixing whatever device the batch is on.
2. :func:`apply_mix` moves those few numbers to the batch's device
   (``non_blocking``) and mixes the student view, the teacher view (if any)
   with masks built from broadcast comparisons of ``arange`` grids against the
   box edges: batched tensor ops, no per-sample loop, no ``.item()``.

The box arithmetic of a draw runs in one compiled call
(:func:`pipelines.kernels.mix_boxes.box_arrays`), and :class:`Mixer` draws a
few dozen steps ahead; both only to save per-step dispatch on small batches.

Boxes (CutMix, cutout) are drawn in integer pixels on the student grid
``(h, w)`` (the lower resolution) and stored in :class:`MixParams` normalized,
``(y0, x0, bh, bw) / (h, w, h, w)``. On an image of size ``(H, W)`` each box
edge is ``round_half_up(edge_px * H / h)``, done in integer arithmetic. When
``H/h`` and ``W/w`` are integers this is the same box in whole pixels and the
kept fraction is identical on both views. Otherwise the teacher's box can be
up to half a teacher pixel off on each edge, so its kept fraction can differ
from ``lam`` by at most :func:`teacher_lam_bound` (``< 1/H + 1/W + 1/(H*W)``;
checked in tests/pipelines/test_mixing.py, measured maxima in docs/design/loaders.md).
:func:`kept_fraction` gives the teacher's exact value if it is needed. ``lam``
is always the exact kept fraction on the student grid (after clipping),
``1 - box_pixels / (h * w)``, as in timm's ``correct_lam``.

timm's ``Mixup`` does the same job but draws with NumPy's global RNG (not
replayable per step), loops over samples for per-sample CutMix and knows one
view only, hence this small module.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch

from dataset_tools.settings import check_choices, setting
from pipelines.batch import Batch, MixParams
from pipelines.kernels.mix_boxes import box_arrays

MODES = ("none", "mixup", "cutmix", "cutout")
PARTNERS = ("randperm", "flip")


@dataclass(frozen=True)
class MixConfig:
    """Per-batch mixing policy. The mode is drawn per batch: mixup with
    ``p_mixup``, CutMix with ``p_cutmix``, cutout with ``p_cutout``, none with
    the rest (like timm's ``mixup_prob``/``switch_prob``, but general)."""

    mixup_alpha: float = setting(1.0, "mixup: lambda ~ Beta(alpha, alpha)")
    cutmix_alpha: float = setting(1.0, "CutMix: lambda ~ Beta(alpha, alpha)")
    p_mixup: float = setting(0.0, "probability of a mixup batch")
    p_cutmix: float = setting(0.0, "probability of a CutMix batch")
    p_cutout: float = setting(0.0, "probability of a cutout batch (none: the rest)")
    cutout_fraction: float = setting(0.5, "cutout box side as a fraction of the image side")
    per_sample_lambda: bool = setting(True, "one lambda per sample, else one per batch")
    partner: str = setting("randperm", "mixing partner: a random permutation, or the batch reversed",
                           choices=PARTNERS)

    def __post_init__(self):
        probs = (self.p_mixup, self.p_cutmix, self.p_cutout)
        if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + 1e-9:
            raise ValueError(f"MixConfig: p_mixup, p_cutmix, p_cutout must be in [0, 1] and sum to "
                             f"at most 1, got {probs}")
        for name, p, alpha in (("mixup", self.p_mixup, self.mixup_alpha),
                               ("cutmix", self.p_cutmix, self.cutmix_alpha)):
            if p > 0 and not alpha > 0:
                raise ValueError(f"MixConfig: {name}_alpha must be > 0 when p_{name} > 0, "
                                 f"got {alpha}")
        if not 0.0 < self.cutout_fraction <= 1.0:
            raise ValueError(f"MixConfig: cutout_fraction must be in (0, 1], "
                             f"got {self.cutout_fraction}")
        check_choices(self, "mix")

    @property
    def p_none(self) -> float:
        return max(0.0, 1.0 - self.p_mixup - self.p_cutmix - self.p_cutout)

    @property
    def enabled(self) -> bool:
        return self.p_none < 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MixConfig":
        unknown = set(d) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"MixConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------- drawing (CPU)

def generator_for(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """A NumPy generator seeded from ``(seed, step)``. SeedSequence hashes the
    pair, so neighbouring steps (or seeds) give unrelated streams. Under
    torchrun rank ``r > 0`` hashes ``(seed, step, r)``: each rank mixes its own
    batch with its own draws, as one process would over the global batch, and
    rank 0 draws what a single process draws. NumPy, not torch: the draws
    are a few dozen numbers per step, where a torch op's dispatch (~5 us)
    would cost more than the arithmetic (the whole draw was ~8 % of a 16 px
    student's CutMix step on two CPU cores in torch)."""
    if seed < 0 or step < 0 or rank < 0:
        raise ValueError(f"seed, step and rank must be non-negative, got seed={seed}, step={step}, "
                         f"rank={rank}")
    entropy = [int(seed), int(step)] + ([int(rank)] if rank else [])
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def choose_mode(cfg: MixConfig, g: np.random.Generator) -> str:
    """One uniform draw picks the batch's mode by the configured probabilities."""
    u = g.random()
    edge = 0.0
    for mode, p in (("mixup", cfg.p_mixup), ("cutmix", cfg.p_cutmix), ("cutout", cfg.p_cutout)):
        edge += p
        if u < edge:
            return mode
    return "none"


def sample_beta(alpha: float, n: int, g: np.random.Generator) -> np.ndarray:
    """``n`` draws of Beta(alpha, alpha), float32."""
    return g.beta(float(alpha), float(alpha), n).astype(np.float32)


def draw_partners(cfg: MixConfig, n: int, g: np.random.Generator) -> np.ndarray:
    if cfg.partner == "flip":
        return np.arange(n - 1, -1, -1, dtype=np.int64)
    return g.permutation(n).astype(np.int64)


def centered_boxes(box_h: np.ndarray, box_w: np.ndarray, height: int, width: int,
                   g: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes of integer size ``box_h x box_w`` centred on a uniform pixel and
    clipped to the image (DeVries & Taylor's cutout, timm's ``rand_bbox``).
    Returns ``(kept fraction float32 [n], normalized (y0, x0, h, w) float32
    [n, 4], mask bool [n, 1, height, width])`` as tensors
    (:func:`pipelines.kernels.mix_boxes.box_arrays`)."""
    n = box_h.shape[0]
    centre_y = g.integers(0, height, n)
    centre_x = g.integers(0, width, n)
    normalized, kept, mask = box_arrays(box_h.astype(np.int64), box_w.astype(np.int64),
                                        centre_y, centre_x, height, width)
    return torch.from_numpy(kept), torch.from_numpy(normalized), torch.from_numpy(mask)


def _round_half_up(x):
    """Round half up: ``floor(x + 0.5)`` as int64 (NumPy array or torch tensor)."""
    if isinstance(x, np.ndarray):
        return np.floor(x + 0.5).astype(np.int64)
    return torch.floor(x + 0.5).long()


def draw_params(cfg: MixConfig, seed: int, step: int, batch_size: int, height: int,
                width: int, rank: int = 0) -> MixParams:
    """All random choices for one batch, on the CPU. ``(height, width)`` is the
    student grid, where boxes are drawn. Draw order: mode, partners, lambdas,
    box centres (only what the chosen mode needs). ``rank``: see :func:`generator_for`."""
    g = generator_for(seed, step, rank)
    n = batch_size
    mode = choose_mode(cfg, g)
    if mode == "none":
        return MixParams("none", torch.arange(n), torch.ones(n))
    if mode == "cutout":
        bh = np.full(n, max(1, int(np.floor(cfg.cutout_fraction * height + 0.5))), dtype=np.int64)
        bw = np.full(n, max(1, int(np.floor(cfg.cutout_fraction * width + 0.5))), dtype=np.int64)
        kept, boxes, mask = centered_boxes(bh, bw, height, width, g)
        return MixParams("cutout", torch.arange(n), kept, boxes, target_lam=torch.ones(n), mask=mask)
    perm = draw_partners(cfg, n, g)
    alpha = cfg.mixup_alpha if mode == "mixup" else cfg.cutmix_alpha
    lam = sample_beta(alpha, n if cfg.per_sample_lambda else 1, g)
    lam = lam if lam.shape[0] == n else np.full(n, lam[0], dtype=np.float32)
    if mode == "mixup":
        return MixParams("mixup", torch.from_numpy(perm), torch.from_numpy(lam))
    # CutMix: box side sqrt(1 - lam) of the image side, then lam corrected to
    # the true (rounded, clipped) pasted area.
    cut = np.sqrt(1.0 - lam.astype(np.float64))
    kept, boxes, mask = centered_boxes(_round_half_up(cut * height), _round_half_up(cut * width),
                                       height, width, g)
    return MixParams("cutmix", torch.from_numpy(perm), kept, boxes, mask=mask)


# ------------------------------------------------------------- applying (device)

def box_edges(boxes: torch.Tensor, grid_hw: tuple[int, int],
              image_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Normalized boxes drawn on ``grid_hw`` -> long pixel edges
    ``(y0, x0, y1, x1)`` on an image of ``image_hw`` (default: the grid itself).

    Grid pixels are recovered by rounding (exact: the boxes were whole grid
    pixels); scaling to the image rounds each edge half up in integer
    arithmetic, so an integer scale factor maps whole pixels to whole pixels.
    (``views.box_to_pixels`` rounds the size, not the far edge, and forces at
    least one pixel: right for crops, wrong for boxes that may be empty.)
    """
    h, w = grid_hw
    H, W = image_hw if image_hw is not None else grid_hw
    # Python scalars only: no host-to-device copy in the apply path.
    y0, x0, bh, bw = boxes.unbind(1)
    y0, x0 = _round_half_up(y0 * h), _round_half_up(x0 * w)
    y1, x1 = y0 + _round_half_up(bh * h), x0 + _round_half_up(bw * w)

    def scale(e, n, d):  # round_half_up(e * n / d) in integers
        return torch.div(2 * e * n + d, 2 * d, rounding_mode="floor")

    return torch.stack([scale(y0, H, h), scale(x0, W, w), scale(y1, H, h), scale(x1, W, w)], dim=1)


def box_mask(edges: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool ``[n, 1, height, width]``: True inside each sample's box."""
    rows = torch.arange(height, device=edges.device).view(1, height, 1)
    cols = torch.arange(width, device=edges.device).view(1, 1, width)
    e = edges.view(-1, 4, 1, 1)
    inside = ((rows >= e[:, 0]) & (rows < e[:, 2])) & ((cols >= e[:, 1]) & (cols < e[:, 3]))
    return inside.unsqueeze(1)


def _kept_fraction_px(edges: torch.Tensor, height: int, width: int) -> torch.Tensor:
    area = (edges[:, 2] - edges[:, 0]) * (edges[:, 3] - edges[:, 1])
    return (1.0 - area.double() / (height * width)).float()


def kept_fraction(boxes: torch.Tensor, grid_hw: tuple[int, int],
                  image_hw: tuple[int, int]) -> torch.Tensor:
    """Exact fraction of an ``image_hw`` image left outside the boxes (equal
    to ``lam`` on the grid and at integer scale factors)."""
    return _kept_fraction_px(box_edges(boxes, grid_hw, image_hw), *image_hw)


def teacher_lam_bound(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> float:
    """Upper bound on ``|kept_fraction(image) - lam|``: each edge moves at most
    half an image pixel, so box height and width each change by <= 1 pixel;
    the area changes by <= (bh + bw + 1) <= (H + W + 1) pixels. Zero at
    integer scale factors."""
    (h, w), (H, W) = grid_hw, image_hw
    if H % h == 0 and W % w == 0:
        return 0.0
    return 1.0 / H + 1.0 / W + 1.0 / (H * W)


def _check_images(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"mixing: {name} must be a float [B, C, H, W] tensor (normalized images), "
                        f"got {tuple(x.shape)} {x.dtype}")


def mixup_images(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` per sample, as one ``lerp`` (the
    formula of :meth:`MixParams.mix_targets`; ``index_select`` gathers
    faster than advanced indexing on the CPU)."""
    return torch.lerp(x.index_select(0, perm), x, lam.to(x.dtype).view(-1, 1, 1, 1))


def _view_mask(x: torch.Tensor, boxes: torch.Tensor, grid_hw: Optional[tuple[int, int]],
               grid_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The boxes as a mask on ``x``: ``grid_mask`` when ``x`` is the grid they
    were drawn on, else the boxes scaled to ``x``'s size."""
    H, W = x.shape[-2:]
    if grid_mask is not None and tuple(grid_mask.shape[-2:]) == (H, W):
        return grid_mask
    return box_mask(box_edges(boxes, grid_hw or (H, W), (H, W)), H, W)


def cutmix_images(x: torch.Tensor, perm: torch.Tensor, boxes: torch.Tensor,
                  grid_hw: Optional[tuple[int, int]] = None,
                  grid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Paste ``x[perm]`` into each sample's box (boxes drawn on ``grid_hw``,
    default: ``x``'s own size; ``grid_mask``: the same boxes as a mask there)."""
    return torch.where(_view_mask(x, boxes, grid_hw, grid_mask), x.index_select(0, perm), x)


def cutout_images(x: torch.Tensor, boxes: torch.Tensor,
                  grid_hw: Optional[tuple[int, int]] = None,
                  grid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero each sample's box (zero is the dataset mean after normalization)."""
    return torch.where(_view_mask(x, boxes, grid_hw, grid_mask),
                       torch.zeros((), dtype=x.dtype, device=x.device), x)


def params_to(params: MixParams, device: torch.device) -> MixParams:
    """Move the (small) parameter tensors, pinned when the target is CUDA so
    the copy is truly asynchronous."""
    device = torch.device(device)
    tensors = (params.perm, params.lam, params.boxes, params.target_lam, params.mask)
    if all(t is None or t.device == device for t in tensors):
        return params  # nothing to move (the CPU case): no copy of the dataclass either

    def move(t):
        if t is None or t.device == device:
            return t
        if t.device.type == "cpu" and device.type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return replace(params, perm=move(params.perm), lam=move(params.lam), boxes=move(params.boxes),
                   target_lam=move(params.target_lam), mask=move(params.mask))


def mix_images(x: torch.Tensor, params: MixParams, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Apply ``params`` (already on ``x``'s device) to one view."""
    out = x
    if params.mode == "mixup":
        out = mixup_images(x, params.perm, params.lam)
    elif params.mode == "cutmix":
        out = cutmix_images(x, params.perm, params.boxes, grid_hw, params.mask)
    elif params.mode == "cutout":
        out = cutout_images(x, params.boxes, grid_hw, params.mask)
    elif params.mode != "none":
        raise ValueError(f"mixing: unknown mode {params.mode!r}, expected one of {MODES}")
    if out is not x and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def apply_mix(batch: Batch, params: MixParams) -> Batch:
    """A new Batch with both views mixed and ``mix`` set; ``batch`` is not
    modified (for mode "none" the image tensors are shared, not copied)."""
    if batch.mix is not None:
        raise ValueError("mixing: this batch is already mixed (batch.mix is set); "
                         "mix once per step")
    _check_images(batch.student, "Batch.student")
    B, grid = batch.student.shape[0], tuple(batch.student.shape[-2:])
    if params.perm.shape[0] != B:
        raise ValueError(f"mixing: params are for {params.perm.shape[0]} samples, batch has {B}")
    params = params_to(params, batch.device)
    teacher = batch.teacher
    if teacher is not None:
        _check_images(teacher, "Batch.teacher")
        if teacher.shape[0] != B:
            raise ValueError(f"mixing: teacher batch size {teacher.shape[0]} != student {B}")
        teacher = mix_images(teacher, params_to(params, teacher.device), grid)
    return replace(batch, student=mix_images(batch.student, params, grid), teacher=teacher,
                   mix=params)


class Mixer:
    """``mixer(batch, step) -> Batch``: reproducible per ``(seed, step)`` (and
    the torchrun ``rank``, see :func:`generator_for`).

    The draws of the next ``ahead`` steps are made together, once per
    ``ahead`` steps: each is still :func:`draw_params` of its own step (the
    same numbers), but ~30 draws in a row run ~3x faster per draw than one
    between two model steps, whose forward and backward leave Python's and
    NumPy's code and data cold (one draw measured 0.35 ms inside the demo's
    CutMix loop against 0.11 ms in a row). ``ahead`` is capped so the held
    masks stay under ~8 MB."""

    def __init__(self, cfg: MixConfig, seed: int, rank: int = 0, ahead: int = 32):
        self.cfg, self.seed, self.rank = cfg, int(seed), int(rank)
        self.ahead = max(1, int(ahead))
        self._drawn: dict[tuple[int, int, int, int], MixParams] = {}

    def params(self, batch: Batch, step: int) -> MixParams:
        h, w = batch.student.shape[-2:]
        key = (step, len(batch), h, w)
        if key not in self._drawn:
            ahead = min(self.ahead, max(1, (8 << 20) // max(1, len(batch) * h * w)))
            self._drawn = {(s, len(batch), h, w): draw_params(self.cfg, self.seed, s, len(batch), h, w,
                                                              self.rank)
                           for s in range(step, step + ahead)}
        return self._drawn.pop(key)

    def __call__(self, batch: Batch, step: int) -> Batch:
        return apply_mix(batch, self.params(batch, step))

    def __repr__(self) -> str:
        return f"Mixer({self.cfg}, seed={self.seed}, rank={self.rank})"
