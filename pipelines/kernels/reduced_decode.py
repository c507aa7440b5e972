"""The reduced-decode rule every backend applies to JPEGs: which DCT scale
libjpeg-turbo decodes at for a crop.

A crop of ``crop_h x crop_w`` full-size pixels that is much larger than the
``need`` pixels the largest output view has is decoded at 1/d scale inside
the IDCT (d in 8, 4, 2: the largest that keeps the crop >= ``DRAFT_KEEP * need``
pixels on both axes), so the final INTER_AREA / antialiased resize still has
at least 2x the pixels it outputs. Reducing further, to just ``need``, doubles
the deviation from the full decode (docs/design/loaders.md). Pure Python so the
reference backend needs no numba; :mod:`pipelines.kernels.jpeg` compiles the
same function for the FFCV and DALI kernels.
"""
from __future__ import annotations

DCT_DENOMS = (8, 4, 2)  # libjpeg-turbo scales by 1/2, 1/4, 1/8 inside the IDCT
DRAFT_KEEP = 2  # the reduced crop keeps at least this x the output size


def dct_denominator(crop_h, crop_w, need):
    """The largest DCT scale denominator d in DCT_DENOMS with the crop still
    >= ``DRAFT_KEEP * d * need`` pixels on both axes; 1 when none fits."""
    for d in DCT_DENOMS:
        if crop_h >= DRAFT_KEEP * d * need and crop_w >= DRAFT_KEEP * d * need:
            return d
    return 1
