"""FFCV sets torch's intra-op threads when imported (to 1) and when a Loader
is built (to its worker count): a training process would run its model on
one core. Every project path that imports FFCV goes through
``dataset_tools.ffcv_import``; this checks, in a fresh process (a thread
count, once lowered, would stay lowered for the rest of the test session),
that converting, verifying and reading a store with the FFCV backend leave
torch's thread count where it was, and that dropping FFCV's loaders prints
no numba finalizer errors (see ``_compile_keeping_plain_functions``)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_converting_verifying_and_loading_keep_torch_threads(cifar_subset, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(2)
        import dataset_tools.convert, dataset_tools.verify, pipelines.ffcv.loader, benchmarks.demo, trainer.jobs
        assert torch.get_num_threads() == 2, ("import", torch.get_num_threads())
        from ffcv.fields.rgb_image import IMAGE_MODES  # not numba's typed Dict: ~5 s saved per process
        assert type(IMAGE_MODES) is dict and IMAGE_MODES == {{"jpg": 0, "raw": 1}}, IMAGE_MODES
        from dataset_tools.convert import main as convert
        assert convert([{str(cifar_subset)!r}, {str(tmp_path / 'store')!r}, "--no-progress", "--workers", "1",
                        "--student-resolution", "16"]) == 0
        assert torch.get_num_threads() == 2, ("convert", torch.get_num_threads())
        dataset_tools.verify.verify_store({str(tmp_path / 'store')!r})
        assert torch.get_num_threads() == 2, ("verify", torch.get_num_threads())
        from pipelines.loader import LoaderConfig, create_loader
        cfg = LoaderConfig(backend="ffcv", store={str(tmp_path / 'store')!r}, batch_size=50, num_workers=1,
                           device="cpu", student_resolution=16)
        with create_loader(cfg) as loader:
            assert torch.get_num_threads() == 2, ("FFCV loader", torch.get_num_threads())
            n = sum(len(b) for b in loader)
        assert n == 200 and torch.get_num_threads() == 2, ("FFCV epoch", n, torch.get_num_threads())
        del loader
        import gc; gc.collect()  # FFCV's duplicate dispatchers must not print finalizer errors
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert "Exception ignored" not in out.stderr, out.stderr[-3000:]
