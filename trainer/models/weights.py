"""Weights files -> a model built by :func:`trainer.models.create_model`.

Accepted files (the format is sniffed from the first bytes, not the suffix):

* a **safetensors** file (``safetensors.torch.save_file(model.state_dict(), ...)``);
* a **state dict** saved with ``torch.save`` (``model.state_dict()``), read with
  ``torch.load(weights_only=True)`` so a file never runs code when read;
* a **checkpoint dict** holding one, under the keys timm's
  ``load_state_dict`` looks for, in its order: ``state_dict_ema``,
  ``model_ema`` (EMA weights first, as timm does), ``state_dict``, ``model``.
  timm's ``train.py`` also stores its ``argparse.Namespace`` under ``args``;
  that one class is allowed for the weights-only read (it is a bag of
  attributes);
* a **checkpoint of this trainer** (``arch``, ``model``, ``weights_hash``): its
  ``arch`` must be the model's name.

``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile) are removed by
timm's ``clean_state_dict``. A torchvision / timm model's file is in the
library's own layout (``fc.weight``); the wrapper keeps those paths under
``net.``, and a file already in the wrapper's layout loads too.

:func:`load_weights` checks the file against the model before loading:
the classifier head's size against the store's class count (or, with
``reinit_head``, keeps the model's freshly initialised head when they
differ: fine-tuning on new classes), every other shape, then missing and
unexpected keys, each with an error naming the file, a few keys and the fix.
The returned hash is :func:`trainer.checkpoint.weights_hash` of the model's
state dict after loading -- the definition a trained checkpoint's
``weights_hash`` uses -- so the same weights key the teacher cache and the
fitted temperature alike, whatever file format brought them in.

Why not ``timm.models.load_state_dict`` itself: it would do the reading, but
the errors above need to know which key held the weights, refuse unsafe
pickles with a message, and recognise this trainer's checkpoints.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dataset_tools.errors import CqkdError
from trainer.checkpoint import weights_hash

STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order
TRAINER_CHECKPOINT_KEYS = ("arch", "model", "weights_hash")
_SHOWN = 4  # keys named in an error


class WeightsError(CqkdError, ValueError):
    """A weights file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class LoadedWeights:
    path: str
    source: str  # "safetensors" | "state dict" | "checkpoint['state_dict_ema']" | "trainer checkpoint"
    head: str  # "loaded" | "re-initialised: ..."
    weights_hash: str


def _few(keys) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _resave_hint() -> str:
    return ("re-save the weights alone: torch.save(model.state_dict(), 'weights.pt') or "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")


def _read_file(path: Path):
    with open(path, "rb") as f:
        magic = f.read(8)
    # torch.save writes a zip (or, legacy, a protocol-2 pickle); anything else is tried as safetensors
    if path.suffix == ".safetensors" or not magic.startswith((b"PK\x03\x04", b"\x80\x02")):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), "safetensors"
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: neither a torch.save file nor a readable safetensors file "
                               f"({type(e).__name__}: {e}); is it truncated? {_resave_hint()}") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm train.py's 'args'
            return torch.load(path, map_location="cpu", weights_only=True), "torch"
    except Exception as e:  # torch raises several types for corrupt/unsafe files
        text = str(e)
        if "Weights only load failed" in text:
            why = re.search(r"WeightsUnpickler error: ([^.\n]*)", text)  # not torch's allowlisting advice
            raise WeightsError(f"{path}: not a weights-only file: torch.load(weights_only=True) refused "
                               f"it ({why.group(1) if why else type(e).__name__}). It holds Python "
                               f"objects beyond tensors, which could run code when read; "
                               f"{_resave_hint()}") from e
        raise WeightsError(f"{path}: not a loadable torch file ({type(e).__name__}: "
                           f"{text.splitlines()[0] if text else ''}); is it truncated?") from e


def read_weights(path) -> tuple[dict[str, torch.Tensor], str, Optional[dict]]:
    """``(state dict, where it came from, trainer-checkpoint fields or None)``."""
    from timm.models import clean_state_dict

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; fix the path (model.teacher_weights)")
    obj, kind = _read_file(path)
    if kind == "safetensors":
        return clean_state_dict(obj), "safetensors", None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict; {_resave_hint()}")
    if all(k in obj for k in TRAINER_CHECKPOINT_KEYS):
        meta = {k: v for k, v in obj.items() if k != "model"}
        return clean_state_dict(obj["model"]), "trainer checkpoint", meta
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return clean_state_dict(obj), "state dict", None
    key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
    if key is None:
        raise WeightsError(f"{path}: no state dict in it: its top-level keys are "
                           f"{_few(map(str, obj))}, not tensors nor one of {', '.join(STATE_DICT_KEYS)}; "
                           f"{_resave_hint()}")
    sd = obj[key]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: {key!r} holds non-tensor values ({_few(bad)}); {_resave_hint()}")
    return clean_state_dict(sd), f"checkpoint[{key!r}]", None


def classifier_name(model: nn.Module) -> str:
    """The final linear layer's path in ``model``'s state dict: the library
    wrappers name theirs; for the project's models it is the last
    ``nn.Linear`` they register (every one of them ends in one)."""
    name = getattr(model, "classifier_name", None)
    if name:
        return getattr(model, "weights_prefix", "") + name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WeightsError(f"{type(model).__name__}: no linear classifier to check the head size of")
    return linears[-1]


def load_weights(model: nn.Module, path, num_classes: int, *, arch: str, classes_from: str,
                 head_fix: str = "", reinit_head: bool = False) -> LoadedWeights:
    """Load ``path`` into ``model`` (built as ``arch`` for ``num_classes``
    classes; ``classes_from`` names where that count comes from, e.g. the
    store). See the module doc for the checks; ``head_fix`` is appended to the
    head-size error."""
    from trainer.models.registry import resolve

    path = Path(path)
    sd, source, meta = read_weights(path)
    if meta is not None and resolve(str(meta["arch"])) != resolve(arch):
        raise WeightsError(f"{path}: a trainer checkpoint of a {meta['arch']!r}, but the model is "
                           f"{arch!r}; set the model name to {meta['arch']!r} or pick the right file")
    prefix = getattr(model, "weights_prefix", "")
    if prefix and not all(k.startswith(prefix) for k in sd):  # the library's own layout
        sd = {prefix + k: v for k, v in sd.items()}
    shown = (lambda k: k[len(prefix):]) if prefix else (lambda k: k)
    own = model.state_dict()

    head = classifier_name(model)
    head_keys = {k for k in own if k.startswith(head + ".")}
    head_note = "loaded"
    w = sd.get(head + ".weight")
    if w is not None and w.shape[0] != num_classes:
        if not reinit_head:
            raise WeightsError(f"{path}: the classifier head ({shown(head)}.weight {tuple(w.shape)}) has "
                               f"{w.shape[0]} outputs, but {classes_from} has {num_classes} classes: "
                               f"expected head size {num_classes}, found {w.shape[0]}. {head_fix}".rstrip())
        head_note = f"re-initialised: the file's head has {w.shape[0]} classes, {classes_from} {num_classes}"
        sd = {k: v for k, v in sd.items() if k not in head_keys}

    shapes = [f"{shown(k)} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
              for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if shapes:
        stem = " model.*_low_res_stem=true replaces the stem, so weights trained with the ImageNet " \
               "stem need it false." if any(s.startswith("conv1.") for s in shapes) else ""
        raise WeightsError(f"{path}: {len(shapes)} tensor(s) have another shape than in {arch}: "
                           f"{_few(shapes)}.{stem} Are these weights of {arch}?")
    missing = {k for k in own if k not in sd and not k.endswith("num_batches_tracked")}
    if head_note != "loaded":
        missing -= head_keys
    unexpected = set(sd) - set(own)
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_few(map(shown, missing))})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_few(map(shown, unexpected))})"] if unexpected else [])
        raise WeightsError(f"{path}: its keys do not fit {arch}: {'; '.join(parts)}. Are these weights "
                           f"of {arch}? A torchvision or timm file needs the model named "
                           f"torchvision/<arch> or timm/<arch>")
    model.load_state_dict(sd, strict=False)  # checked above; BN counters absent from a file stay 0
    return LoadedWeights(str(path), source, head_note, weights_hash(model.state_dict()))
