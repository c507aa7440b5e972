"""torchvision out of the box: the pipeline most users start from.

``datasets.ImageFolder`` over the store's source folder (PIL decode of each
file), ``transforms.RandomResizedCrop`` (PIL, antialiased bilinear) with the
loader's scale/ratio, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``
with the store's mean/std, and a ``DataLoader`` with the same batch size,
workers (persistent, as a user tuning for speed would set them), shuffle and
drop_last. No ``Batch``: no indices, boxes or view ids.

Our ``reference`` backend is the semantic oracle, and it is a tuned
torchvision pipeline (memory-mapped shards instead of one file open per image,
uint8 tensor resize, forked workers with one thread each), faster than this
one (figures: docs/results.md). This variant shows what a user's starting
point costs; the issue's target ratios are stated
against ``reference``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dataset_tools.stores.layout import StoreError, open_store
from pipelines.loader import LoaderConfig


class StockTorchvisionLoader:
    """ImageFolder + torchvision transforms + DataLoader (module docstring).
    Iterating yields normalized float image tensors ``[B, 3, S, S]``."""

    def __init__(self, cfg: LoaderConfig):
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        store = open_store(cfg.store)
        source = store.manifest.get("source", {})
        folder = Path(source.get("path", ""))
        if source.get("kind") != "imagefolder" or not folder.is_dir():
            raise StoreError(f"{store.root}: torchvision_stock reads the ImageFolder the store was "
                             f"converted from, and the manifest names {source.get('kind')!r} at "
                             f"{str(folder)!r}, which is not an existing ImageFolder; run the "
                             f"benchmark on the ImageFolder, or leave this variant out")
        if cfg.lowres:
            raise ValueError("torchvision_stock decodes the source images; it has no low-res mode")
        ops = [transforms.RandomResizedCrop(cfg.student_resolution, scale=tuple(cfg.scale),
                                            ratio=tuple(cfg.ratio))]
        if cfg.flip:
            ops.append(transforms.RandomHorizontalFlip())
        ops += [transforms.ToTensor(), transforms.Normalize(store.mean, store.std)]
        dataset = datasets.ImageFolder(str(folder), transforms.Compose(ops))
        generator = torch.Generator().manual_seed(cfg.seed)
        workers = int(cfg.num_workers)
        self._loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=cfg.shuffle,
                                  num_workers=workers, drop_last=cfg.drop_last,
                                  persistent_workers=workers > 0, generator=generator,
                                  pin_memory=cfg.resolve_device().type == "cuda")
        self.device = cfg.resolve_device()
        self.store = store

    def set_epoch(self, epoch: int) -> None:
        """The DataLoader's generator draws a new order each pass."""

    def __iter__(self):
        for images, _labels in self._loader:
            yield images.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self._loader)

    def close(self) -> None:
        # stop the persistent workers now, as pipelines/reference/loader.py does (left
        # to the cyclic GC, their shutdown can wait out DataLoader's timeouts)
        it = getattr(self._loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
        self._loader = None
