"""DALI out of the box on the same shards: the baseline our DALI backend must beat.

What a user gluing DALI by hand would write (DALI's ResNet-50 training
example): ``fn.readers.webdataset`` over the store's shards and their
``.idx`` files (its own shuffling buffer, so crops and order cannot be
replayed), ``fn.decoders.image_random_crop`` (ROI decode of a random crop
with the loader's scale/ratio), ``fn.resize`` (linear, antialiased: DALI's
defaults), ``fn.crop_mirror_normalize`` with a ``fn.random.coin_flip`` mirror,
CHW float output, and ``DALIGenericIterator`` for the torch tensors. Same
batch size and threads as our loader; ``device='mixed'`` decode on CUDA,
``device_id=None`` on CPU, as our backend chooses. Labels are not read (the
shards store them as text); an epoch drops the last partial batch.
"""
from __future__ import annotations

from dataset_tools.stores.layout import open_store
from pipelines.dali.importer import import_dali
from pipelines.loader import LoaderConfig

READER = "Reader"


class StockDALILoader:
    """DALI's stock operators over a converted store (see module docstring).
    Iterating yields float image tensors ``[B, 3, S, S]``."""

    def __init__(self, cfg: LoaderConfig):
        import_dali()
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        store = open_store(cfg.store)
        shards = store.manifest["stores"]["dali"]["shards"]
        device = cfg.resolve_device()
        cuda = device.type == "cuda"
        res = int(cfg.student_resolution)
        ext = store.manifest["stores"]["dali"]["image_ext"]

        def graph():
            jpegs = fn.readers.webdataset(
                paths=[str(store.root / s["tar"]) for s in shards],
                index_paths=[str(store.root / s["index"]) for s in shards], ext=[ext],
                random_shuffle=cfg.shuffle, seed=cfg.seed, name=READER)
            images = fn.decoders.image_random_crop(
                jpegs, device="mixed" if cuda else "cpu", output_type=types.RGB,
                random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio))
            images = fn.resize(images, resize_x=res, resize_y=res)
            mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else 0
            return fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                mean=[255 * m for m in store.mean], std=[255 * s for s in store.std])

        pipe = pipeline_def(graph, batch_size=cfg.batch_size,
                            num_threads=max(1, int(cfg.num_workers)),
                            device_id=(device.index or 0) if cuda else None,
                            seed=cfg.seed & 0x7FFFFFFF)()
        pipe.build()
        self._iter = DALIGenericIterator(pipe, ["images"], reader_name=READER,
                                         last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
        self.store = store

    def set_epoch(self, epoch: int) -> None:
        """The reader reshuffles each pass on its own."""

    def __iter__(self):
        for (out,) in self._iter:
            yield out["images"]

    def __len__(self) -> int:
        return self._iter.size // self._iter.batch_size  # last partial batch dropped

    def close(self) -> None:
        self._iter = None
