"""Reading a config off tensor names and shapes: the checks and messages every family shares.

`infer_config` builds a :class:`ShapeReader` over a checkpoint's headers; a family's inference
rule (models/families/) reads its shapes through it and writes the fields it finds. Every
failure is one AnefxInputError naming the checkpoint and the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from anefx.errors import AnefxInputError


class Tensor(Protocol):
    """What a header says of one stored tensor."""

    dtype: str
    shape: tuple[int, ...]


def cannot_infer(where: str, message: str) -> AnefxInputError:
    """The error for a checkpoint at WHERE whose shapes do not give a config."""
    return AnefxInputError(f"{where}: cannot infer the config from tensor shapes: {message}")


@dataclass
class ShapeReader:
    """One checkpoint's tensors, grouped by decoder layer, and the fields read so far.

    `fields` holds config fields in the order they were found; keys starting with "_" are
    intermediate values for the defaults (never part of the config). `reasons` says, per
    field, how a value that is not read off a shape was chosen.
    """

    where: str  # names the checkpoint in messages
    tensors: Mapping[str, Tensor]
    layers_path: str  # e.g. "model.layers"
    layers: dict[int, dict[str, Tensor]]  # layer index -> suffix -> tensor
    fields: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def fail(self, message: str) -> AnefxInputError:
        return cannot_infer(self.where, message)

    def get(self, name: str, rank: int) -> tuple[int, ...]:
        """The shape of tensor NAME, which must exist with RANK dimensions."""
        entry = self.tensors.get(name)
        if entry is None:
            raise self.fail(
                f"tensor '{name}' missing (expected the Hugging Face *ForCausalLM layout)"
            )
        if len(entry.shape) != rank:
            raise self.fail(f"tensor '{name}' has shape {list(entry.shape)}, expected rank {rank}")
        return tuple(entry.shape)

    def layer_tensor(self, layer: int, suffix: str) -> str:
        """The full name of tensor SUFFIX of decoder layer LAYER."""
        return f"{self.layers_path}.{layer}.{suffix}"

    def shape(self, layer: int, suffix: str, rank: int) -> tuple[int, ...]:
        """The shape of layer LAYER's tensor SUFFIX (present), which must have RANK dims."""
        found = tuple(self.layers[layer][suffix].shape)
        if len(found) != rank:
            raise self.fail(
                f"tensor '{self.layer_tensor(layer, suffix)}' has shape {list(found)}, expected "
                f"rank {rank}"
            )
        return found

    def divide(self, name: str, rows: int, by: int, what: str) -> int:
        """ROWS / BY, which must divide exactly (BY is WHAT, e.g. head_dim)."""
        if by <= 0 or rows % by:
            raise self.fail(f"tensor '{name}' has {rows} rows, not a multiple of {what} ({by})")
        return rows // by

    def one_value(self, values: dict[int, int], what: str) -> int | None:
        """The value every layer agrees on (None if no layer has one)."""
        distinct = sorted(set(values.values()))
        if len(distinct) > 1:
            per_layer = ", ".join(f"layer {i}: {v}" for i, v in sorted(values.items())[:4])
            raise self.fail(f"layers disagree on {what} ({per_layer}, ...)")
        return distinct[0] if distinct else None
