"""``benchmarks.demo.recipe_changes``: a finished student is reused by the
demo only when the recipe it was trained with (its resolved config.yaml) is
the one the demo would train now."""
from __future__ import annotations

from dataclasses import replace

from benchmarks.demo import recipe_changes
from trainer.recipe import Config
from trainer.run_record import write_resolved_config


def test_a_student_is_reused_only_under_its_own_recipe(tmp_path):
    cfg = Config()
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(tmp_path), name="d", tag="kd_s0"),
                  loss=replace(cfg.loss, temperature=4.0))
    assert recipe_changes(cfg) == ["no config.yaml"]
    cfg.student_dir.mkdir(parents=True)
    write_resolved_config(cfg, cfg.student_dir)
    assert recipe_changes(cfg) == []
    assert recipe_changes(replace(cfg, run=replace(cfg.run, progress=False))) == []  # not a result key
    changed = recipe_changes(replace(cfg, loss=replace(cfg.loss, temperature=2.0, kd_objective="teacher_smoothing")))
    assert changed == ["loss.temperature (was 4.0, now 2.0)",
                       "loss.kd_objective (was 'hinton', now 'teacher_smoothing')"]
