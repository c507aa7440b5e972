"""benchmarks/loaders.py end to end on a tiny store: the report's contract
(keys, sources, ratios, whole epochs counted) for our FFCV variants and the
stock-FFCV and stock-torchvision baselines. No speed is asserted (rates are only checked positive)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from benchmarks.loaders import main as loaders_main
from loader_helpers import backend_import_error, convert_store

VARIANTS = ["ffcv", "ffcv_lowres", "ffcv_stock", "ffcv_stock_lowres", "dali", "dali_exact",
            "dali_stock", "torchvision_stock"]


@pytest.fixture(scope="module")
def store(imagenette_subset, tmp_path_factory):
    """80 JPEGs (224 px): a jpg .beton + its 32 px low-res companion, and the
    shards the reference reads."""
    return convert_store(imagenette_subset, tmp_path_factory.mktemp("bench") / "store", "ffcv,dali",
                         "--write-mode", "jpg", "--student-resolution", "32")


@pytest.mark.slow  # one fresh process per variant, FFCV compiles its pipelines in each (~1.5 min)
def test_report_covers_our_ffcv_and_the_stock_baselines(store):
    why = backend_import_error("ffcv") or backend_import_error("dali")
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
    assert results["dali_stock"]["source"] == results["dali"]["source"] == "jpeg"
    assert results["dali_exact"]["source"] == "jpeg"
    for ours, stock, key in (("ffcv", "ffcv_stock", "ffcv"), ("ffcv_lowres", "ffcv_stock_lowres", "ffcv"),
                             ("dali", "dali_stock", "dali"), ("dali_exact", "dali_stock", "dali")):
        want = results[ours]["images_per_sec"] / results[stock]["images_per_sec"]
        assert results[ours][f"ratio_to_stock_{key}"] == pytest.approx(want)
    assert not any(k.startswith("ratio_to_stock") for k in results["reference"])
    tv = results["torchvision_stock"]
    assert tv["source"] == results["reference"]["source"] == "jpeg"
    for name, r in results.items():  # every variant against the ImageFolder pipeline
        assert r["ratio_to_torchvision_stock"] == pytest.approx(
            r["images_per_sec"] / tv["images_per_sec"]), name
