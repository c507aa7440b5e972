"""What a conversion is asked to do (:class:`ConvertOptions`), what it
returns, and the checks it makes on its options and paths before reading
anything, so a bad command fails at once with the fix in the message."""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dataset_tools.errors import CqkdError
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
    checkpoint_every: Optional[int] = None  # source items; None: every ~30 s (resume.py)

    def manifest_options(self) -> dict:
        """Options that shape the output (not ``workers`` or ``checkpoint_every``:
        outputs do not depend on them; not the ``val_*`` ones: a split store
        records them under ``holdout``, so a store converted whole keeps the
        manifest it always had)."""
        d = asdict(self)
        for k in ("workers", "split_name", "val_fraction", "val_seed", "val_out",
                  "checkpoint_every"):
            d.pop(k)
        d["formats"] = list(self.formats)
        return d


@dataclass
class ConvertResult:
    out_dir: Path
    manifest: dict
    seconds: float
    val: Optional["ConvertResult"] = None  # the held-out part, with --val-fraction
    resumed: int = 0                        # source items reused from a killed run
    discarded: Optional[str] = None         # why a killed run's partial work was not used

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


def check_val_options(opts: ConvertOptions, out_dir: Path) -> Optional[Path]:
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


def check_options(opts: ConvertOptions, split: str) -> None:
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
    for name in ("max_resolution", "student_resolution", "max_pixels", "checkpoint_every"):
        v = getattr(opts, name)
        if v is not None and v < 1:
            raise ConvertError(f"--{name.replace('_', '-')} must be >= 1")


def check_paths(src: Path, out_dir: Path) -> None:
    """The final swap deletes an existing OUT_DIR: only ever a previous store."""
    s, o = src.resolve(), out_dir.resolve()
    if o == s or o in s.parents or (s.is_dir() and s in o.parents):
        raise ConvertError(f"{out_dir}: the output must be outside the source {src} (and not "
                           f"contain it); choose another OUT_DIR")
    if o.exists() and (not o.is_dir() or (any(o.iterdir()) and not (o / MANIFEST_NAME).is_file())):
        raise ConvertError(f"{out_dir}: exists and is not a converted store (no {MANIFEST_NAME}), "
                           f"so it will not be replaced; choose another OUT_DIR or delete it")
