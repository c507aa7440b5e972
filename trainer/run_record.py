"""The resolved config of a run, in its folder, and the resume rule.

Every run writes its resolved config (the YAML file, the overrides and
anything a job resolved, such as the sweep's temperature) as
``<run folder>/config.yaml`` at start: the teacher's and each student's
folder (:class:`trainer.engine.Trainer`) and the sweep's
(:func:`trainer.sweep.run_sweep`). ``python -m trainer JOB --config
runs/x/student/config.yaml`` runs the same recipe again.

``run.resume`` continues a run only under the recipe it started with: a
resolved config that differs from the folder's ``config.yaml`` in anything
that changes the result is refused, naming the keys. What may differ:
``NON_RESULT_KEYS`` (trainer/recipe.py; the one list, also used by the
sweep's fingerprint), ``run.max_steps`` (a resumed run may go further than
the interrupted one) and, for the teacher, the keys it never reads
(:data:`TEACHER_UNREAD`).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from dataset_tools.atomic import write_text_atomic
from trainer.recipe import NON_RESULT_KEYS, Config
from trainer.yaml_config import ConfigError, flatten, read_yaml, to_yaml, yaml_problem

CONFIG_NAME = "config.yaml"
RESUMABLE_CHANGES = NON_RESULT_KEYS + ("run.max_steps",)
# the teacher job trains at full resolution with plain cross-entropy: the
# students' model, resolution, mixing, loss, targets and sweep are not its input
TEACHER_UNREAD = ("model.student", "model.student_low_res_stem", "data.student_resolution",
                  "data.student_factor", "data.lowres", "mix.", "loss.", "distill.", "sweep.")


def write_resolved_config(cfg: Config, folder: Path) -> Path:
    """``folder/config.yaml``: ``cfg`` as YAML that loads back to ``cfg`` (atomic)."""
    path = Path(folder) / CONFIG_NAME
    header = ("# the resolved config of this run (written at its start); rerun it with\n"
              "# python -m trainer JOB --config <this file>\n")
    write_text_atomic(path, header + to_yaml(cfg))
    return path


def result_differences(saved: dict, cfg: Config, role: str = "student") -> list[str]:
    """``key (was X, now Y)`` for each key of the result that differs between
    a saved resolved config (a nested mapping) and ``cfg``. A key the saved
    file lacks (written before the key existed) is compared with its default."""
    now, default, was = flatten(cfg), flatten(Config()), flatten(saved)
    ignored = RESUMABLE_CHANGES + (TEACHER_UNREAD if role == "teacher" else ())
    out = []
    for key, value in now.items():
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in ignored):
            continue
        old = was.get(key, default.get(key))
        if old != value:
            out.append(f"{key} (was {old!r}, now {value!r})")
    return out


def check_resume(cfg: Config, folder: Path, role: str = "student") -> None:
    """With ``run.resume`` and a checkpoint to resume from, raise
    :class:`ConfigError` when ``cfg`` differs from the folder's resolved
    config in a key of the result (see the module doc)."""
    folder = Path(folder)
    saved_path = folder / CONFIG_NAME
    if not (cfg.run.resume and (folder / "last.pt").is_file() and saved_path.is_file()):
        return  # nothing to resume (a fresh start), or a run from before config.yaml existed
    try:
        saved = read_yaml(saved_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved_path}: unreadable ({yaml_problem(e)}); remove it to resume "
                          f"under the current config") from None
    diffs = result_differences(saved, cfg, role)
    if diffs:
        beside = "run.name" if role == "teacher" else "run.tag"
        raise ConfigError(f"run.resume: {folder} was started with another recipe ({saved_path}); "
                          f"changed: {'; '.join(diffs)}. Resume with the same settings (e.g. "
                          f"--config {saved_path} run.resume=true), start over (run.resume=false) "
                          f"or start a new run beside it (another {beside})")
