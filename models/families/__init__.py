"""The model families anefx lowers: every module of this package that defines ``FAMILY``.

Adding a family is adding a module here (see qwen3.py); nothing else lists them. `FAMILIES`
maps each `model_type` to its :class:`~anefx.models.family.Family`, in listing order.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from anefx.errors import AnefxInputError
from anefx.models.family import Family
from anefx.models.messages import shown


def _discover() -> dict[str, Family]:
    found: list[Family] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            found.append(family)
    found.sort(key=lambda f: (f.order, f.model_type))
    return {f.model_type: f for f in found}


FAMILIES: dict[str, Family] = _discover()


def supported() -> str:
    """The supported model types, for messages."""
    return ", ".join(sorted(FAMILIES))


def family_of(config: Any, where: str = "config") -> Family:
    """The family of CONFIG (a config object or dict, or a model_type string); an unsupported
    or missing model_type is an AnefxInputError naming the field (WHERE names the source)."""
    if isinstance(config, str):
        model_type: object = config
    elif isinstance(config, dict):
        model_type = config.get("model_type")
    else:
        model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise AnefxInputError(f"{where}: field 'model_type' missing; supported: {supported()}")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise AnefxInputError(
            f"{where}: model_type {shown(model_type)} is not supported; supported: {supported()}"
        )
    return FAMILIES[model_type]


def known_family(config: Any) -> Family | None:
    """CONFIG's family, or None for a model of no known family (capture still exports it)."""
    model_type = getattr(config, "model_type", None)
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def layer_index(module: str | None) -> int | None:
    """The decoder layer a module path lies in, by any family's layer path (None: none)."""
    for family in FAMILIES.values():
        layer = family.layer_index(module)
        if layer is not None:
            return layer
    return None


def weight_kind(module: str | None, reader: str) -> str | None:
    """The palettization kind every family gives a weight (None, dense, when any family keeps
    it dense or they disagree): for callers that do not know the model's family."""
    kinds = {family.weight_kind(module, reader) for family in FAMILIES.values()}
    return kinds.pop() if len(kinds) == 1 else None
