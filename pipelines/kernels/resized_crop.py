"""Batched crop + resize + flip as two matrix products, on any torch device.

``resized_crop_batch`` takes a batch of uint8 images already on the device
and each sample's pixel box and flip, and returns the ``size x size`` views
that ``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)``
followed by ``hflip`` gives one image at a time (the reference backend).

The rule: a bilinear resize with antialiasing is separable, so each view is
``Wy @ image @ Wx^T`` with per-sample weight matrices ``Wy [size, H]`` and
``Wx [size, W]`` that are zero outside the crop. The weights are torch's
antialiased-bilinear ones (``aten/src/ATen/native/UpSample.h``,
``_compute_indices_min_size_weights_aa``): output pixel ``i`` of a crop of
``n`` pixels resized to ``size`` has centre ``c = (i + 0.5) * n / size``
(relative to the crop), support ``s = max(n / size, 1)``, and source pixel
``j`` of the crop weighs ``max(0, 1 - |j + 0.5 - c| / s)``, normalised over
the crop. Enlarging (``n < size``) reduces to plain bilinear with edge
clamping, reducing to a triangle prefilter of width ``n / size``. A flip
reverses the rows of ``Wx``. Everything is batched tensor algebra, so on a
GPU the whole batch is a handful of kernels and the host never touches a
pixel.

Why by hand: torchvision's ``resized_crop`` takes one box per call (a
Python loop of ~30 us per sample on CPU) and ``roi_align`` samples bilinearly
without the antialiasing prefilter. Results are rounded to uint8 levels like
torchvision's uint8 output; torchvision rounds between its horizontal and
vertical passes and uses fixed-point weights, so levels differ by at most a
few units (measured against the reference backend in
``tests/pipelines/test_loader_equivalence.py``).
"""
from __future__ import annotations

import numpy as np
import torch


def pixel_boxes(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Normalized ``(y0, x0, h, w)`` boxes -> int64 ``[n, 4]`` pixel boxes
    ``(top, left, crop_h, crop_w)``: :func:`pipelines.views.box_to_pixels`
    (round half up, clipped to the image) vectorised, bit for bit (the same
    float64 arithmetic on the same float32 boxes)."""
    b = np.asarray(boxes, dtype=np.float32).astype(np.float64)
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    top = np.minimum(np.floor(b[:, 0] * h + 0.5).astype(np.int64), h - 1)
    left = np.minimum(np.floor(b[:, 1] * w + 0.5).astype(np.int64), w - 1)
    ch = np.maximum(1, np.minimum(np.floor(b[:, 2] * h + 0.5).astype(np.int64), h - top))
    cw = np.maximum(1, np.minimum(np.floor(b[:, 3] * w + 0.5).astype(np.int64), w - left))
    return np.stack([top, left, ch, cw], axis=1)


def aa_weights(start: torch.Tensor, length: torch.Tensor, in_len: int, size: int) -> torch.Tensor:
    """``[n, size, in_len]`` float32 resize weights of crops ``[start, start +
    length)`` of an axis of ``in_len`` pixels (see module docstring)."""
    dev = start.device
    length_f = length.to(torch.float64)
    scale = (length_f / size).view(-1, 1, 1)
    support = scale.clamp(min=1.0)
    centre = (torch.arange(size, device=dev, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    rel = torch.arange(in_len, device=dev, dtype=torch.int64).view(1, 1, -1) - start.view(-1, 1, 1)
    t = (rel.to(torch.float64) + 0.5 - centre) / support
    w = (1.0 - t.abs()).clamp(min=0.0)
    w = w * ((rel >= 0) & (rel < length.view(-1, 1, 1)))
    return (w / w.sum(dim=2, keepdim=True)).to(torch.float32)


def resized_crop_batch(images: torch.Tensor, pixel_box: torch.Tensor, flips: torch.Tensor,
                       size: int) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]`` images (zero-padded beyond each image's own
    size), int64 ``[n, 4]`` pixel boxes and bool ``[n]`` flips (all on the
    images' device) -> float32 ``[n, 3, size, size]`` views with integer
    values in 0..255."""
    n, _, height, width = images.shape
    if n == 0:
        return torch.empty(0, 3, size, size, device=images.device)
    wy = aa_weights(pixel_box[:, 0], pixel_box[:, 2], height, size)
    wx = aa_weights(pixel_box[:, 1], pixel_box[:, 3], width, size)
    wx = torch.where(flips.view(-1, 1, 1), wx.flip(1), wx)
    out = torch.matmul(torch.matmul(wy.unsqueeze(1), images.to(torch.float32)), wx.transpose(1, 2).unsqueeze(1))
    return out.round_().clamp_(0.0, 255.0)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Whole uint8 images ``[n, 3, H, W]`` resized to ``size x size``: the
    eval view (view 0) of :func:`resized_crop_batch`, float32 levels."""
    n, _, h, w = images.shape
    box = torch.tensor([0, 0, h, w], dtype=torch.int64, device=images.device).expand(n, 4)
    return resized_crop_batch(images, box, torch.zeros(n, dtype=torch.bool, device=images.device), size)
