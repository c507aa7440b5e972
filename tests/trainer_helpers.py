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


def copy_run_with_cache(cfg: Config, out_dir) -> Config:
    """``cfg`` with its run folder moved to ``out_dir``, the same teacher
    checkpoint, and a copy of its teacher cache (file and fill record)."""
    import shutil

    copy = replace(cfg, run=replace(cfg.run, out_dir=str(out_dir)),
                   distill=replace(cfg.distill, teacher_checkpoint=str(cfg.teacher_checkpoint)))
    copy.run.root.mkdir(parents=True)
    for p in (cfg.cache_path, cfg.cache_path.with_suffix(".json")):
        shutil.copy(p, copy.run.root / p.name)
    return copy
