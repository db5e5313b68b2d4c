"""Recover a checkpoint's config from its tensor names and shapes, reading headers only.

A folder of `*.safetensors` without config.json still tells most of its config: the family
(each family recognises its own tensors: models/families/), the layer count, hidden and
vocabulary sizes, and what the family's own rule reads (head_dim, heads and KV heads, the MLP
and expert widths, which layers are sparse, a hybrid's layer kinds), tying and the dtype. What
shapes cannot tell comes from the family's defaults, and one ConfigDefaultsWarning names every
field so filled in. Each family reads the tensors as its text model names them
(`text_tensors`: a published vision-language layout's text tensors renamed, its vision tower
left out).
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anefx.errors import AnefxInputError
from anefx.models.checkpoint_files import check_folder, locate_tensors
from anefx.models.families import FAMILIES
from anefx.models.family import Family
from anefx.models.limits import MAX_LAYERS
from anefx.models.tensor_shapes import ShapeReader, Tensor, cannot_infer


class ConfigDefaultsWarning(UserWarning):
    """A checkpoint without config.json: fields its tensors cannot tell were given defaults."""


@dataclass(frozen=True)
class DefaultsRow:
    """One row of DEFAULTS: a field the shapes cannot tell, for the families listed."""

    field: str
    families: tuple[str, ...]
    value: Any  # a constant, or a function of the fields inferred so far
    why: str


def _defaults_table() -> tuple[DefaultsRow, ...]:
    """Every family's defaults in one table, a row shared by several families listed once."""
    rows: dict[int, tuple[Any, list[str]]] = {}
    for family in sorted(FAMILIES.values(), key=lambda f: f.model_type):
        for row in family.defaults:
            rows.setdefault(id(row), (row, []))[1].append(family.model_type)
    return tuple(DefaultsRow(r.field, tuple(names), r.value, r.why) for r, names in rows.values())


# Everything tensor shapes cannot tell, in one table (each family applies its own rows, in
# its order, and only to fields the shapes did not give).
DEFAULTS: tuple[DefaultsRow, ...] = _defaults_table()

_ST_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass
class InferredConfig:
    """A config dict recovered from tensor shapes and where each field came from."""

    config: dict[str, Any]  # keyword arguments for build_config, model_type included
    inferred: list[str]  # fields read from tensor names and shapes
    defaulted: dict[str, Any]  # fields filled in from DEFAULTS -> the value used
    reasons: dict[str, str] = field(default_factory=dict)  # defaulted field -> why

    def warning_text(self, where: str) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.defaulted.items())
        return (
            f"{where}: no config.json; {len(self.inferred)} fields inferred from tensor shapes, "
            f"{len(self.defaulted)} not recoverable from shapes and set to defaults: {shown} "
            "(add a config.json to set them)"
        )


@dataclass
class TextTensors:
    """A checkpoint's tensors as a family's text model names them."""

    tensors: Mapping[str, Any]  # model name -> what the header says (the checkpoint's entry)
    stored: dict[str, str]  # model name -> name in the file, for each renamed tensor
    dropped: dict[str, int]  # what the text model does not use -> how many tensors

    def note(self, where: str) -> str | None:
        """The one line saying what was left out (None: nothing)."""
        if not self.dropped:
            return None
        parts = ", ".join(f"{count} {what}" for what, count in self.dropped.items())
        return (
            f"{where}: reading the text model; skipping {sum(self.dropped.values())} stored "
            f"tensors it does not use ({parts})"
        )


def text_tensors(family: Family, tensors: Mapping[str, Any], where: str) -> TextTensors:
    """TENSORS (name -> header entry) as FAMILY's text model names them: a nested layout's
    (family.nested) renamed, those it does not use (family.dropped_tensors) left out and
    counted. A family with neither gets TENSORS as they are. Two stored tensors naming the same
    model tensor are an AnefxInputError naming WHERE and both."""
    if not family.nested and not family.dropped_tensors:
        return TextTensors(tensors, {}, {})
    view: dict[str, Any] = {}
    stored: dict[str, str] = {}
    dropped: Counter[str] = Counter()
    for name, entry in tensors.items():
        what = family.dropped_as(name)
        if what is not None:
            dropped[what] += 1
            continue
        model = family.model_name(name)
        if model in view:
            first = stored.get(model, model)
            raise AnefxInputError(
                f"{where}: tensors '{first}' and '{name}' are both the text model's '{model}'"
            )
        view[model] = entry
        if model != name:
            stored[model] = name
    return TextTensors(view, stored, dict(dropped))


def _decoder_layers(
    where: str, tensors: Mapping[str, Tensor], family: Family
) -> dict[int, dict[str, Tensor]]:
    """FAMILY's layout in TENSORS: its embedding, and its decoder layers numbered 0..n-1."""
    reader = ShapeReader(where, tensors, family.layers_path, {})
    reader.get(f"{family.embed_path}.weight", 2)
    # at most 9 digits: a longer index is no layer (and int() of thousands of digits would fail)
    pattern = re.compile(rf"^{re.escape(family.layers_path)}\.(\d{{1,9}})\.(.+)$")
    layers: dict[int, dict[str, Tensor]] = defaultdict(dict)
    for name, entry in tensors.items():
        match = pattern.match(name)
        if match:
            layers[int(match.group(1))][match.group(2)] = entry
    if not layers:
        raise cannot_infer(where, f"no '{family.layers_path}.<i>.*' tensors")
    count = max(layers) + 1
    if count > MAX_LAYERS:  # before anything below walks every layer index
        name = next(iter(layers[count - 1]))
        raise cannot_infer(
            where,
            f"tensor '{family.layers_path}.{count - 1}.{name}' names layer {count - 1}, above "
            f"the bound of {MAX_LAYERS} layers (anefx.models.limits.MAX_LAYERS)",
        )
    gaps = [i for i in range(count) if i not in layers]
    if gaps:
        raise cannot_infer(where, f"layer {gaps[0]} has no tensors but layer {count - 1} has")
    return layers


def recognise(
    where: str, tensors: Mapping[str, Tensor], families: Mapping[str, Family] = FAMILIES
) -> tuple[Family, dict[int, dict[str, Tensor]]]:
    """The family whose recognition scores TENSORS highest, and its decoder layers' tensors.

    A layout some family refuses, no family recognising the tensors, or two tying for the top
    score are AnefxInputErrors naming WHERE. A family with a text twin (`Family.text_twin`)
    is a candidate only for tensors in one of its own layouts (some renamed or dropped)."""
    layouts: dict[tuple, dict | AnefxInputError] = {}
    own_layout: dict[tuple, bool] = {}
    candidates = []
    for family in families.values():
        # each family reads the tensors as its text model names them (a nested layout's)
        key = (family.embed_path, family.layers_path, family.nested, family.dropped_tensors)
        if key not in layouts:
            text = text_tensors(family, tensors, where)  # two names for one: an error
            own_layout[key] = bool(text.stored or text.dropped)
            try:
                layouts[key] = _decoder_layers(where, text.tensors, family)
            except AnefxInputError as exc:
                layouts[key] = exc
        if family.text_twin is not None and not own_layout[key]:
            continue  # the tensors of its text model alone: the twin's
        if not isinstance(layouts[key], AnefxInputError):
            candidates.append((family, layouts[key]))
    if not candidates:
        raise next(iter(layouts.values()))  # the first family's layout: what is wrong with it
    scored = []
    for family, layers in candidates:
        suffixes = frozenset(s for per_layer in layers.values() for s in per_layer)
        first = frozenset(layers[0])
        reason = family.refuse(suffixes, first)
        if reason:
            raise cannot_infer(where, reason)
        scored.append((family.recognise(suffixes, first), family, layers))
    best = max(score for score, _, _ in scored)
    if best <= 0:
        signs = [f.sign for f in families.values() if f.sign]
        raise cannot_infer(where, f"layer 0 has neither {' nor '.join(signs)}; unknown family")
    top = [(family, layers) for score, family, layers in scored if score == best]
    if len(top) > 1:
        names = " and ".join(family.model_type for family, _ in top)
        raise cannot_infer(where, f"the tensors match the families {names} equally")
    return top[0]


def infer_from_tensors(tensors: Mapping[str, Tensor], where: str) -> InferredConfig:
    """Infer a config dict from tensor names -> (dtype, shape); `where` names the checkpoint."""
    family, layers = recognise(where, tensors)
    tensors = text_tensors(family, tensors, where).tensors
    r = ShapeReader(where, tensors, family.layers_path, layers)
    vocab, hidden = r.get(f"{family.embed_path}.weight", 2)
    r.fields.update(
        {
            "model_type": family.model_type,
            "architectures": list(family.architectures),
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": len(layers),
            "tie_word_embeddings": f"{family.head_path}.weight" not in tensors,
        }
    )
    family.infer(r)
    fields = r.fields

    floats = Counter()
    for entry in tensors.values():
        if entry.dtype in _ST_DTYPE_NAMES:
            floats[entry.dtype] += math.prod(entry.shape)
    if floats:
        fields["dtype"] = _ST_DTYPE_NAMES[floats.most_common(1)[0][0]]

    inferred = [k for k in fields if not k.startswith("_")]
    reasons = r.reasons
    defaulted: dict[str, Any] = {}
    for row in family.defaults:
        if row.field in fields:
            continue
        # a copy: the config class fills in rope_parameters in place
        value = row.value(fields) if callable(row.value) else copy.deepcopy(row.value)
        fields[row.field] = defaulted[row.field] = value
        reasons.setdefault(row.field, row.why)
    config = {k: v for k, v in fields.items() if not k.startswith("_")}
    return InferredConfig(config, inferred, defaulted, reasons)


def infer_config(folder: str | os.PathLike[str], warn: bool = True) -> InferredConfig:
    """Infer the config of checkpoint `folder` from its safetensors headers.

    With `warn`, one ConfigDefaultsWarning names every field set from DEFAULTS.
    """
    folder = Path(folder)
    check_folder(folder)
    result = infer_from_tensors(locate_tensors(folder), str(folder))
    if warn:
        warnings.warn(result.warning_text(str(folder)), ConfigDefaultsWarning, stacklevel=2)
    return result
