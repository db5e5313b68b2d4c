"""The contract between the stages: what crosses a lowered graph's boundary, typed.

Every graph capture makes, every graph a pass rewrites and every part of a split model carries a
:class:`Signature`: its inputs with their **role** (token ids, positions, mask, the hidden state
an earlier part computed), its outputs (logits, or slices of the vocabulary with their range,
or the greedy token), its states (the KV cache: kind, layers, shape) and the physical layout of
each of these (named axes). Stages read and write it only through :func:`signature_of` and
:func:`set_signature`; nothing else keeps string keys for inputs, outputs or states in
``gm.meta``. A pass finds an input by its role, never by a piece of its name.

Axis names: ``B`` batch, ``S`` the tokens of this call, ``T`` the positions of the context (a
mask's keys, a cache's slots), ``C`` model channels, ``V`` vocabulary, ``H`` heads, ``D`` head
width, ``1`` a unit axis kept for the layout. The logits of a lowered head are channels-first
slices ``(B, V, 1, S)``; the stock model's are ``(B, S, V)``: :func:`join_logits` is the one
place that stitches them into ``(B, S, V)``.

A value inside the graph may be held in another physical layout than its logical one (the
layout pass keeps the decoder in ``(B, C, 1, S)``): :class:`AxisMap` records, per node, where
each logical axis went, and :func:`to_logical` reads the value back.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

_KEY = "anefx_signature"  # the one gm.meta key, read and written only here
_AXES_KEY = "anefx_axis_map"  # per node: an AxisMap, read and written only here


class Role(enum.StrEnum):
    """What a boundary tensor is."""

    TOKENS = "tokens"  # token ids (B, S) int32
    POSITIONS = "positions"  # absolute positions (B, S) int32
    MASK = "mask"  # additive attention mask (B, 1, S, T)
    HIDDEN = "hidden"  # the residual stream, between parts
    LOGITS = "logits"  # scores over the vocabulary (a range of it for a slice)
    TOKEN = "token"  # the greedy token id, chosen in the model
    TOKEN_LOGIT = "token_logit"  # the chosen token's logit


@dataclass(frozen=True)
class Source:
    """Where a part's input comes from: a model input (by name) or an earlier part's output."""

    model: str | None = None
    part: int | None = None
    output: str | None = None

    def to_dict(self) -> dict:
        return (
            {"model": self.model}
            if self.model is not None
            else {
                "part": self.part,
                "output": self.output,
            }
        )

    @staticmethod
    def from_dict(doc: Mapping[str, Any]) -> Source:
        if "model" in doc:
            return Source(model=doc["model"])
        return Source(part=doc["part"], output=doc["output"])


@dataclass(frozen=True)
class TensorSpec:
    """A boundary tensor: its name in the graph and the package, role, shape, dtype, axes."""

    name: str
    role: Role
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str, ...]

    def axis(self, name: str) -> int:
        """The index of axis NAME (ValueError if the tensor has none)."""
        return self.axes.index(name)

    def size(self, name: str) -> int:
        return self.shape[self.axis(name)]


@dataclass(frozen=True)
class Input(TensorSpec):
    source: Source | None = None  # for a part of a split model


@dataclass(frozen=True)
class Output(TensorSpec):
    vocab: tuple[int, int] | None = None  # logits: the vocabulary ids [start, end) covered
    description: str = ""


@dataclass(frozen=True)
class State:
    """What a call reads and leaves for the next call.

    ``kind`` is "key" or "value" (one layer's cache, ``layers`` holds that layer), or "kv" for
    the packed state of a program (:func:`pack_states`: one row per layer's K or V along its
    leading axis, ``layers`` the layer of each row, K before V); "conv" or "recurrent" for a
    linear-attention layer's conv inputs and delta-rule state.

    A state is held on the device as a Core ML state, written in place (the KV cache), unless
    it is ``carried``: then the program takes it as an input and returns its new value as an
    output, and the runtime hands it to the next call (what CoreML-LLM ships for Qwen3.5's
    conv and recurrent states: a program runs on the ANE with one state, not three). In the
    graph both are the same: a placeholder after the inputs, its new value an output after
    the outputs."""

    name: str
    kind: str
    layers: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str = "float16"
    axes: tuple[str, ...] = ("B", "H", "T", "D")
    carried: bool = False

    @property
    def context(self) -> int | None:
        """The positions the state holds (None for a state of fixed size: conv, recurrent)."""
        return self.shape[self.axes.index("T")] if "T" in self.axes else None


# State kinds: held in place (a KV cache, and the packed state of a program) or carried.
STATE_KINDS = ("key", "value", "kv", "conv", "recurrent")
CARRIED_KINDS = ("conv", "recurrent")
CARRIED_SUFFIX = "_out"


def carried_output(state: State) -> str:
    """The output a program returns a carried STATE's new value as (its input is the state's
    name; Core ML features need distinct names)."""
    return f"{state.name}{CARRIED_SUFFIX}"


# The axis along which a program's states are stacked into its one Core ML state: one row per
# layer's K or V (targets/coreml.py packs them; device-facts.md: one state per program).
PACKED_AXIS = "KV"


def pack_states(states: tuple[State, ...]) -> tuple[State, ...]:
    """The states a program holds on the device for STATES: one, every state a row of it along
    a leading axis (each state's own leading axis has size 1), in STATES' order; no states, none.
    Carried states are not held (they are inputs and outputs). States that cannot share one
    tensor (shapes, dtypes or layouts that differ) are returned as they are: the rule
    ``state_count`` then reports the program."""
    states = tuple(s for s in states if not s.carried)
    if not states:
        return ()
    first = states[0]
    if any(
        s.shape[0] != 1
        or s.shape[1:] != first.shape[1:]
        or (s.dtype, s.axes) != (first.dtype, first.axes)
        for s in states
    ):
        return states
    layers = tuple(layer for s in states for layer in s.layers)
    name = f"kv_cache_{min(layers)}_{max(layers)}"
    kinds = "kv" if {s.kind for s in states} == {"key", "value"} else first.kind
    return (
        State(
            name,
            kinds,
            layers,
            (len(states), *first.shape[1:]),
            first.dtype,
            (PACKED_AXIS, *first.axes[1:]),
        ),
    )


@dataclass(frozen=True)
class Signature:
    """Inputs (in call order), outputs (in return order, before the states' new values),
    states (in call order, after the inputs) of one graph or part; ``modules`` names the
    modules outside the decoder layers a part computes (the embedding, the final norm)."""

    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    states: tuple[State, ...] = ()
    modules: tuple[str, ...] = field(default=())

    # -- lookups ----------------------------------------------------------------------------

    def input(self, role: Role) -> Input | None:
        """The input with ROLE (None when the graph has none)."""
        return next((i for i in self.inputs if i.role == role), None)

    def named(self, name: str) -> Input | State | None:
        """The input or state called NAME."""
        return next((t for t in (*self.inputs, *self.states) if t.name == name), None)

    def placeholder(self, gm: fx.GraphModule, role: Role) -> fx.Node | None:
        """GM's placeholder for the input with ROLE."""
        want = self.input(role)
        if want is None:
            return None
        return next(
            (n for n in gm.graph.nodes if n.op == "placeholder" and n.target == want.name), None
        )

    @property
    def logits(self) -> tuple[Output, ...]:
        """The logits outputs (one, or the slices in vocabulary order)."""
        outs = [o for o in self.outputs if o.role == Role.LOGITS]
        return tuple(sorted(outs, key=lambda o: o.vocab[0] if o.vocab else 0))

    @property
    def chooses_token(self) -> bool:
        """The graph returns the greedy token (add_argmax_head), not logits."""
        return any(o.role == Role.TOKEN for o in self.outputs)

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary the logits cover (None when the graph returns none)."""
        logits = self.logits
        if not logits:
            return None
        if logits[0].vocab is not None:
            return logits[-1].vocab[1]
        return logits[0].size("V")

    @property
    def context(self) -> int | None:
        """The context of the states (None for a graph without a KV cache)."""
        return next((s.context for s in self.states if s.context is not None), None)

    @property
    def carried(self) -> tuple[State, ...]:
        """The states the program takes as inputs and returns as outputs."""
        return tuple(s for s in self.states if s.carried)

    def replace(self, **changes: Any) -> Signature:
        return dataclasses.replace(self, **changes)

    # -- serialisation (the manifest and the package report record it) ------------------------

    def to_dict(self) -> dict:
        def tensor(t: TensorSpec) -> dict:
            out = {
                "name": t.name,
                "role": str(t.role),
                "shape": list(t.shape),
                "dtype": t.dtype,
                "axes": list(t.axes),
            }
            if isinstance(t, Input) and t.source is not None:
                out["from"] = t.source.to_dict()
            if isinstance(t, Output):
                if t.vocab is not None:
                    out["vocab"] = list(t.vocab)
                if t.description:
                    out["description"] = t.description
            return out

        return {
            "inputs": [tensor(i) for i in self.inputs],
            "outputs": [tensor(o) for o in self.outputs],
            "states": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "layers": list(s.layers),
                    "shape": list(s.shape),
                    "dtype": s.dtype,
                    "axes": list(s.axes),
                    **({"carried": True} if s.carried else {}),
                }
                for s in self.states
            ],
        }

    @staticmethod
    def from_dict(doc: Mapping[str, Any]) -> Signature:
        """The inverse of :meth:`to_dict` (the reader validates DOC's types first)."""

        def common(d: Mapping) -> dict:
            return {
                "name": d["name"],
                "role": Role(d["role"]),
                "shape": tuple(d["shape"]),
                "dtype": d["dtype"],
                "axes": tuple(d["axes"]),
            }

        return Signature(
            inputs=tuple(
                Input(**common(d), source=Source.from_dict(d["from"]) if "from" in d else None)
                for d in doc["inputs"]
            ),
            outputs=tuple(
                Output(
                    **common(d),
                    vocab=tuple(d["vocab"]) if "vocab" in d else None,
                    description=d.get("description", ""),
                )
                for d in doc["outputs"]
            ),
            states=tuple(
                State(
                    d["name"],
                    d["kind"],
                    tuple(d["layers"]),
                    tuple(d["shape"]),
                    d["dtype"],
                    tuple(d["axes"]),
                    bool(d.get("carried", False)),
                )
                for d in doc["states"]
            ),
        )


def signature_of(gm: fx.GraphModule) -> Signature:
    """GM's signature (every graph capture makes has one)."""
    sig = gm.meta.get(_KEY)
    if not isinstance(sig, Signature):
        raise KeyError("this graph carries no anefx signature (it was not made by capture)")
    return sig


def has_signature(gm: fx.GraphModule) -> bool:
    return isinstance(gm.meta.get(_KEY), Signature)


def set_signature(gm: fx.GraphModule, sig: Signature) -> None:
    gm.meta[_KEY] = sig


# ---------------------------------------------------------------------------------------------
# Logits: stitched in one place


def join_logits(values: Sequence[Any], outputs: Sequence[Output]) -> torch.Tensor:
    """The (B, S, V) logits from VALUES, the tensors of OUTPUTS (a graph's logits outputs, in
    any order): one (B, S, V) tensor as is, or channels-first slices (B, w, 1, S) concatenated
    over the vocabulary in the order of their ranges."""
    if len(values) != len(outputs) or not outputs:
        raise ValueError(f"{len(values)} values for {len(outputs)} logits outputs")
    pairs = sorted(
        zip(outputs, values, strict=True), key=lambda p: p[0].vocab[0] if p[0].vocab else 0
    )
    tensors = [torch.as_tensor(v) for _, v in pairs]
    axes = pairs[0][0].axes
    if axes == ("B", "S", "V"):
        return torch.cat(tensors, dim=2) if len(tensors) > 1 else tensors[0]
    if axes == ("B", "V", "1", "S"):
        return torch.cat(tensors, dim=1).squeeze(2).transpose(1, 2)
    raise ValueError(f"logits in axes {axes}: neither (B, S, V) nor (B, V, 1, S)")


# ---------------------------------------------------------------------------------------------
# Physical layouts of values inside the graph


@dataclass(frozen=True)
class AxisMap:
    """A value held in a physical layout other than its logical one: logical axis ``i`` (of
    logical ``shape``) is physical axis ``dims[i]``; ``None`` only for a logical axis of size 1
    (physical axes no logical axis maps to have size 1)."""

    shape: tuple[int, ...]
    dims: tuple[int | None, ...]


def set_axis_map(node: fx.Node, axis_map: AxisMap) -> None:
    node.meta[_AXES_KEY] = axis_map


def axis_map(node: fx.Node) -> AxisMap | None:
    """Where NODE's logical axes are (None: physical = logical)."""
    found = node.meta.get(_AXES_KEY)
    return found if isinstance(found, AxisMap) else None


def to_logical(value: torch.Tensor, node: fx.Node) -> torch.Tensor:
    """VALUE (NODE's physical tensor) in NODE's logical layout."""
    m = axis_map(node)
    if m is None:
        return value
    order = [d for d in m.dims if d is not None]
    rest = [a for a in range(value.dim()) if a not in order]
    # the unit physical axes first, then the logical ones in logical order
    moved = value.permute(*rest, *order).reshape(
        [s for i, s in enumerate(m.shape) if m.dims[i] is not None]
    )
    return moved.reshape(m.shape)
