"""Typed dataclass configs loaded from YAML with ``key=value`` CLI overrides,
and their self-description.

``load_config(Config, "configs/cifar100.yaml", ["optim.lr=0.05", "run.name=x"])``
builds nested dataclasses and checks every key, type and declared choice
(:mod:`dataset_tools.settings`). An error names the key, the valid keys or
values (with close matches) and where the bad value came from: the file, or
the override. :func:`format_keys` lists every key with its type, default and
help (``--help-config``); :func:`to_yaml` writes a config that
:func:`load_config` reads back to the same value. Hand-written because no
installed library does typed nested dataclasses + dotted overrides
(OmegaConf/Hydra are not dependencies).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from dataset_tools.settings import (ConfigError, choice_problem, close_matches, field_choices,
                                    field_help)

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "to_yaml", "read_yaml", "flatten",
           "describe", "format_keys", "parse_overrides"]

Origins = dict  # dotted key -> where its value came from ("configs/x.yaml", "override k=v")


class _Loader(yaml.SafeLoader):
    """YAML with the booleans and floats of YAML 1.2: true and false only are
    booleans (YAML 1.1 also reads on/off/yes/no, which would make ``run.amp:
    off`` False), and ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def read_yaml(text: str):
    """Parse YAML text as the config loader does (YAML 1.2 booleans and floats)."""
    return yaml.load(text, Loader=_Loader)


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (PyYAML's message spans lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _origin(origins: Origins, key: str) -> str:
    """Where ``key``'s value came from: its own entry, a parent's, or (for a
    section) those of the keys under it; "defaults" when none was given."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        label = origins.get(".".join(parts[:i]))
        if label:
            return label
    under = sorted({v for k, v in origins.items() if not key or k.startswith(key + ".")})
    return ", ".join(under) if under else "defaults"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{_type_name(args[0])}, ...]"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str, origins: Origins):
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{_origin(origins, key)}: {key}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key, origins)
            except ConfigError:
                pass
        raise bad(_type_name(tp))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad(f"a mapping (the {key} section)")
        return from_dict(tp, value, origins, prefix=f"{key}.")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list {_type_name(tp)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, key, origins) for v in value)
        if len(args) != len(value):
            raise bad(f"{len(args)} items {_type_name(tp)}")
        return tuple(_convert(a, v, key, origins) for a, v in zip(args, value))
    if origin is list:
        (a,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [_convert(a, v, key, origins) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    return value


def _unknown_key(cls, prefix: str, name: str, origins: Origins) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    near = close_matches(name, names)
    hint = f" (did you mean {' or '.join(prefix + n for n in near)}?)" if near else ""
    valid = f"valid keys of {prefix.rstrip('.')}" if prefix else "valid sections"
    return (f"{_origin(origins, prefix + name)}: unknown key {prefix}{name}{hint}; {valid}: "
            f"{', '.join(names)} (--help-config lists every key)")


def from_dict(cls, data: dict, origins: Optional[Origins] = None, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping: unknown keys, wrong types and
    values outside a key's declared choices are :class:`ConfigError` naming
    the key (``prefix`` + name), the valid ones and the value's origin."""
    origins = origins or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(_unknown_key(cls, prefix, name, origins))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, raw in data.items():
        key = prefix + name
        value = _convert(hints[name], raw, key, origins)
        valid = field_choices(fields[name])
        problem = choice_problem(key, value, valid) if valid is not None else None
        if problem:
            raise ConfigError(f"{_origin(origins, key)}: {problem}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the section's own checks (__post_init__)
        named = [prefix + n for n in fields
                 if prefix and re.search(rf"\b{re.escape(prefix + n)}\b", str(e))]
        where = _origin(origins, named[0] if len(named) == 1 else prefix.rstrip("."))
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _plain(value):
    """Dataclass values as YAML/JSON-safe values (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline (``scale: [0.35, 1.0]``), as in configs/."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v,
                                                                 flow_style=True))


def to_yaml(obj) -> str:
    """``obj`` (a config dataclass) as YAML that :func:`load_config` reads back to ``obj``."""
    return yaml.dump(_plain(to_dict(obj)), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"run": {"seed": 0}}`` -> ``{"run.seed": 0}`` (dataclasses are converted first)."""
    if dataclasses.is_dataclass(data):
        data = _plain(to_dict(data))
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set_dotted(d: dict, dotted: str, value, item: str) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {item}: {k} is not a section")
    d[keys[-1]] = value


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=0.1")
    key, raw = item.split("=", 1)
    try:
        value = read_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item}: the value is not valid YAML ({e.problem}); quote "
                          f"it, e.g. {key.strip()}='\"...\"'") from None
    return key.strip(), value


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=0.1", "mix.p_cutmix=1"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(out, key, value, item)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None):
    """Defaults of ``cls`` <- YAML file <- ``key=value`` overrides."""
    data = to_dict(cls())
    origins: Origins = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (see configs/ for examples)")
        try:
            loaded = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {yaml_problem(e)}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = _merge(data, loaded)
        origins.update(dict.fromkeys(flatten(loaded), str(path)))
    for item in overrides or []:
        key, value = _split_override(item)
        nested: dict = {}
        _set_dotted(nested, key, value, item)
        data = _merge(data, nested)
        for k in [k for k in origins if key.startswith(k + ".") or k.startswith(key + ".")]:
            del origins[k]  # values this override replaced
        origins[key] = f"override {item}"
    return from_dict(cls, data, origins)


# ------------------------------------------------------------ description

@dataclasses.dataclass(frozen=True)
class KeyInfo:
    key: str  # section.key
    type: str
    default: Any
    help: str
    choices: Optional[tuple]
    section_help: str  # first line of the section's docstring


def _doc_line(cls) -> str:
    """The first sentence of a section class's docstring (dataclasses without
    one get a generated ``Name(field, ...)`` docstring: no help)."""
    doc = " ".join((cls.__doc__ or "").replace("``", "").split())
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    return doc.split(". ")[0].rstrip(".") + "."


def describe(cls, prefix: str = "", section_help: str = "") -> list[KeyInfo]:
    """Every leaf key of config dataclass ``cls`` with its declared type,
    default, help and choices (from :func:`dataset_tools.settings.setting`)."""
    defaults, hints, out = cls(), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, f"{prefix}{f.name}.", _doc_line(tp))
        else:
            out.append(KeyInfo(prefix + f.name, _type_name(tp), getattr(defaults, f.name),
                               field_help(f), field_choices(f), section_help))
    return out


def _yaml_value(v) -> str:
    """A value as one would write it in the YAML file."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if len(repr(v)) <= 10 else f"{v:.6g}"
    if isinstance(v, str):
        return v if v else "''"
    return str(v)


def format_keys(cls) -> str:
    """The ``--help-config`` text: one line per key, grouped by section."""
    rows = describe(cls)
    w_key = max(len(r.key) for r in rows)
    w_type = max(len(r.type) for r in rows)
    w_def = max(len(_yaml_value(r.default)) for r in rows)
    lines = ["Every config key, as YAML (section: {key: value}) or an override "
             "(section.key=value): type, default, help.", ""]
    section = None
    for r in rows:
        name = r.key.split(".")[0]
        if name != section:
            section = name
            lines += ([""] if len(lines) > 2 else []) + [f"{name}: {r.section_help}".rstrip()]
        one_of = f" (one of: {', '.join(map(str, r.choices))})" if r.choices else ""
        lines.append(f"  {r.key:<{w_key}}  {r.type:<{w_type}}  {_yaml_value(r.default):<{w_def}}  "
                     f"{r.help or '(no help declared)'}{one_of}")
    return "\n".join(lines)
