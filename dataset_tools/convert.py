"""Convert an image dataset into the stores the loaders read (see store.py).

    python dataset_tools/convert.py SRC OUT_DIR [options]   # convert one split
    python dataset_tools/convert.py SRC OUT_DIR --val-fraction F [--val-seed S] [--val-out VAL_DIR]
    python dataset_tools/convert.py verify OUT_DIR          # re-check a converted split

SRC is an ImageFolder, a tar of one, a CIFAR pickle folder/file or an HDF5
file (see dataset_tools/sources.py). Items are decoded, validated, resized,
encoded and hashed in ``--workers`` processes; the main process appends the
results in sample order to the FFCV ``.beton`` files and the webdataset
shards, so outputs are byte-identical whatever the worker count. Everything
is written to a staging directory beside OUT_DIR and swapped in at the end.
(To convert a folder literally named ``verify``, write ``./verify``.)

With ``--val-fraction F`` (0 < F < 1) the source is split class by class
(``dataset_tools/split.py``: ``round(F * n_c)`` images of each class, at
least 1 for a class of 2 or more, never all, chosen by a permutation seeded
from ``--val-seed`` and the class index): OUT_DIR gets the train part and
VAL_DIR the held-out val part (default: a sibling ``val`` when OUT_DIR is
named ``train``, else ``OUT_DIR-val``), both in one pass over the source,
with the same options and the same class list, each staged and swapped in
on its own (each is complete or absent). The val part's split name (file
names) is ``val`` when the train part's is ``train``, else ``NAME-val``.
Each part's manifest records the split under ``holdout`` (schema in
``dataset_tools/stores/layout.py``); a store converted whole has no
``holdout`` key and is byte-identical to one converted before the option
existed.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a plain checkout
    _root = str(Path(__file__).resolve().parent.parent)
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root  # don't let dataset_tools/*.py shadow top-level modules
    elif _root not in sys.path:
        sys.path.insert(0, _root)

import argparse
import contextlib
import functools
import multiprocessing as mp
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np

from dataset_tools.stores import manifest as mf
from dataset_tools.atomic import Staging, write_text_atomic
from dataset_tools.errors import CqkdError, debug_enabled
from dataset_tools.progress import progress as progress_bar
from dataset_tools.stores.layout import MANIFEST_NAME

FORMATS = ("ffcv", "dali")
WRITE_MODES = ("jpg", "raw", "proportion")


@dataclass(frozen=True)
class ConvertOptions:
    formats: tuple[str, ...] = FORMATS
    write_mode: str = "raw"
    max_resolution: Optional[int] = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    student_resolution: Optional[int] = None
    min_crop_scale: float = 0.35
    max_aspect_ratio: float = 4 / 3
    max_pixels: Optional[int] = None
    samples_per_shard: int = 2000
    split_name: Optional[str] = None
    source_kind: Optional[str] = None
    hdf5_images: str = "images"
    hdf5_labels: str = "labels"
    cifar_split: str = "train"
    on_error: str = "fail"
    workers: int = 1
    val_fraction: float = 0.0      # > 0: hold out this share of each class (see module doc)
    val_seed: int = 0
    val_out: Optional[str] = None  # VAL_DIR; None: default_val_dir(OUT_DIR)

    def manifest_options(self) -> dict:
        """Options that shape the output (not ``workers``: outputs do not depend on it;
        not the ``val_*`` ones: a split store records them under ``holdout``, so a
        store converted whole keeps the manifest it always had)."""
        d = asdict(self)
        for k in ("workers", "split_name", "val_fraction", "val_seed", "val_out"):
            d.pop(k)
        d["formats"] = list(self.formats)
        return d


@dataclass
class ConvertResult:
    out_dir: Path
    manifest: dict
    seconds: float
    val: Optional["ConvertResult"] = None  # the held-out part, with --val-fraction

    @property
    def images_per_sec(self) -> float:
        return self.manifest["num_samples"] / max(self.seconds, 1e-9)


class ConvertError(CqkdError):
    """A conversion that must stop; the message names the file and the fix."""


def default_split_name(src: Path) -> str:
    name = src.name
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".hdf5", ".h5", ".hdf"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def default_val_dir(out_dir: os.PathLike | str) -> Path:
    """VAL_DIR when --val-out is not given: ``train`` -> sibling ``val``, else ``OUT_DIR-val``."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", ".."):
        out_dir = Path(os.path.abspath(out_dir))
    return out_dir.with_name("val" if out_dir.name == "train" else f"{out_dir.name}-val")


def val_split_name(split: str) -> str:
    """The val part's split name (its file names): ``train`` -> ``val``, else ``NAME-val``."""
    return "val" if split == "train" else f"{split}-val"


def _check_val_options(opts: ConvertOptions, out_dir: Path) -> Optional[Path]:
    """-> VAL_DIR, or None when nothing is held out."""
    f = opts.val_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 <= f < 1):
        raise ConvertError(f"--val-fraction {f!r}: must be in [0, 1), the share of each "
                           f"class's images to hold out (e.g. 0.1); use 0 or leave it out "
                           f"to convert the whole source")
    if isinstance(opts.val_seed, bool) or not isinstance(opts.val_seed, int) \
            or opts.val_seed < 0:
        raise ConvertError(f"--val-seed {opts.val_seed!r}: must be an integer >= 0")
    if f == 0:
        if opts.val_out is not None:
            raise ConvertError(f"--val-out {opts.val_out} needs --val-fraction F (0 < F < 1): "
                               f"without it nothing is held out; add --val-fraction or drop "
                               f"--val-out")
        return None
    val_dir = Path(opts.val_out) if opts.val_out is not None else default_val_dir(out_dir)
    v, o = val_dir.resolve(), out_dir.resolve()
    if v == o:
        raise ConvertError(f"--val-out {val_dir}: the same folder as OUT_DIR {out_dir}, but the "
                           f"val part needs its own folder; give another --val-out (or leave it "
                           f"out for the default {default_val_dir(out_dir)})")
    if o in v.parents or v in o.parents:
        raise ConvertError(f"--val-out {val_dir}: inside OUT_DIR {out_dir} (or containing it), "
                           f"so replacing one would delete the other; choose a folder beside "
                           f"OUT_DIR (default {default_val_dir(out_dir)})")
    return val_dir


def _check_options(opts: ConvertOptions, split: str) -> None:
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise ConvertError(f"--formats {','.join(opts.formats)}: choose from {','.join(FORMATS)}")
    if opts.write_mode not in WRITE_MODES:
        raise ConvertError(f"--write-mode {opts.write_mode}: choose from {'|'.join(WRITE_MODES)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", split):
        raise ConvertError(f"split name {split!r}: use letters, digits, '_', '-', '.' "
                           f"(pass --split-name)")
    if not 1 <= opts.jpeg_quality <= 100:
        raise ConvertError("--jpeg-quality must be in 1..100")
    for name in ("max_resolution", "student_resolution", "max_pixels"):
        v = getattr(opts, name)
        if v is not None and v < 1:
            raise ConvertError(f"--{name.replace('_', '-')} must be >= 1")


def _parallel_map(fn, items: list, workers: int, chunksize: int,
                  initializer=None) -> Iterator:
    """Ordered results of ``fn`` over ``items``; in-process when workers <= 1.

    Items are handed to the pool only as fast as results are consumed (a
    semaphore), so decoded images never pile up in memory when writing is
    the slower side. Closing the generator early (an error) stops the feeder
    and terminates the pool."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # Not "fork": a process that already ran OpenCV (or any thread pool) would
    # hand its workers locks held by threads that do not exist in the child;
    # cv2.setNumThreads in worker_init then hangs forever. A fork server is a
    # clean, single-threaded process started once. Its workers import what
    # ``fn`` needs at start, so dataset_tools.records stays free of torch,
    # numba and ffcv (see dataset_tools/stores/ffcv_codec.py; tested).
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    gate, stop = threading.Semaphore(max(chunksize * workers * 4, chunksize)), threading.Event()

    def feed() -> Iterator:  # runs in the pool's task-handler thread
        for it in items:
            gate.acquire()
            if stop.is_set():
                return
            yield it

    pool = ctx.Pool(workers, initializer=initializer)
    try:
        for result in pool.imap(fn, feed(), chunksize=chunksize):
            gate.release()
            yield result
    finally:
        stop.set()
        gate.release()  # wake the feeder so it sees ``stop``
        pool.terminate()
        pool.join()


class _Outputs:
    """The writers of one conversion, fed one prepared sample at a time."""

    def __init__(self, root: Path, split: str, opts: ConvertOptions, capacity: int,
                 low_side: Optional[int]):
        from dataset_tools.stores.writers import BetonWriter, ShardWriter, page_size_for
        from ffcv.fields import RGBImageField

        self.beton = self.lowres = self.shards = None
        self.low_side = low_side
        self.digest, self.low_digest = mf.PixelDigest(), mf.PixelDigest()
        try:
            if "ffcv" in opts.formats:
                field = RGBImageField(write_mode=opts.write_mode, max_resolution=opts.max_resolution,
                                      jpeg_quality=opts.jpeg_quality,
                                      compress_probability=opts.compress_probability)
                self.beton = BetonWriter(root / f"{split}.beton", field, capacity,
                                         page_size_for(opts.max_resolution))
            if low_side:
                self.lowres = BetonWriter(root / f"{split}_lowres.beton",
                                          RGBImageField(write_mode="raw"), capacity,
                                          page_size_for(low_side * 2))
            if "dali" in opts.formats:
                self.shards = ShardWriter(root, f"{split}_wds", opts.samples_per_shard)
        except BaseException:
            self.abort()
            raise

    def add(self, idx: int, res) -> None:
        from dataset_tools.stores.writers import RAW_MODE, ImageRecord

        if self.beton:
            self.beton.add(res.ffcv, res.label, idx, res.name)
            self.digest.update(res.ffcv_digest)
        if self.lowres:
            h, w = res.lowres.shape[:2]
            self.lowres.add(ImageRecord(RAW_MODE, h, w, res.lowres.reshape(-1)), res.label, idx,
                            res.name)
            self.low_digest.update(res.lowres_digest)
        if self.shards:
            self.shards.add(idx, res.wds_ext, res.wds_bytes, res.label, res.sha256)

    def close(self) -> dict:
        """Finish every file -> the manifest's ``stores`` section."""
        stores = {}
        if self.beton:
            self.beton.close()
            stores["ffcv"] = {"path": self.beton.path.name, "num_samples": self.beton.count,
                              "sha256": mf.file_sha256(self.beton.path),
                              "pixel_sha256": self.digest.hexdigest()}
        if self.lowres:
            self.lowres.close()
            stores["ffcv_lowres"] = {"path": self.lowres.path.name,
                                     "num_samples": self.lowres.count,
                                     "sha256": mf.file_sha256(self.lowres.path),
                                     "resolution": self.low_side,
                                     "pixel_sha256": self.low_digest.hexdigest()}
        if self.shards:
            stores["dali"] = {"image_ext": self.shards.image_ext, "shards": self.shards.close()}
        return stores

    def abort(self) -> None:
        for w in (self.beton, self.lowres, self.shards):
            if w is not None:
                try:
                    w.abort()
                except Exception:  # already failing; the staging dir is deleted anyway
                    pass


def _check_paths(src: Path, out_dir: Path) -> None:
    """The final swap deletes an existing OUT_DIR: only ever a previous store."""
    s, o = src.resolve(), out_dir.resolve()
    if o == s or o in s.parents or (s.is_dir() and s in o.parents):
        raise ConvertError(f"{out_dir}: the output must be outside the source {src} (and not "
                           f"contain it); choose another OUT_DIR")
    if o.exists() and (not o.is_dir() or (any(o.iterdir()) and not (o / MANIFEST_NAME).is_file())):
        raise ConvertError(f"{out_dir}: exists and is not a converted store (no {MANIFEST_NAME}), "
                           f"so it will not be replaced; choose another OUT_DIR or delete it")


@dataclass
class _Part:
    """One output store of a conversion: the whole source, or its train / val part."""

    role: str                 # "whole" | "train" | "val"
    out_dir: Path
    split: str
    capacity: int             # source items assigned to this part
    staging: Optional[Staging] = None
    outputs: Optional[_Outputs] = None
    stats: Optional[mf.DatasetStats] = None
    fp: Optional[mf.Fingerprint] = None
    skipped: Optional[list] = None
    kept: Optional[list] = None  # source positions actually stored, in order
    stores: Optional[dict] = None
    manifest: Optional[dict] = None


def convert(src: os.PathLike | str, out_dir: os.PathLike | str, opts: ConvertOptions,
            progress: bool = True) -> ConvertResult:
    """Convert ``src`` into ``out_dir`` atomically. Raises ConvertError on bad
    input (with on_error='fail') or bad options, leaving ``out_dir`` untouched.

    With ``opts.val_fraction > 0`` the source is split (see the module doc):
    ``out_dir`` gets the train part and the result's ``.val`` describes the
    val part written to ``opts.val_out`` (default :func:`default_val_dir`)."""
    given_src = str(src)
    src, out_dir = Path(src), Path(out_dir)
    split = opts.split_name or default_split_name(src)
    _check_options(opts, split)
    val_dir = _check_val_options(opts, out_dir)
    _check_paths(src, out_dir)
    if val_dir is not None:
        _check_paths(src, val_dir)
    # after the checks: a bad option is reported without waiting for FFCV's import
    from dataset_tools.records import (EncodeOptions, Rejected, lowres_side, prepare_sample,
                                       worker_init)
    from dataset_tools.sources import BadInput, SourceError, open_source
    from dataset_tools.split import stratified_holdout
    from dataset_tools.stores.writers import RecordTooLarge
    try:
        low_side = (lowres_side(opts.student_resolution, opts.min_crop_scale,
                                opts.max_aspect_ratio) if opts.student_resolution else None)
        source = open_source(src, opts.source_kind, on_error=opts.on_error,
                             hdf5_images=opts.hdf5_images, hdf5_labels=opts.hdf5_labels,
                             split=opts.cifar_split)
    except (ValueError, BadInput, SourceError) as e:
        raise ConvertError(str(e)) from e

    n, workers = len(source.items), max(1, opts.workers)
    owner = np.zeros(n, np.int64)  # index into ``parts`` of each source item
    if val_dir is None:
        parts = [_Part("whole", out_dir, split, n)]
    else:
        train_pos, val_pos = stratified_holdout([it.label for it in source.items],
                                                opts.val_fraction, opts.val_seed)
        if len(val_pos) == 0:
            source.close()
            raise ConvertError(f"--val-fraction {opts.val_fraction}: no class of {src} has 2 or "
                               f"more images, so nothing can be held out; convert without "
                               f"--val-fraction")
        owner[val_pos] = 1
        parts = [_Part("train", out_dir, split, len(train_pos)),
                 _Part("val", val_dir, val_split_name(split), len(val_pos))]
    enc = EncodeOptions(write_mode=opts.write_mode, max_resolution=opts.max_resolution,
                        jpeg_quality=opts.jpeg_quality,
                        compress_probability=opts.compress_probability, lowres_side=low_side,
                        max_pixels=opts.max_pixels, want_ffcv="ffcv" in opts.formats,
                        want_dali="dali" in opts.formats)
    chunksize = max(1, min(16, n // (workers * 8)))  # bounds results in flight, see _parallel_map
    desc = f"convert {split}" + (f" (+ {parts[1].split})" if len(parts) > 1 else "")
    start = time.perf_counter()
    with source, contextlib.ExitStack() as stagings:
        for part in parts:
            part.staging = stagings.enter_context(Staging(part.out_dir))
            part.stats, part.fp = mf.DatasetStats(len(source.classes)), mf.Fingerprint()
            part.skipped, part.kept = list(source.skipped), []
        try:
            with contextlib.ExitStack() as stack:
                for part in parts:
                    part.outputs = _Outputs(part.staging.path, part.split, opts, part.capacity,
                                            low_side)
                results = stack.enter_context(contextlib.closing(_parallel_map(
                    functools.partial(prepare_sample, enc), source.items, workers, chunksize,
                    initializer=worker_init)))
                for pos, res in enumerate(progress_bar(results, total=n, unit="img", desc=desc,
                                                       enabled=progress, mininterval=0.5)):
                    part = parts[owner[pos]]
                    if isinstance(res, Rejected):
                        if opts.on_error == "fail":
                            raise ConvertError(f"{res.message}\n(nothing was written; fix or "
                                               f"remove the file, or pass --on-error skip to "
                                               f"leave it out)")
                        part.skipped.append((res.file, res.reason))
                        continue
                    part.outputs.add(part.stats.count, res)
                    part.stats.update(res.label, res.height, res.width, res.sums, res.sumsq)
                    part.fp.update(res.sha256, res.label)
                    part.kept.append(pos)
            for part in parts:
                if part.stats.count == 0:
                    why = "; ".join(f"{f}: {r}" for f, r in part.skipped[:3])
                    which = "" if part.role == "whole" else f" of the {part.role} part"
                    raise ConvertError(f"{src}: every file{which} was bad, nothing to convert "
                                       f"({why})")
            for part in parts:
                part.stores = part.outputs.close()
        except BaseException as e:
            for part in parts:
                if part.outputs is not None:
                    part.outputs.abort()
            if isinstance(e, RecordTooLarge):
                raise ConvertError(str(e)) from e
            raise
        for part in parts:
            holdout = None if part.role == "whole" else {
                "role": part.role, "val_fraction": opts.val_fraction, "seed": opts.val_seed,
                "source": given_src, "source_positions": part.kept}
            part.manifest = mf.build_manifest(
                split=part.split,
                source={"kind": source.kind, "path": source.path,
                        "description": source.description},
                classes=source.classes, stats=part.stats, fingerprint=part.fp.hexdigest(),
                options={**opts.manifest_options(), "lowres_side": low_side},
                stores=part.stores, skipped=part.skipped, holdout=holdout)
            write_text_atomic(part.staging.path / MANIFEST_NAME,  # last: complete
                              mf.dumps(part.manifest))
        for part in parts:  # both parts are complete on disk before either is swapped in
            part.staging.commit()
    seconds = time.perf_counter() - start
    results = [ConvertResult(out_dir=p.out_dir, manifest=p.manifest, seconds=seconds)
               for p in parts]
    if len(results) > 1:
        results[0].val = results[1]
    return results[0]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="source dataset (folder, tar, CIFAR pickles, HDF5)")
    p.add_argument("out_dir", type=Path, help="output store directory (one split)")
    p.add_argument("--formats", default="ffcv,dali", help="comma list of ffcv,dali (default: both)")
    p.add_argument("--write-mode", choices=WRITE_MODES, default="raw",
                   help="FFCV image storage: raw pixels, jpg, or a proportion of jpg (default raw)")
    p.add_argument("--max-resolution", type=int, help="resize so the longest side is at most N")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality when encoding (90)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="share of JPEG records with --write-mode proportion (0.5)")
    p.add_argument("--student-resolution", type=int,
                   help="also write a raw low-res .beton for students trained at N pixels")
    p.add_argument("--min-crop-scale", type=float, default=0.35,
                   help="smallest random-resized-crop area the low-res size must support (0.35)")
    p.add_argument("--max-aspect-ratio", type=float, default=4 / 3,
                   help="largest crop aspect ratio the low-res size must support (4/3)")
    p.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this")
    p.add_argument("--samples-per-shard", type=int, default=2000,
                   help="samples per webdataset shard (2000)")
    p.add_argument("--split-name", help="split name used in file names (default: SRC's name)")
    p.add_argument("--source-kind", choices=("imagefolder", "tar", "cifar", "hdf5"),
                   help="source kind (default: detected)")
    p.add_argument("--hdf5-images", default="images", help="HDF5 image dataset key (images)")
    p.add_argument("--hdf5-labels", default="labels", help="HDF5 label dataset key (labels)")
    p.add_argument("--cifar-split", choices=("train", "test"), default="train",
                   help="which batches of a CIFAR pickle folder (train)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad file: stop with no output (fail) or leave it out (skip)")
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="decode processes (default: cores, at most 8; 1 = in-process)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="hold out this share of each class (0 <= F < 1) as a validation split "
                        "written to --val-out; OUT_DIR gets the rest (default 0: no split)")
    p.add_argument("--val-seed", type=int, default=0, metavar="S",
                   help="seed of the per-class choice of held-out images (0)")
    p.add_argument("--val-out", metavar="VAL_DIR",
                   help="where the held-out split goes (default: a sibling 'val' when OUT_DIR "
                        "is named 'train', else OUT_DIR-val); needs --val-fraction")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "verify":
        from dataset_tools.verify import main as verify_main
        return verify_main(argv[1:])
    args = _parser().parse_args(argv)
    opts = ConvertOptions(
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        write_mode=args.write_mode, max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
        student_resolution=args.student_resolution, min_crop_scale=args.min_crop_scale,
        max_aspect_ratio=args.max_aspect_ratio, max_pixels=args.max_pixels,
        samples_per_shard=args.samples_per_shard, split_name=args.split_name,
        source_kind=args.source_kind, hdf5_images=args.hdf5_images,
        hdf5_labels=args.hdf5_labels, cifar_split=args.cifar_split, on_error=args.on_error,
        workers=args.workers, val_fraction=args.val_fraction, val_seed=args.val_seed,
        val_out=args.val_out)
    try:
        result = convert(args.src, args.out_dir, opts, progress=not args.no_progress)
    except ConvertError as e:  # bad input or options: exit status 1, as always
        if debug_enabled():
            raise
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    except CqkdError as e:  # any other user-facing failure (dataset_tools/errors.py)
        if debug_enabled():
            raise
        print(f"error: {e}\n(set CQKD_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    if result.val is None:
        m = result.manifest
        print(mf.summary(m))
        print(f"wrote {result.out_dir}: {m['num_samples']} images in {result.seconds:.1f} s "
              f"({result.images_per_sec:.0f} images/s, {opts.workers} worker(s))")
        return 0
    total = 0
    for part in (result, result.val):
        m = part.manifest
        total += m["num_samples"]
        print(mf.summary(m))
        print(f"wrote {part.out_dir}: {m['num_samples']} images ({m['holdout']['role']} part)")
    print(f"converted {total} images in {result.seconds:.1f} s "
          f"({total / max(result.seconds, 1e-9):.0f} images/s, {opts.workers} worker(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
