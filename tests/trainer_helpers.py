"""The trainer tests' recipe: a tiny config over the ``cifar_stores`` fixture."""
from __future__ import annotations

from dataclasses import replace

from trainer.recipe import Config


def make_cfg(stores, out_dir, **sections) -> Config:
    cfg = Config()
    cfg.run = replace(cfg.run, name="t", out_dir=str(out_dir), progress=False, seed=0)
    cfg.data = replace(cfg.data, train_store=str(stores["train"]), val_store=str(stores["val"]),
                       test_store=str(stores["test"]), batch_size=50, eval_batch_size=100, num_workers=0,
                       teacher_resolution=32,
                       student_resolution=16, num_views=2)
    cfg.model = replace(cfg.model, teacher="resnet8", student="resnet8")
    cfg.optim = replace(cfg.optim, epochs=2, lr=0.05, schedule="cosine")
    for name, kw in sections.items():
        setattr(cfg, name, replace(getattr(cfg, name), **kw))
    return cfg
