"""PIL decoding shared by the backends that decode with PIL (``reference``,
``memory``): image bytes to uint8 CHW, the reduced-DCT draft rule for JPEGs,
and the low-res store's source image emulated from the full one."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipelines.kernels.reduced_decode import dct_denominator
from pipelines.views import box_to_pixels


def reduced_scale(height: int, width: int, box, out_size: int) -> int:
    """The DCT scale denominator (1, 2, 4, 8) PIL's draft mode decodes a
    ``height x width`` JPEG at for this box: the shared rule of
    :func:`pipelines.kernels.reduced_decode.dct_denominator` on the box's
    full-size pixels, so every backend picks the same scale."""
    _, _, ch, cw = box_to_pixels(float(box[0]), float(box[1]), float(box[2]), float(box[3]),
                                 height, width)
    return dct_denominator(ch, cw, out_size)


def decode(data: bytes, is_jpeg: bool, box=None, out_size: int = 0) -> torch.Tensor:
    """Image bytes -> uint8 RGB CHW, with PIL (torchvision.io's decoders are
    deprecated; both wrap libjpeg-turbo and agree to the bit). With ``box`` /
    ``out_size`` and a JPEG, decode at a reduced DCT scale when the crop
    allows it (:func:`reduced_scale`)."""
    with Image.open(io.BytesIO(data)) as im:
        if is_jpeg and box is not None and out_size > 0:
            w, h = im.size
            k = reduced_scale(h, w, box, out_size)
            if k > 1:
                im.draft("RGB", (w // k, h // k))  # PIL picks the DCT scale from the size
        arr = np.array(im.convert("RGB"))  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1)


def lowres_source(image: torch.Tensor, side: int) -> torch.Tensor:
    """Emulate the low-res store's image: the shorter side resized to ``side``
    (never upscaled), with the converter's rule (dataset_tools/records.py,
    ``resize_shorter``): PIL bilinear, which antialiases when reducing. PIL
    rather than torchvision here so the emulation is pixel-exact."""
    h, w = image.shape[-2:]
    if min(h, w) <= side:
        return image
    size = (max(1, round(w * side / h)), side) if h <= w else (side, max(1, round(h * side / w)))
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    return torch.from_numpy(np.asarray(pil.resize(size, Image.Resampling.BILINEAR)).copy()).permute(2, 0, 1)
