"""Every recipe in configs/ loads, names models the registry builds, and every
``python -m trainer`` / ``torchrun -m trainer`` command its comments show is a
valid job with valid overrides."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trainer.__main__ import JOBS
from trainer.models import is_imagenet_model
from trainer.recipe import Config
from trainer.yaml_config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
COMMAND = re.compile(r"-m trainer (\w+)\s+(--config \S+.*)$")


def documented_commands(path: Path):
    for line in path.read_text().splitlines():
        m = COMMAND.search(line.lstrip("# "))
        if m:
            yield m.group(1), shlex.split(m.group(2))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_models_exist(path):
    cfg = load_config(Config, path)
    for name in (cfg.model.teacher, cfg.model.student):
        is_imagenet_model(name)  # raises ModelError for an unknown name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_documented_commands_are_valid(path):
    for job, args in documented_commands(path):
        assert job in JOBS, (path.name, job)
        config = args[args.index("--config") + 1]
        assert (REPO / config).resolve() == path.resolve(), (path.name, config)
        overrides = [a for a in args if "=" in a and not a.startswith("--")]
        load_config(Config, path, overrides)


def test_imagenet_recipe_is_the_cross_quality_setting():
    path = REPO / "configs" / "imagenet.yaml"
    cfg = load_config(Config, path)
    assert (cfg.model.teacher, cfg.model.student) == ("torchvision/resnet50", "torchvision/resnet18")
    assert (cfg.data.teacher_resolution, cfg.data.student_size, cfg.data.backend) == (224, 112, "dali")
    commands = list(documented_commands(path))
    distills = [args for job, args in commands if job == "distill"]
    sizes = {load_config(Config, path, [a for a in args if "=" in a]).data.student_size for args in distills}
    assert sizes == {112, 56}
    assert any("torchrun" in line for line in path.read_text().splitlines() if "distill" in line)
    assert {job for job, _ in commands} >= {"teacher", "calibrate", "cache", "distill", "evaluate"}
