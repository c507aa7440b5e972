"""Convert an image dataset into the stores the loaders read
(layout: ``dataset_tools/stores/layout.py``; options and their checks:
``dataset_tools/convert_options.py``).

    python dataset_tools/convert.py SRC OUT_DIR [options]   # convert one split
    python dataset_tools/convert.py SRC OUT_DIR --val-fraction F [--val-seed S] [--val-out VAL_DIR]
    python dataset_tools/convert.py verify OUT_DIR          # re-check a converted split

SRC is an ImageFolder, a tar of one, a CIFAR pickle folder/file or an HDF5
file (see ``dataset_tools/sources/``). Items are decoded, validated, resized,
encoded and hashed in ``--workers`` processes; the main process appends the
results in sample order to the FFCV ``.beton`` files and the webdataset
shards, so outputs are byte-identical whatever the worker count. Everything
is written to a staging directory beside OUT_DIR and swapped in at the end.
(To convert a folder literally named ``verify``, write ``./verify``.)

A killed run resumes: the writers checkpoint every ``--checkpoint-every N``
source items (default: every 30 s), and rerunning the same command takes the
dead run's staging directory over, cuts its files back to the last
checkpoint and converts only the rest; the result is byte-identical to an
uninterrupted run, whatever the worker counts, and the progress bar says how
many items were resumed. Partial work made with other output-shaping options
or another source (a file's size or mtime changed) is discarded, with a
message naming the difference (``dataset_tools/resume.py``). A run stopped by
a bad file (``--on-error fail``) keeps nothing.

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
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from dataset_tools.stores import manifest as mf
from dataset_tools.atomic import Staging, write_text_atomic
from dataset_tools.convert_options import (WRITE_MODES, ConvertError, ConvertOptions, ConvertResult,
                                           check_options, check_paths, check_val_options,
                                           default_split_name, val_split_name)
from dataset_tools.errors import CqkdError, debug_enabled
from dataset_tools.parallel import parallel_map
from dataset_tools.progress import log_line, progress as progress_bar
from dataset_tools.resume import RESUME_DIR, ResumeLog, conversion_key
from dataset_tools.stores.layout import MANIFEST_NAME

if TYPE_CHECKING:  # the writers import FFCV (~5 s of numba compiling): only when writing
    from dataset_tools.part_writer import PartWriter


@dataclass
class _Part:
    """One output store of a conversion: the whole source, or its train / val part."""

    role: str                 # "whole" | "train" | "val"
    out_dir: Path
    split: str
    capacity: int             # source items assigned to this part
    staging: Optional[Staging] = None
    writer: Optional[PartWriter] = None
    stores: Optional[dict] = None
    manifest: Optional[dict] = None


def convert(src: os.PathLike | str, out_dir: os.PathLike | str, opts: ConvertOptions,
            progress: bool = True) -> ConvertResult:
    """Convert ``src`` into ``out_dir`` atomically. Raises ConvertError on bad
    input (with on_error='fail') or bad options, leaving ``out_dir`` untouched.

    With ``opts.val_fraction > 0`` the source is split (see the module doc):
    ``out_dir`` gets the train part and the result's ``.val`` describes the
    val part written to ``opts.val_out`` (default :func:`default_val_dir`).

    A run killed earlier into the same folders is resumed from its last
    checkpoint (``dataset_tools/resume.py``); ``result.resumed`` says how many
    source items were reused, ``result.discarded`` why partial work was not."""
    given_src = str(src)
    src, out_dir = Path(src), Path(out_dir)
    split = opts.split_name or default_split_name(src)
    check_options(opts, split)
    val_dir = check_val_options(opts, out_dir)
    check_paths(src, out_dir)
    if val_dir is not None:
        check_paths(src, val_dir)
    # after the checks: a bad option is reported without waiting for FFCV's import
    from dataset_tools.records import (EncodeOptions, Rejected, lowres_side, prepare_sample,
                                       worker_init)
    from dataset_tools.sources import BadInput, SourceError, open_source
    from dataset_tools.split import stratified_holdout
    from dataset_tools.stores.writers import RecordTooLarge, ResumeMismatch
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
    options = {**opts.manifest_options(), "lowres_side": low_side}
    key = conversion_key(options=options, source=source, given_src=given_src, layout={
        "parts": [[p.role, str(p.out_dir.absolute()), p.split] for p in parts],
        "val_fraction": opts.val_fraction, "val_seed": opts.val_seed})
    chunksize = max(1, min(16, n // (workers * 8)))  # bounds results in flight, see parallel_map
    desc = f"convert {split}" + (f" (+ {parts[1].split})" if len(parts) > 1 else "")
    start = time.perf_counter()
    with source, contextlib.ExitStack() as stagings:
        for part in parts:  # the first part's adopted run decides the others'
            tag = None if part is parts[0] else parts[0].staging.adopted_tag
            adopt = part is parts[0] or tag is not None
            part.staging = stagings.enter_context(Staging(
                part.out_dir, adopt=RESUME_DIR if adopt else None, adopt_tag=tag,
                keep_on_interrupt=True))
        log = ResumeLog([p.staging for p in parts], key, opts.checkpoint_every)
        ckpt = log.start()
        try:
            ckpt = _open_writers(parts, opts, low_side, source, ckpt, log,
                                 (ResumeMismatch, KeyError))
            done = 0 if ckpt is None else ckpt.position
            if log.note and progress:
                log_line(f"convert: {log.note}")
            if done:
                desc += f", resumed {done:,} of {n:,} from finished chunks"
            with contextlib.closing(parallel_map(
                    functools.partial(prepare_sample, enc), source.items[done:], workers,
                    chunksize, initializer=worker_init)) as results:
                bar = progress_bar(results, total=n, initial=done, unit="img", desc=desc,
                                   enabled=progress, mininterval=0.5)
                for pos, res in enumerate(bar, start=done):
                    part = parts[owner[pos]]
                    if isinstance(res, Rejected):
                        if opts.on_error == "fail":
                            raise ConvertError(f"{res.message}\n(nothing was written; fix or "
                                               f"remove the file, or pass --on-error skip to "
                                               f"leave it out)")
                        part.writer.skip(res.file, res.reason)
                    else:
                        part.writer.add(pos, res)
                    if log.due(pos + 1) and pos + 1 < n:
                        log.save(pos + 1, parts)
            if done < n:  # the end of the loop: a kill while closing redoes no sample
                log.save(n, parts)
            for part in parts:
                if part.writer.count == 0:
                    why = "; ".join(f"{f}: {r}" for f, r in part.writer.skipped[:3])
                    which = "" if part.role == "whole" else f" of the {part.role} part"
                    raise ConvertError(f"{src}: every file{which} was bad, nothing to convert "
                                       f"({why})")
            for part in parts:
                part.stores = part.writer.close()
        except BaseException as e:
            for part in parts:
                if part.writer is not None:
                    part.writer.abort()
            if isinstance(e, RecordTooLarge):
                raise ConvertError(str(e)) from e
            raise
        for part in parts:
            w = part.writer
            holdout = None if part.role == "whole" else {
                "role": part.role, "val_fraction": opts.val_fraction, "seed": opts.val_seed,
                "source": given_src, "source_positions": w.kept}
            part.manifest = mf.build_manifest(
                split=part.split,
                source={"kind": source.kind, "path": source.path,
                        "description": source.description},
                classes=source.classes, stats=w.stats, fingerprint=w.fp.hexdigest(),
                options=options, stores=part.stores, skipped=w.skipped, holdout=holdout)
        log.finish()
        for part in parts:
            write_text_atomic(part.staging.path / MANIFEST_NAME,  # last: complete
                              mf.dumps(part.manifest))
        for part in parts:  # both parts are complete on disk before either is swapped in
            part.staging.commit()
    seconds = time.perf_counter() - start
    results = [ConvertResult(out_dir=p.out_dir, manifest=p.manifest, seconds=seconds,
                             resumed=done, discarded=log.note) for p in parts]
    if len(results) > 1:
        results[0].val = results[1]
    return results[0]


def _open_writers(parts: list, opts: ConvertOptions, low_side, source, ckpt, log, mismatch):
    """Each part's :class:`PartWriter`, continuing ``ckpt`` when there is one;
    files that do not match it (``mismatch``) -> start over. -> the checkpoint used."""
    from dataset_tools.part_writer import PartWriter

    def open_all(ckpt) -> None:
        for part in parts:
            part.writer = PartWriter(part.staging.path, part.split, opts, part.capacity,
                                     low_side, len(source.classes), source.skipped,
                                     resume=None if ckpt is None else ckpt.part(part.role))

    try:
        open_all(ckpt)
        return ckpt
    except mismatch as e:
        for part in parts:
            if part.writer is not None:
                part.writer.abort()
                part.writer = None
        log.restart(f"its files do not match its checkpoint ({e})")
        open_all(None)
        return None


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
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="checkpoint after every N source items so a killed run resumes "
                        "(default: every 30 s of converting)")
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
        val_out=args.val_out, checkpoint_every=args.checkpoint_every)
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
    if result.discarded and args.no_progress:  # else the progress output said so
        print(f"convert: {result.discarded}", file=sys.stderr)
    if result.resumed:
        print(f"resumed {result.resumed:,} source items from a killed run's finished chunks "
              f"(the rate below counts the whole store)")
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
