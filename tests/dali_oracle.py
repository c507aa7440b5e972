"""The oracle of the DALI tests: the ORIGINAL source file decoded by PIL,
cropped with ``box_to_pixels`` and resized with
``torchvision.transforms.v2.functional.resized_crop(antialias=True)``.

Tolerances, on the 0..255 scale: DALI's CPU JPEG decoder is libjpeg-turbo
like PIL's and decodes bit-identically, and its antialiased linear resize
equals torchvision's to +-1 level everywhere except the outermost pixel ring,
where DALI extends the crop's edge pixels and torchvision renormalizes its
truncated filter: the ring's mean |diff| grows with the downscale factor
(measured on imagenette: ~1.3 on average at 224 -> 32 px, up to ~14 for one
image at 224 -> 24), so it is bounded at 3 per batch and 16 per image.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from pipelines.views import box_to_pixels


def oracle_view(path, box, flip, size) -> torch.Tensor:
    with Image.open(path) as im:
        img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    top, left, h, w = box_to_pixels(*[float(v) for v in box], img.shape[1], img.shape[2])
    out = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return F.horizontal_flip(out) if flip else out


def assert_close_to_oracle(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    d = (got.int() - want.int()).abs()
    assert d[:, 1:-1, 1:-1].max() <= 1, f"{what}: interior differs by {d[:, 1:-1, 1:-1].max()}"
    ring = (d.sum() - d[:, 1:-1, 1:-1].sum()) / (d.numel() - d[:, 1:-1, 1:-1].numel())
    assert ring <= 16, f"{what}: edge ring differs by {ring:.1f} on average"
    return float(ring)
