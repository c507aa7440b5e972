"""The one model registry, in timm's style: entry points registered by
decorator, looked up by name, listed by pattern.

Three sources of names, one namespace:

* the project's models, registered with :func:`register_model` where they are
  defined: the CIFAR models of the KD/CRD literature (HobbitLong/RepDistiller
  spellings; low-resolution by design) and torchvision ImageNet models in the
  project's own wrapper (``resnet18``, ``resnet50``, ``mobilenet_v3_*``).
  Lookup is case-insensitive, with RepDistiller's aliases;
* ``torchvision/<name>``: any classifier ``torchvision.models.list_models``
  lists (e.g. ``torchvision/resnet50``, ``torchvision/convnext_tiny``);
* ``timm/<name>``: any model ``timm.list_models`` lists, optionally with a
  pretrained tag (``timm/resnet18.a1_in1k``; the tag only names the recipe,
  since nothing is downloaded).

``create_model(name, num_classes, low_res_stem=...)`` builds every one of
them randomly initialised (see :mod:`trainer.models.library` for the
library wrappers and :mod:`trainer.models.stems` for which architectures
take ``low_res_stem``). An unknown name raises :class:`ModelError` with the
closest names (difflib) and how to list them: ``python -m trainer.models``.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
from typing import Callable, Dict, List, Tuple

from dataset_tools.errors import CqkdError

_ENTRYPOINTS: Dict[str, Callable] = {}
_FAMILY: Dict[str, str] = {}  # name -> "cifar" (low-res by design) | "imagenet" (takes low_res_stem)
_ALIASES: Dict[str, str] = {}
SOURCES = ("project", "torchvision", "timm")
LIBRARIES = ("torchvision", "timm")


class ModelError(CqkdError, KeyError):
    """An unknown model name (``model.teacher`` / ``model.student`` or a
    checkpoint's ``arch``); the message names the closest valid names. Still a
    ``KeyError`` for code that caught the old error."""

    def __str__(self) -> str:  # KeyError would repr() the message (quotes)
        return str(self.args[0]) if self.args else ""


def register_model(family: str, aliases: Tuple[str, ...] = ()):
    """Decorator: register a project model's builder under its function name.
    ``family="cifar"``: low-resolution by design (accepts and ignores
    ``low_res_stem``); ``"imagenet"``: takes ``low_res_stem``."""
    if family not in ("cifar", "imagenet"):
        raise ValueError(f"family must be cifar or imagenet, got {family!r}")

    def add(fn: Callable) -> Callable:
        name = fn.__name__.lower()
        _ENTRYPOINTS[name], _FAMILY[name] = fn, family
        _ALIASES.update({a.lower(): name for a in aliases})
        return fn

    return add


@functools.lru_cache(maxsize=None)
def _library_names(source: str) -> Tuple[str, ...]:
    from trainer.models.library import timm_names, torchvision_names

    return tuple(torchvision_names() if source == "torchvision" else timm_names())


def split_name(name: str) -> Tuple[str, str]:
    """``"timm/resnet18"`` -> ``("timm", "resnet18")``; ``"resnet8"`` -> ``("project", "resnet8")``."""
    prefix, sep, rest = name.partition("/")
    if not sep:
        return "project", name
    return prefix.lower(), rest


def list_models(pattern: str = "", source: str = "project") -> List[str]:
    """Model names of ``source`` (``project`` | ``torchvision`` | ``timm`` |
    ``all``), library names with their prefix, filtered by an fnmatch
    ``pattern`` (case-insensitive, e.g. ``"*resnet*"``)."""
    if source not in SOURCES + ("all",):
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, all; got {source!r}")
    names = sorted(_ENTRYPOINTS) if source in ("project", "all") else []
    for lib in LIBRARIES:
        if source in (lib, "all"):
            names += [f"{lib}/{n}" for n in _library_names(lib)]
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())
                 or fnmatch.fnmatch(split_name(n)[1].lower(), pattern.lower())]
    return names


def _known(source: str, bare: str) -> bool:
    if source == "torchvision":
        return bare in _library_names("torchvision")
    import timm

    return timm.is_model(bare)


def _suggestions(name: str, n: int = 6) -> List[str]:
    """The closest valid names: the bare part against every source's names."""
    source, bare = split_name(name)
    pool: Dict[str, List[str]] = {}
    for key in list(_ENTRYPOINTS) + list(_ALIASES):
        pool.setdefault(key, []).append(key)
    for lib in LIBRARIES:
        for key in _library_names(lib):
            pool.setdefault(key, []).append(f"{lib}/{key}")
    close = difflib.get_close_matches(bare.lower().split(".")[0], list(pool), n=n, cutoff=0.6)
    out = [full for key in close for full in pool[key]]
    out.sort(key=lambda full: split_name(full)[0] != source)  # the asked-for source first
    return out[:n]


def _unknown(name: str, why: str) -> ModelError:
    close = _suggestions(name)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    aliases = ", ".join(f"{a} = {t}" for a, t in sorted(_ALIASES.items()))
    return ModelError(f"unknown model {name!r} ({why}); {hint}the project's models: "
                      f"{', '.join(sorted(_ENTRYPOINTS))} (aliases: {aliases}); any torchvision or "
                      f"timm classifier as torchvision/<name> or timm/<name> (list them with "
                      f"'python -m trainer.models --source timm|torchvision [PATTERN]'); fix "
                      f"model.teacher / model.student in the config")


def resolve(name: str) -> Tuple[str, str]:
    """``(source, key)`` of a valid name (the project key lower-cased and
    de-aliased); :class:`ModelError` naming close matches otherwise."""
    source, bare = split_name(name)
    if source == "project":
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in _ENTRYPOINTS:
            raise _unknown(name, "not a project model and no torchvision/ or timm/ prefix")
        return source, key
    if source not in LIBRARIES:
        raise _unknown(name, f"unknown source {source!r}: the prefixes are torchvision/ and timm/")
    if not _known(source, bare):
        raise _unknown(name, f"{source} has no model {bare!r}")
    return source, bare


def is_model(name: str) -> bool:
    try:
        resolve(name)
    except ModelError:
        return False
    return True


def is_imagenet_model(name: str) -> bool:
    """Whether the model takes ``low_res_stem`` (every library model and the
    project's ImageNet ones; the CIFAR models are low-resolution by design).
    An unknown name raises :class:`ModelError`."""
    source, key = resolve(name)
    return source != "project" or _FAMILY[key] == "imagenet"


def create_model(name: str, num_classes: int, **kw):
    """Build a randomly initialised model (nothing is downloaded). Models that
    take ``low_res_stem`` (:func:`is_imagenet_model`) accept only it; the CIFAR
    models accept and ignore it (one config key serves every model) and take
    no other options."""
    source, key = resolve(name)
    if source != "project" or _FAMILY[key] == "cifar":
        low_res_stem = bool(kw.pop("low_res_stem", False))
        if kw:
            raise TypeError(f"model {name!r} takes no options but low_res_stem, got {sorted(kw)}")
        if source == "project":
            return _ENTRYPOINTS[key](num_classes=num_classes)
        from trainer.models.library import build_timm, build_torchvision

        build = build_timm if source == "timm" else build_torchvision
        return build(key, num_classes, low_res_stem=low_res_stem)
    return _ENTRYPOINTS[key](num_classes=num_classes, **kw)
