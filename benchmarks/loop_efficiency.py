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
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch


def plain_loop_images_per_sec(*args, **kwargs) -> float:
    """The median of :func:`plain_loop_block_rates`."""
    return statistics.median(plain_loop_block_rates(*args, **kwargs))


def plain_loop_block_rates(arch: str, num_classes: int, batch_size: int, resolution: int, *,
                           low_res_stem: bool = True, channels_last: bool = False, device="cpu",
                           warmup: int = 3, steps: int = 10, repeats: int = 3, seed: int = 0,
                           teacher: Optional[tuple[str, int, bool]] = None) -> list[float]:
    """Images/sec of each of ``repeats`` timed blocks of the plain loop (see module docstring)."""
    from trainer.models import create_model

    torch.manual_seed(seed)
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(arch, num_classes, low_res_stem=low_res_stem).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    if teacher is not None:
        t_arch, t_res, t_stem = teacher
        t_model = create_model(t_arch, num_classes, low_res_stem=t_stem).to(device, memory_format=fmt).eval()
        t_x = torch.randn(batch_size, 3, t_res, t_res, device=device).contiguous(memory_format=fmt)

    def step():
        if teacher is not None:
            with torch.no_grad():
                t_model(t_x)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return rates
