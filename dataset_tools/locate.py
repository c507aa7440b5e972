"""Where tests, demos and benchmarks find the shared datasets.

Library code never assumes this folder exists; only tests, demos and
benchmarks call :func:`shared_datasets_dir`.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CQKD_DATA"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_datasets_dir() -> Path:
    """``$CQKD_DATA`` if set, else ``../shared/datasets`` beside the repository."""
    root = Path(os.environ.get(ENV_VAR) or _REPO_ROOT.parent / "shared" / "datasets")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: datasets folder not found; set {ENV_VAR} to the folder "
                                f"holding cifar100/ and imagenette-224/")
    return root
