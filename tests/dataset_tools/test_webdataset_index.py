"""The webdataset read side (dataset_tools/stores/webdataset.py), directly:
the tar-header walk, DALI's index files, the per-sample tables built from
either, and the StoreErrors naming the damaged file."""
from __future__ import annotations

import io
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from dataset_tools.stores import webdataset as wds
from dataset_tools.stores import writers
from dataset_tools.stores.layout import StoreError, open_store

from loader_helpers import convert_store

N, PER_SHARD = 12, 5  # 3 shards: 5 + 5 + 2 samples


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """12 small PNGs (2 classes) converted to DALI shards of 5 samples."""
    src = tmp_path_factory.mktemp("wds_src")
    rng = np.random.default_rng(0)
    for k in range(N):
        d = src / f"c{k % 2}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9 + k, 14, 3), dtype=np.uint8)).save(d / f"{k:02d}.png")
    out = tmp_path_factory.mktemp("wds_store") / "store"
    return convert_store(src, out, "dali", "--samples-per-shard", str(PER_SHARD))


def damaged(store, tmp_path, name="copy"):
    """A copy of the store and its (tar, idx) shard paths."""
    dst = shutil.copytree(store, tmp_path / name)
    return dst, open_store(dst).dali_shards()


def rewrite_tar(tar_path, edit):
    """Rewrite a shard member by member; ``edit(name, data)`` returns the new
    ``(name, data)``, or None to drop the member."""
    with tarfile.open(tar_path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            new = edit(name, data)
            if new is not None:
                info = tarfile.TarInfo(new[0])
                info.size = len(new[1])
                tf.addfile(info, io.BytesIO(new[1]))


def test_names_and_keys():
    assert wds.sample_key(7) == "00000007"
    assert wds.split_name("00000007.jpg") == ("00000007", "jpg")
    assert wds.split_name("a.b/c.d.png") == ("a.b/c", "d.png")  # first dot of the base name
    assert wds.split_name("dir/noext") == ("dir/noext", "")
    assert writers.make_index is wds.make_index  # the writer uses the reader's


def test_tar_walk_locates_every_member(store):
    shards = open_store(store).dali_shards()
    assert len(shards) == 3
    expect = 0
    for tar_path, _ in shards:
        blob = tar_path.read_bytes()
        with tarfile.open(tar_path) as tf:
            truth = {m.name: tf.extractfile(m).read() for m in tf}
        for smp in wds.iter_tar_samples(tar_path):
            assert smp.key == wds.sample_key(expect)
            assert sorted(smp.members) == ["cls", "index", "png", "sha256"]
            assert smp.image_ext == "png"
            for ext, (off, size) in smp.members.items():
                assert blob[off:off + size] == truth[f"{smp.key}.{ext}"]
            assert set(smp.data) == set(wds.SMALL_EXTS)  # the image is located, not read
            assert int(smp.data["index"]) == expect
            expect += 1
    assert expect == N


def test_index_file_and_tar_headers_agree(store):
    s = open_store(store)
    by_tar = wds.index_shards(s)
    by_idx = wds.ShardTable(s.dali_shards(), s.num_samples, s.root)
    np.testing.assert_array_equal(by_tar.shard, by_idx.shard)
    np.testing.assert_array_equal(by_tar.offset, by_idx.img_off)
    np.testing.assert_array_equal(by_tar.size, by_idx.img_len)
    np.testing.assert_array_equal(by_tar.shard, np.arange(N) // PER_SHARD)
    assert by_tar.tars == [str(t) for t in by_idx.tars]
    assert not by_tar.is_jpeg.any()
    assert np.bincount(by_tar.labels).tolist() == s.manifest["class_counts"]
    for i in range(N):  # the .cls byte ranges of the index hold the labels
        with open(by_idx.tars[by_idx.shard[i]], "rb") as f:
            f.seek(int(by_idx.cls_off[i]))
            assert int(f.read(int(by_idx.cls_len[i]))) == by_tar.labels[i]


def test_index_parse_is_cached_by_mtime_and_size(store, tmp_path):
    _, shards = damaged(store, tmp_path)
    idx = shards[0][1]
    first = wds.read_index(idx)
    assert wds.read_index(idx) is first  # parsed once
    assert not any(a.flags.writeable for a in first)  # the cached arrays cannot be changed
    keys = first[0]
    np.testing.assert_array_equal(keys, np.arange(PER_SHARD))
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1]) + "\n")  # the last sample dropped
    again = wds.read_index(idx)
    assert again is not first
    np.testing.assert_array_equal(again[0], np.arange(PER_SHARD - 1))


def test_damaged_index_names_the_file(store, tmp_path):
    d, shards = damaged(store, tmp_path)
    s = open_store(d)
    idx0, idx1 = shards[0][1], shards[1][1]
    good = idx0.read_text()

    idx0.write_text("garbage\n")
    with pytest.raises(StoreError, match=f"{idx0}: not a DALI webdataset index"):
        wds.ShardTable(shards, s.num_samples, s.root)

    lines = good.splitlines()
    lines[2] = lines[2].replace("cls", "txt")  # sample 1 lacks its .cls
    idx0.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match=f"{idx0}: sample line 2 is malformed or lacks"):
        wds.ShardTable(shards, s.num_samples, s.root)

    lines = good.splitlines()
    lines[3] = lines[2]  # sample 1 listed twice, sample 2 not at all
    idx0.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match=f"{idx0}: sample key 00000001 listed more than once"):
        wds.ShardTable(shards, s.num_samples, s.root)

    idx0.write_text(good)
    shutil.copyfile(idx0, idx1)  # shard 1's index duplicated from shard 0's
    with pytest.raises(StoreError, match=f"{idx1}: sample keys repeated across shards"):
        wds.ShardTable(shards, s.num_samples, s.root)

    shutil.copyfile(store / "train_wds" / idx1.name, idx1)
    wds.ShardTable(shards, s.num_samples, s.root)  # repaired
    os.truncate(shards[2][0], 1024)
    with pytest.raises(StoreError, match=f"{shards[2][1]}: lists members beyond the end of"):
        wds.ShardTable(shards, s.num_samples, s.root)


def test_missing_member_names_the_tar(store, tmp_path):
    d, shards = damaged(store, tmp_path)
    tar = shards[0][0]
    rewrite_tar(tar, lambda name, data: None if name == "00000003.cls" else (name, data))
    with pytest.raises(StoreError, match=rf"{tar}: sample '00000003' lacks an image/\.cls/\.index "
                                         r"member \(has \['index', 'png', 'sha256'\]\)"):
        wds.index_shards(open_store(d))


def test_duplicated_index_member_names_the_tar(store, tmp_path):
    d, shards = damaged(store, tmp_path)
    tar = shards[1][0]
    rewrite_tar(tar, lambda name, data: (name, b"3") if name == "00000006.index" else (name, data))
    with pytest.raises(StoreError, match=rf"{tar}: sample '00000006' has index 3, out of range "
                                         rf"\[0, {N}\) or duplicated"):
        wds.index_shards(open_store(d))
    rewrite_tar(tar, lambda name, data: (name, b"six") if name == "00000006.index" else (name, data))
    with pytest.raises(StoreError, match=rf"{tar}: sample '00000006' has a non-integer"):
        wds.index_shards(open_store(d))


def test_unreadable_and_emptied_tars(store, tmp_path):
    d, shards = damaged(store, tmp_path)
    tar = shards[2][0]
    tar.write_bytes(b"")
    with pytest.raises(wds.UnreadableShard, match=f"{tar}: unreadable webdataset shard") as e:
        list(wds.iter_tar_samples(tar))
    assert isinstance(e.value, StoreError) and e.value.path == tar
    with pytest.raises(StoreError, match=f"{tar}: unreadable webdataset shard"):
        wds.index_shards(open_store(d))
    with tarfile.open(tar, "w"):  # a valid tar without its samples
        pass
    with pytest.raises(StoreError, match=f"lack 2 of {N} samples"):
        wds.index_shards(open_store(d))
