"""Declared settings: the one way a config dataclass field states its help
and its valid values.

    amp: str = setting("auto", "mixed precision (auto: bf16 on CUDA, off on CPU)",
                       choices=("auto", "off", "bf16", "fp16"))

The help and the choices live in the field's ``metadata``, so one
declaration serves ``--help-config`` (:func:`trainer.yaml_config.describe`),
the YAML loader (which checks the choices per key and names the valid ones)
and the dataclass itself (:func:`check_choices` in ``__post_init__``, so a
config built in Python is checked too). Every config section uses it
(``trainer/recipe.py``, ``LossConfig``, ``MixConfig``). It lives in the base
package because ``pipelines`` may not import ``trainer``.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Iterable, Optional

from dataset_tools.errors import CqkdError


class ConfigError(CqkdError, ValueError):
    """A config key or value is wrong; the message names the key, the valid
    keys or values, and where the value came from (file or override)."""


def setting(default: Any, help: str, *, choices: Optional[Iterable] = None) -> Any:
    """A dataclass field with a default, one line of help and, optionally,
    the valid values (for a tuple-valued field: of each element)."""
    if not help or "\n" in help:
        raise ValueError("a setting's help is one non-empty line")
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=meta)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> Optional[tuple]:
    return f.metadata.get("choices")


def close_matches(word: str, candidates: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(str(word), [str(c) for c in candidates], n=3, cutoff=0.6)


def choice_problem(key: str, value, valid: tuple) -> Optional[str]:
    """``None`` when ``value`` (or each element of a tuple/list) is in
    ``valid``, else the message naming the valid values and close matches."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if v not in valid:
            near = close_matches(v, valid) if isinstance(v, str) else []
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return f"{key}={v!r} is not one of {', '.join(map(str, valid))}{hint}"
    return None


def check_choices(obj, section: str) -> None:
    """Raise :class:`ConfigError` for the first field of dataclass ``obj``
    whose value is not one of its declared choices (call in ``__post_init__``)."""
    for f in dataclasses.fields(obj):
        valid = field_choices(f)
        if valid is not None:
            problem = choice_problem(f"{section}.{f.name}", getattr(obj, f.name), valid)
            if problem:
                raise ConfigError(problem)
