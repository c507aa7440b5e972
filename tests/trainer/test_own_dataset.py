"""README "Distil your own dataset", tried as a new user would: a generated
ImageFolder (three classes of coloured shapes, not the shared data), a
teacher file saved from a randomly initialised torchvision ResNet-18, and
the section's shell commands run as written, in order, as subprocesses from
a fresh folder. The only change to them: the trainer commands get tiny
sizes appended (1 epoch, 32 / 16 px, small batches) so the walk takes a
minute on CPU."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from PIL import Image, ImageDraw
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TINY = ["optim.epochs=1", "data.teacher_resolution=32", "data.student_resolution=16", "data.batch_size=16",
        "data.eval_batch_size=64", "data.num_workers=0", "run.progress=false"]
CLASSES = {"circle": (220, 40, 40), "square": (40, 180, 60), "triangle": (40, 70, 220)}


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def shell_blocks(section: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def commands(block: str):
    """The block's commands: ('write', path, text) for a ``cat > F <<'TAG'``
    heredoc, else the argument list (``\\`` continuations joined)."""
    lines, out = block.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        heredoc = re.fullmatch(r"cat > (\S+) <<'(\w+)'", line)
        if heredoc:
            end = lines.index(heredoc.group(2), i)
            out.append(("write", heredoc.group(1), "\n".join(lines[i:end]) + "\n"))
            i = end + 1
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        out.append(shlex.split(line, comments=True))
    return out


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert cmd[0] == "python", cmd  # the section only runs python
    cmd = [sys.executable, *cmd[1:]]
    if cmd[1:3] == ["-m", "trainer"]:
        cmd += TINY
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CQKD_DEBUG": "1"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def run_block(block: str, cwd: Path) -> list[subprocess.CompletedProcess]:
    results = []
    for cmd in commands(block):
        if cmd[0] == "write":
            (cwd / cmd[1]).write_text(cmd[2])
        else:
            results.append(run(cmd, cwd))
    return results


def make_image_folder(root: Path, per_class: int, seed: int) -> None:
    """Coloured shapes on noisy light backgrounds, 32 px JPEGs."""
    rng = np.random.default_rng(seed)
    for c, (name, colour) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            bg = rng.integers(170, 255, size=(32, 32, 3), dtype=np.uint8)
            im = Image.fromarray(bg)
            d = ImageDraw.Draw(im)
            s, x, y = rng.integers(10, 18), rng.integers(1, 12), rng.integers(1, 12)
            fill = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-30, 30, 3), 0, 255))
            if name == "circle":
                d.ellipse([x, y, x + s, y + s], fill=fill)
            elif name == "square":
                d.rectangle([x, y, x + s, y + s], fill=fill)
            else:
                d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
            im.save(root / name / f"{k:03d}.jpg", quality=90)


def teacher_hash_of(path: Path) -> str:
    from trainer.models import create_model
    from trainer.models.weights import load_weights

    model = create_model("torchvision/resnet18", 3)
    return load_weights(model, path, 3, arch="torchvision/resnet18", classes_from="the store").weights_hash


@pytest.mark.slow
def test_readme_distil_your_own_dataset(tmp_path):
    make_image_folder(tmp_path / "my_photos" / "train", 30, seed=0)
    make_image_folder(tmp_path / "my_photos" / "test", 8, seed=1)
    (tmp_path / "dataset_tools").symlink_to(REPO / "dataset_tools")  # the commands run from the repo root
    torch.manual_seed(0)
    teacher = tvm.resnet18(weights=None, num_classes=3)
    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    save_file(tvm.resnet18(weights=None, num_classes=10).state_dict(), tmp_path / "pretrained.safetensors")

    section = readme_section("Distil your own dataset")
    main, finetune = shell_blocks(section)
    results = run_block(main, tmp_path)
    assert len(results) == 6  # convert x2, calibrate, cache, distill, evaluate

    for split in ("train", "val", "test"):
        assert (tmp_path / "stores" / "my_photos" / split / "manifest.json").is_file(), split
    runs = tmp_path / "runs" / "my_photos"
    calib = json.loads((runs / "teacher" / "temperature.json").read_text())
    whash = teacher_hash_of(tmp_path / "teacher.safetensors")
    assert calib["teacher_weights_hash"] == whash and calib["split"] == "val" and calib["num_samples"] == 9
    assert (runs / "logits_K4_r32.h5").is_file()
    ev = json.loads((runs / "student" / "final_eval.json").read_text())
    assert json.loads(results[-1].stdout)["top1"] == ev["top1"]
    assert (ev["split"], ev["store"], ev["resolution"]) == ("test", "stores/my_photos/test", 16)
    assert ev["arch"] == "torchvision/resnet18"
    assert 0.0 <= ev["top1"] <= 1.0 and 0.0 <= ev["ece"] <= 1.0, ev
    assert 0.0 <= ev["brier"] <= 2.0 and ev["nll"] > 0, ev  # multi-class Brier: a sum over classes
    assert (tmp_path / ev["reliability_diagram"]).stat().st_size > 1000

    # "or teacher.pt": the same weights, so the same hash keys the temperature and the cache
    assert teacher_hash_of(tmp_path / "teacher.pt") == whash

    # a teacher trained on other classes: calibrate stops with the fix; the fine-tuning block follows it
    calibrate = next(c for c in commands(main) if c[:4] == ["python", "-m", "trainer", "calibrate"])
    r = subprocess.run([sys.executable, *calibrate[1:], "model.teacher_weights=pretrained.safetensors",
                        *TINY],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "expected head size 3, found 10" in r.stderr, r.stderr
    assert "python -m trainer teacher" in r.stderr and "Traceback" not in r.stderr
    recipe = tmp_path / "my_photos.yaml"
    recipe.write_text("".join(line for line in recipe.read_text().splitlines(keepends=True)
                              if "teacher_weights" not in line))  # "delete the teacher_weights line"
    run_block(finetune, tmp_path)
    from trainer.checkpoint import load_checkpoint

    tuned = load_checkpoint(runs / "teacher" / "final.pt")
    assert tuned["num_classes"] == 3 and tuned["arch"] == "torchvision/resnet18"
    run(calibrate, tmp_path)  # steps 3-6 now read the fine-tuned teacher
    assert json.loads((runs / "teacher" / "temperature.json").read_text())["teacher_weights_hash"] == \
        tuned["weights_hash"]
