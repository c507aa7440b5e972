"""The numba INTER_AREA resize against OpenCV's (the independent oracle)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipelines.kernels.area_resize import (MAX_CROP_AREA, area_resize_crop, area_resize_normalize,
                                   can_area_resize, normalization_rows,
                                   normalization_table)


def _cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for t in range(count):
        h, w = int(rng.integers(8, 300)), int(rng.integers(8, 300))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if t % 2:  # smooth content too: long runs of near-equal values, many .5 ties
            img = cv2.GaussianBlur(img, (7, 7), 3)
        oh, ow = int(rng.integers(1, min(h, 80) + 1)), int(rng.integers(1, min(w, 80) + 1))
        ch, cw = int(rng.integers(oh, h + 1)), int(rng.integers(ow, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        yield img, top, left, ch, cw, oh, ow


def test_matches_opencv_inter_area_within_one_level():
    """Random crops and sizes (non-integer and integer factors, 1x to ~300x):
    the same filter, so at most one level apart (OpenCV sums in float and
    rounds half to even), and rarely."""
    differing = total = 0
    for img, top, left, ch, cw, oh, ow in _cases(0, 1500):
        out = np.empty((oh, ow, 3), np.uint8)
        area_resize_crop(img, top, left, ch, cw, out)
        want = cv2.resize(img[top:top + ch, left:left + cw], (ow, oh),
                          interpolation=cv2.INTER_AREA)
        d = np.abs(out.astype(np.int16) - want.astype(np.int16))
        assert d.max() <= 1, (img.shape, top, left, ch, cw, oh, ow)
        differing += int((d > 0).sum())
        total += d.size
    assert differing / total < 0.005, differing / total


def test_exact_average_rounded_half_up():
    """Oracle without tap tables: repeat every pixel out_h x out_w times, so
    each output pixel's interval is a whole block of crop_h x crop_w copies;
    the block sum / (crop_h * crop_w), rounded half up, is the exact area
    average. Equal everywhere, .5 ties included (flat content makes many)."""
    for img, top, left, ch, cw, oh, ow in _cases(2, 400):
        if ch * cw * oh * ow > 4_000_000:  # keep the oracle's arrays small
            continue
        crop = img[top:top + ch, left:left + cw].astype(np.int64)
        rep = np.repeat(np.repeat(crop, oh, axis=0), ow, axis=1)
        total = rep.reshape(oh, ch, ow, cw, 3).sum(axis=(1, 3))
        want = (2 * total + ch * cw) // (2 * ch * cw)
        out = np.empty((oh, ow, 3), np.uint8)
        area_resize_crop(img, top, left, ch, cw, out)
        np.testing.assert_array_equal(out, want, err_msg=str((img.shape, top, left, ch, cw, oh, ow)))


def _lowres_cases(seed: int, count: int):
    """Crops below twice the output on both axes (every low-res crop): the
    horizontal pass runs as vector code (pipelines.kernels.area_rows)."""
    rng = np.random.default_rng(seed)
    for t in range(count):
        size = int(rng.integers(1, 48))
        ch, cw = (int(rng.integers(size, 2 * size)) for _ in range(2))
        h, w = ch + int(rng.integers(0, 20)), cw + int(rng.integers(0, 20))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if t % 2:
            img = cv2.GaussianBlur(img, (7, 7), 3)
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        yield img, top, left, ch, cw, size, size


@pytest.mark.parametrize("chw", [True, False])
@pytest.mark.parametrize("cases", [_cases, _lowres_cases])
def test_normalize_variant_is_the_loaders_normalization_of_the_uint8_resize(chw, cases):
    """area_resize_normalize == torch's (level - mean) / std in float32 (what
    BaseLoader._normalize computes) of area_resize_crop's levels, mirrored
    when flipped, in CHW or HWC order: bitwise."""
    rng = np.random.default_rng(3)
    mean = torch.tensor(rng.uniform(0, 255, 3), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(rng.uniform(1, 80, 3), dtype=torch.float32).view(1, 3, 1, 1)
    norm = normalization_rows(mean, std)
    lut = normalization_table(norm)
    for t, (img, top, left, ch, cw, oh, _) in enumerate(cases(4, 300)):
        size = min(oh, ch, cw)
        flip = bool(t % 2)
        levels = np.empty((size, size, 3), np.uint8)
        area_resize_crop(img, top, left, ch, cw, levels)
        x = torch.from_numpy(levels).permute(2, 0, 1)[None].float()
        want = ((x - mean) / std)[0].numpy()  # [3, size, size]
        want = want[:, :, ::-1] if flip else want
        want = want if chw else want.transpose(1, 2, 0)
        out = np.empty(3 * size * size, np.float32)
        area_resize_normalize(img, top, left, ch, cw, size, flip, norm, lut, out, chw)
        np.testing.assert_array_equal(out, want.reshape(-1),
                                      err_msg=str((img.shape, top, left, ch, cw, size, flip)))


def test_identity_and_exact_halving():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = np.empty((40, 50, 3), np.uint8)
    area_resize_crop(img, 0, 0, 40, 50, out)
    np.testing.assert_array_equal(out, img)
    # each output pixel averages a 2x2 block of equal values: exactly that value
    blocks = np.repeat(np.repeat(img[:20, :25], 2, axis=0), 2, axis=1)
    half = np.empty((20, 25, 3), np.uint8)
    area_resize_crop(blocks, 0, 0, 40, 50, half)
    np.testing.assert_array_equal(half, img[:20, :25])


@pytest.mark.parametrize("crop,out,ok", [((32, 32), (32, 32), True), ((31, 64), (32, 32), False),
                                         ((64, 31), (32, 32), False), ((100, 40), (32, 32), True),
                                         ((MAX_CROP_AREA // 4096 + 1, 4096), (32, 32), False)])
def test_only_downscaling_is_handled(crop, out, ok):
    assert can_area_resize(crop[0], crop[1], out[0], out[1]) == ok
