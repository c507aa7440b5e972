"""The loader base refuses a low-res run that would upscale (issue 14 item 5).

``store`` holds 224 px Imagenette images (FFCV and webdataset) with a
low-res companion built for a 32 px student (default --min-crop-scale 0.35, --max-aspect-ratio 4/3):
shorter side ceil(32 * sqrt((4/3) / 0.35)) = 63 px. The check runs in
``BaseLoader`` so every backend gets it; the oracle for "would upscale" is
the crop geometry itself: the smallest crop a config can draw has a short
side of ``63 * sqrt(scale_lo / aspect_max)`` px."""
from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from dataset_tools.stores.layout import StoreError
from pipelines.loader import LoaderConfig, create_loader
from pipelines.views import ViewConfig, view_params

pytestmark = pytest.mark.filterwarnings(
    # numba finalizers of FFCV-compiled functions complain at garbage collection
    "ignore::pytest.PytestUnraisableExceptionWarning")

SIDE = 63
BACKENDS = ["reference", "ffcv", pytest.param("dali", marks=pytest.mark.skipif(
    importlib.util.find_spec("nvidia.dali") is None, reason="DALI is not installed"))]


@pytest.fixture(scope="module")
def store(imagenette_subset, tmp_path_factory):
    from loader_helpers import convert_store

    return convert_store(imagenette_subset, tmp_path_factory.mktemp("lowres_check") / "store",
                         "ffcv,dali", "--write-mode", "raw", "--student-resolution", "32")


def cfg(store, backend="reference", **kw) -> LoaderConfig:
    base = dict(backend=backend, store=str(store), lowres=True, batch_size=16, num_workers=1,
                device="cpu", drop_last=False, student_resolution=32, reduced_decode=False)
    base.update(kw)
    return LoaderConfig(**base)


def smallest_crop_side(c: LoaderConfig, n: int = 4000) -> float:
    """Independent oracle: the shortest crop side, in low-res pixels, that the
    view contract draws for these settings over many samples (square image)."""
    views = ViewConfig(seed=0, num_views=0, scale=tuple(c.scale), ratio=tuple(c.ratio))
    idx = np.arange(n, dtype=np.int64)
    boxes, _ = view_params(views, idx, np.ones(n, dtype=np.int64))
    return float(np.minimum(boxes[:, 2], boxes[:, 3]).min() * SIDE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_larger_student_is_refused_by_every_backend(store, backend):
    with pytest.raises(StoreError) as err:
        create_loader(cfg(store, backend, student_resolution=48))
    msg = str(err.value)
    assert msg.startswith(f"{store}: its low-res store train_lowres.beton has shorter side "
                          f"63 px (built for a 32 px student, min crop scale 0.35)")
    assert "this run's student resolution 48 px with crop scale lower bound 0.35 (data.scale)" \
        in msg
    assert "crops as little as 32.3 px of it and would upscale that to 48 px" in msg
    assert "reconvert with --student-resolution 48 (a low-res side of 94 px)" in msg
    assert msg.endswith("or set data.lowres=false to crop the full-resolution store")


@pytest.mark.parametrize("kw,flags", [
    (dict(scale=(0.2, 1.0)),
     "--student-resolution 32 --min-crop-scale 0.2 (a low-res side of 83 px)"),
    (dict(ratio=(0.5, 2.0)),
     "--student-resolution 32 --max-aspect-ratio 2.0 (a low-res side of 77 px)"),
])
def test_smaller_crops_are_refused_and_the_suggested_fixes_work(store, kw, flags):
    c = cfg(store, **kw)
    assert smallest_crop_side(c) < 32  # the crops really would upscale
    with pytest.raises(StoreError) as err:
        create_loader(c)
    msg = str(err.value)
    assert f"reconvert with {flags}" in msg
    lo = float(re.search(r"raise data.scale's lower bound to at least ([0-9.]+)", msg)[1])
    fixed = cfg(store, **{**kw, "scale": (lo, 1.0)})
    assert smallest_crop_side(fixed) >= 32 - 1e-9
    create_loader(fixed).close()  # the suggested scale is accepted
    create_loader(cfg(store, **kw, lowres=False)).close()  # and so is data.lowres=false


def test_what_the_store_was_built_for_is_accepted(store):
    c = cfg(store)
    assert smallest_crop_side(c) >= 32 * (1 - 1e-9)
    create_loader(c).close()


def test_whole_image_views_need_the_side_itself(store):
    create_loader(cfg(store, train=False, student_resolution=SIDE)).close()
    with pytest.raises(StoreError) as err:
        create_loader(cfg(store, train=False, student_resolution=SIDE + 1))
    msg = str(err.value)
    assert "with whole-image views crops as little as 63.0 px" in msg
    assert "reconvert with --student-resolution 64 (a low-res side of 64 px)" in msg
    assert "data.scale's lower bound" not in msg  # no crop scale helps whole images
