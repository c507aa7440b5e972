"""FFCV out of the box on the same files: the baseline our FFCV backend must beat.

What a user gluing FFCV by hand would write (ffcv-imagenet's train pipeline):
``RandomResizedCropRGBImageDecoder`` (its own RNG: crops are not replayable),
``RandomHorizontalFlip``, normalization, ``ToTensor``/``ToTorchImage`` with
its default channels_last layout (a view, no copy), labels through
``IntDecoder``. It reads the store's ``.beton`` (JPEG) or its low-res
companion, with the same batch size, workers, order option and seed as our
loader, and yields the normalized image tensor of each batch (no ``Batch``:
no indices, boxes or view ids, which is part of what the comparison shows).

Pipeline order matters in FFCV 1.0.2: a CPU ``NormalizeImage`` after
``ToTorchImage`` makes ``Graph.group_operations`` loop forever (a jitted
stage after two unjitted ones), so on CPU it normalizes the numpy batch
before ``ToTensor``; on CUDA it normalizes on the device after the copy, as
ffcv-imagenet does.
"""
from __future__ import annotations

import numpy as np

from dataset_tools.stores.layout import open_store
from pipelines.loader import LoaderConfig


class StockFFCVLoader:
    """FFCV's stock decoders over a converted store (see module docstring).
    Iterating yields float image tensors ``[B, 3, S, S]`` (channels_last)."""

    def __init__(self, cfg: LoaderConfig):
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor,
                                     ToTorchImage)

        store = open_store(cfg.store)
        path = store.path("ffcv_lowres" if cfg.lowres else "ffcv")
        device = cfg.resolve_device()
        res = int(cfg.student_resolution)
        mean = np.array(store.mean) * 255
        std = np.array(store.std) * 255
        image = [RandomResizedCropRGBImageDecoder((res, res), scale=tuple(cfg.scale),
                                                  ratio=tuple(cfg.ratio))]
        if cfg.flip:
            image.append(RandomHorizontalFlip())
        if device.type == "cuda":
            image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                      NormalizeImage(mean, std, np.float32)]
        else:
            image += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
        order = OrderOption.RANDOM if cfg.shuffle else OrderOption.SEQUENTIAL
        self._loader = Loader(str(path), batch_size=cfg.batch_size,
                              num_workers=max(1, int(cfg.num_workers)), order=order,
                              seed=cfg.seed, os_cache=True, drop_last=cfg.drop_last,
                              pipelines={"image": image, "label": [IntDecoder(), ToTensor()],
                                         "index": None})
        self.store = store

    def set_epoch(self, epoch: int) -> None:
        """FFCV advances its own epoch counter (the shuffle seed) per pass."""

    def __iter__(self):
        for images, _labels in self._loader:
            yield images

    def __len__(self) -> int:
        return len(self._loader)

    def close(self) -> None:
        self._loader = None
