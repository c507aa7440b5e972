"""``benchmarks.demo.ensure_store``: a store that verifies is reused as it is; a
missing, incomplete (no manifest) or damaged one is converted again, saying
why, and the result verifies."""
from __future__ import annotations

import os

import pytest

import dataset_tools.convert
from benchmarks.demo import ensure_store, link_subset
from dataset_tools.stores.layout import open_store
from dataset_tools.verify import verify_store


@pytest.fixture()
def tiny_src(cifar_subset, tmp_path):
    """3 classes x 4 CIFAR PNGs, linked the way the demo links its subsets."""
    return link_subset(cifar_subset, tmp_path / "src", 3, 4)


def test_subset_is_drawn_seeded_from_the_whole_class(cifar_subset, tmp_path):
    a = link_subset(cifar_subset, tmp_path / "a", 2, 3)
    b = link_subset(cifar_subset, tmp_path / "b", 2, 3)
    c = link_subset(cifar_subset, tmp_path / "c", 2, 3, seed=1)
    classes = sorted(p for p in cifar_subset.iterdir() if p.is_dir())[:2]
    assert sorted(p.name for p in a.iterdir()) == [d.name for d in classes]
    picked = {}
    for cdir in classes:
        names = sorted(p.name for p in cdir.iterdir())
        got = [sorted(p.name for p in (root / cdir.name).iterdir()) for root in (a, b, c)]
        assert got[0] == got[1] and len(got[0]) == 3 and set(got[0]) <= set(names)
        assert all((a / cdir.name / n).resolve() == (cdir / n).resolve() for n in got[0])
        picked[cdir.name] = (got[0], got[2], names[:3])
    assert any(g != first for g, _, first in picked.values())  # not the first 3 by name
    assert any(g != g1 for g, g1, _ in picked.values())        # the seed matters
    whole = link_subset(cifar_subset, tmp_path / "whole", 1, 10**9)
    assert sorted(p.name for p in (whole / classes[0].name).iterdir()) == \
        sorted(p.name for p in classes[0].iterdir())


@pytest.fixture()
def convert_calls(monkeypatch):
    """Counts calls of convert.py's main (ensure_store imports it when called)."""
    calls, real = [], dataset_tools.convert.main

    def spy(argv=None):
        calls.append(argv)
        return real(list(argv) + ["--no-progress"])

    monkeypatch.setattr(dataset_tools.convert, "main", spy)
    return calls


def snapshot(root):
    """(inode, mtime_ns) of every file of the store: equal means untouched."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_verified_store_is_reused_damaged_one_reconverted(tiny_src, tmp_path, convert_calls, capsys):
    out = tmp_path / "stores" / "train"
    first = ensure_store(tiny_src, out, "train", 16, 1)  # missing: converted
    assert not first["reused"] and len(convert_calls) == 1
    assert "converting again" in capsys.readouterr().out
    verify_store(out)
    before = snapshot(out)

    again = ensure_store(tiny_src, out, "train", 16, 1)  # verifies: reused, not reconverted
    assert again["reused"] and len(convert_calls) == 1
    assert snapshot(out) == before
    assert "converting again" not in capsys.readouterr().out
    # the same source named by a relative path (the manifest records it resolved)
    relative = os.path.relpath(tiny_src)
    assert ensure_store(type(tiny_src)(relative), out, "train", 16, 1)["reused"] and len(convert_calls) == 1

    beton = out / "train.beton"  # damage the full-res FFCV file (same size, flipped bytes)
    data = bytearray(beton.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    beton.write_bytes(bytes(data))
    fixed = ensure_store(tiny_src, out, "train", 16, 1)
    assert not fixed["reused"] and len(convert_calls) == 2
    said = [line for line in capsys.readouterr().out.splitlines() if "converting again" in line]
    assert len(said) == 1 and "damaged" in said[0] and "train.beton" in said[0]
    verify_store(out)  # raises if the reconverted store is not whole
    assert snapshot(out).keys() == before.keys()


def test_damaged_shard_and_incomplete_store_are_reconverted(tiny_src, tmp_path, convert_calls,
                                                            capsys):
    out = tmp_path / "stores" / "train"
    ensure_store(tiny_src, out, "train", 16, 1)
    capsys.readouterr()
    tar = next((out / "train_wds").glob("*.tar"))
    with open(tar, "r+b") as f:  # cut the shard short: an unreadable tar
        f.truncate(os.path.getsize(tar) // 2)
    assert not ensure_store(tiny_src, out, "train", 16, 1)["reused"]
    assert len(convert_calls) == 2 and "damaged" in capsys.readouterr().out
    verify_store(out)

    (out / "manifest.json").unlink()  # an incomplete store: no manifest
    assert not ensure_store(tiny_src, out, "train", 16, 1)["reused"]
    assert len(convert_calls) == 3 and "manifest.json" in capsys.readouterr().out
    verify_store(out)
    assert open_store(out).num_samples == 12
