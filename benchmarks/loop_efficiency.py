"""The plain PyTorch loop a training job is compared with: loop efficiency =
images/sec of the real job over images/sec of this loop for the same model,
batch size, resolution, memory format and device.

The plain loop is ``create_model``, SGD with momentum, cross-entropy,
forward + backward + step over one fixed batch of random tensors already on
the device: what the model alone costs, with no data loading, targets,
mixing, logging or validation. With ``teacher=(arch, resolution,
low_res_stem)`` each step also runs that model's no-grad eval forward on a
fixed batch at its resolution: the plain loop of distillation from an online
teacher. Warm-up steps are excluded; the figure is the median of ``repeats``
timed blocks of ``steps`` steps.

The plain loop's SGD is torch's default (a loop over parameter tensors), as
a user would write it; the trainer's is ``fused``, which on the CPU saves
~0.3-0.45 ms of a ~17 ms resnet8 step at 16 px, so the students' ratios
include that 2-2.5 % (docs/results.md, "Loop efficiency").
"""
from __future__ import annotations

import time
from typing import Optional

import torch


class PlainLoop:
    """The plain loop of one model (see module docstring), built once so it
    can run timed blocks between a job's epochs
    (:func:`benchmarks.loop_pairs.paired_efficiency`)."""

    def __init__(self, arch: str, num_classes: int, batch_size: int, resolution: int, *,
                 low_res_stem: bool = True, channels_last: bool = False, device="cpu", seed: int = 0,
                 teacher: Optional[tuple[str, int, bool]] = None):
        from trainer.models import create_model

        torch.manual_seed(seed)
        self.device, self.batch_size = torch.device(device), batch_size
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = create_model(arch, num_classes, low_res_stem=low_res_stem).to(
            self.device, memory_format=fmt).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch_size, 3, resolution, resolution, device=self.device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, num_classes, (batch_size,), device=self.device)
        self.teacher = None
        if teacher is not None:
            t_arch, t_res, t_stem = teacher
            self.teacher = create_model(t_arch, num_classes, low_res_stem=t_stem).to(
                self.device, memory_format=fmt).eval()
            self.t_x = torch.randn(batch_size, 3, t_res, t_res, device=self.device).contiguous(memory_format=fmt)

    def step(self) -> None:
        if self.teacher is not None:
            with torch.no_grad():
                self.teacher(self.t_x)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def block_rate(self, steps: int) -> float:
        """Images/sec of ``steps`` steps in a row."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * self.batch_size / (time.perf_counter() - t0)

    def block_rates(self, warmup: int = 3, steps: int = 10, repeats: int = 3) -> list[float]:
        """``warmup`` untimed steps, then the images/sec of each of ``repeats``
        blocks of ``steps`` steps."""
        for _ in range(warmup):
            self.step()
        return [self.block_rate(steps) for _ in range(repeats)]


def plain_loop_for(cfg, role: str, num_classes: int, device=None) -> PlainLoop:
    """The plain loop of a recipe's ``role`` ("teacher" or "student"): its
    model, batch size, resolution, stem and memory format; a student taught
    by the online teacher gets the teacher's forward too."""
    d, m = cfg.data, cfg.model
    teacher = (m.teacher, d.teacher_resolution, m.teacher_low_res_stem)
    arch, res, stem = teacher if role == "teacher" else (m.student, d.student_size, m.student_low_res_stem)
    online = teacher if role == "student" and cfg.distill.targets == "online" else None
    if device is None:
        device = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
    return PlainLoop(arch, num_classes, d.batch_size, res, low_res_stem=stem, channels_last=d.channels_last,
                     device=device, teacher=online)
