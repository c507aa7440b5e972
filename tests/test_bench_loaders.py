"""benchmarks/loaders.py end to end on a tiny store: the report's contract
(keys, sources, ratios, whole epochs counted) for our FFCV variants and the
stock-FFCV baselines. No speed is asserted (rates are only checked positive)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from benchmarks.loaders import main as loaders_main
from loader_helpers import backend_import_error, convert_store

VARIANTS = ["ffcv", "ffcv_lowres", "ffcv_stock", "ffcv_stock_lowres"]


@pytest.fixture(scope="module")
def store(imagenette_subset, tmp_path_factory):
    """80 JPEGs (224 px): a jpg .beton + its 32 px low-res companion, and the
    shards the reference reads."""
    return convert_store(imagenette_subset, tmp_path_factory.mktemp("bench") / "store", "ffcv,dali",
                         "--write-mode", "jpg", "--student-resolution", "32")


@pytest.mark.slow  # one fresh process per variant, FFCV compiles its pipelines in each (~1 min)
def test_report_covers_our_ffcv_and_stock_ffcv(store):
    why = backend_import_error("ffcv")
    if why:
        pytest.skip(why)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = loaders_main(["--data", str(store), "--resolution", "16", "--batch-size", "16",
                           "--workers", "1", "--warmup", "0", "--repeats", "1",
                           "--min-seconds", "0", "--timeout", "300", "--json",
                           "--backends", *VARIANTS])
    assert rc == 0
    results = json.loads(out.getvalue())["results"]
    assert set(results) == {"reference", *VARIANTS}
    for name, r in results.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["images_per_sec"] > 0 and r["peak_rss_mb"] > 0, name
        assert r["images_per_epoch"] == 80, name  # 5 whole batches of 16 per epoch
    assert results["ffcv_stock"]["source"] == results["ffcv"]["source"] == "jpeg"
    assert results["ffcv_stock_lowres"]["source"] == results["ffcv_lowres"]["source"] == "lowres"
    for ours, stock in (("ffcv", "ffcv_stock"), ("ffcv_lowres", "ffcv_stock_lowres")):
        want = results[ours]["images_per_sec"] / results[stock]["images_per_sec"]
        assert results[ours]["ratio_to_stock_ffcv"] == pytest.approx(want)
    assert "ratio_to_stock_ffcv" not in results["reference"]
