"""Capture a stock transformers causal LM as an ATen-level torch.fx graph.

The capture is a thin wrapper around the unmodified model: it fixes the call signature that
the ANE package will have (token ids, position ids and an additive causal mask as *inputs*, so
nothing of the mask is built in the graph) and runs ``torch.export(strict=False)`` followed by
``run_decompositions({})``. The exported program is then "unlifted" into a plain GraphModule
whose weights are ``get_attr`` constants, because every later pass treats them as constants.

A stateful decoder (KV cache held as Core ML state) adds a wrapper with cache buffers and a
context length beside :class:`PrefillWrapper`; the unlifting and the provenance metadata below
are shared.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from anefx.core.annotations import MODULE, MODULE_CLASS
from anefx.core.signature import Input, Output, Role, Signature, set_signature
from anefx.errors import AnefxInputError
from anefx.models.families import family_of, known_family
from anefx.models.limits import MAX_STATE_BYTES
from anefx.models.repeat_layers import (
    RepeatError,
    decoder_layers,
    layer_signature,
    prefix_length,
    repeat_layers,
    truncated,
)

# Names of the captured inputs, in call order. The emitter and the report use them verbatim.
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
CAUSAL_MASK = "causal_mask"


class PrefillWrapper(torch.nn.Module):
    """Calls the stock model with an explicit 4-D mask and position ids; returns the logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, causal_mask: torch.Tensor
    ) -> torch.Tensor:
        out = self.m(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=causal_mask,
            use_cache=False,
        )
        return out.logits


def check_state_bytes(config, context: int) -> int:
    """The bytes of every state of the family's KV cache at CONTEXT (fp16); AnefxInputError
    above ``limits.MAX_STATE_BYTES``, before anything is allocated."""
    states = family_of(config).states(config, context, "float16")
    total = sum(math.prod(state.shape) for state in states) * 2
    if total > MAX_STATE_BYTES:
        raise AnefxInputError(
            f"--context {context}: the KV cache of {config.num_hidden_layers} layers would hold "
            f"{total / 1e9:.1f} GB, above the {MAX_STATE_BYTES / 1e9:.1f} GB anefx allocates "
            "(MAX_STATE_BYTES, models/limits.py)"
        )
    return total


class StatefulWrapper(torch.nn.Module):
    """The stateful signature: ids (1,S), position ids (1,S), mask (1,1,S,context); the
    family's states (a K and a V cache per layer) held as buffers the graph writes (Core ML
    state), updated by the family's cache object."""

    def __init__(self, model: torch.nn.Module, context: int):
        super().__init__()
        self.m = model
        self.context = context
        self.family = family_of(model.config)
        param = next(model.parameters())
        dtype = str(param.dtype).removeprefix("torch.")
        for state in self.family.states(model.config, context, dtype):
            self.register_buffer(
                state.name, torch.zeros(state.shape, dtype=param.dtype, device=param.device)
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, causal_mask: torch.Tensor
    ) -> torch.Tensor:
        cache = self.family.cache(self, position_ids)
        out = self.m(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=causal_mask,
            past_key_values=cache,
            use_cache=True,
            **cache.model_kwargs(),
        )
        return out.logits


# The wrapper holds the model as attribute "m"; module paths in reports drop this prefix.
_WRAPPER_PREFIX = "m."


@dataclass
class Captured:
    """The captured graph plus what later stages need to know about its signature."""

    graph_module: fx.GraphModule
    seq_len: int
    dtype: torch.dtype
    meta: bool
    input_names: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    context: int | None = None
    exported_layers: int | None = None  # how many layers export traced (the rest repeated)


def causal_mask(seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive causal mask the captured graph expects, (1, 1, S, S)."""
    neg = torch.finfo(torch.float16).min  # representable in fp16 and fp32 alike
    m = torch.full((seq_len, seq_len), neg, dtype=dtype).triu(1)
    return m[None, None]


def context_mask(positions: torch.Tensor, context: int, dtype=torch.float32) -> torch.Tensor:
    """The (1, 1, S, context) additive mask for queries at POSITIONS (1, S): each sees the
    slots at or before its own position."""
    neg = torch.finfo(torch.float16).min
    slots = torch.arange(context)[None, :]
    allowed = slots <= positions.reshape(-1, 1).long()
    return torch.where(allowed, 0.0, neg).to(dtype)[None, None]


def example_inputs(
    seq_len: int, dtype: torch.dtype, device: str = "cpu", context: int | None = None
) -> tuple:
    """Inputs with the captured shapes: ids, positions 0..S-1, causal mask (S or context wide)."""
    ids = torch.zeros(1, seq_len, dtype=torch.int32, device=device)
    pos = torch.arange(seq_len, dtype=torch.int32)[None]  # values: the mask is built from them
    if context is None:
        mask = causal_mask(seq_len, dtype)
    else:
        mask = context_mask(pos, context, dtype)
    return ids, pos.to(device), mask.to(device)


def module_path(node: fx.Node) -> str | None:
    """Source module of a captured node, e.g. ``model.layers.3.self_attn.q_proj``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # export spells nested paths with dots, sometimes with "L['self']." style prefixes
    path = path.replace("L['self'].", "").replace("L__self___", "")
    if path.startswith(_WRAPPER_PREFIX):
        path = path[len(_WRAPPER_PREFIX) :]
    return path or None


def module_class(node: fx.Node) -> str | None:
    """The transformers class of a captured node's source module, e.g.
    ``Qwen4ExpTextQSAIndexer`` (export records it beside the path, as a class or its
    qualified name)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    kind = list(stack.values())[-1][1]
    name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return name.rsplit(".", 1)[-1] or None


@contextlib.contextmanager
def _grouped_mm_experts(model: torch.nn.Module):
    """Trace mixture-of-experts blocks with transformers' grouped_mm experts implementation.

    The eager one loops over the experts a batch hits (data-dependent, not exportable); the
    grouped one is a fixed chain (sort, grouped matmuls) that passes/densify_experts.py reads.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    if config is None or current is None or current == "grouped_mm":
        yield
        return
    config._experts_implementation = "grouped_mm"
    try:
        yield
    finally:
        config._experts_implementation = current


@contextlib.contextmanager
def _fixed_dynamic_rope(model: torch.nn.Module, table_len: int):
    """Dynamic-NTK rotary embeddings with the frequencies transformers uses at TABLE_LEN tokens.

    transformers recomputes them inside forward from max(position_ids), which export cannot
    trace (data-dependent). This sets them as its dynamic update would for a sequence of
    TABLE_LEN positions (scaled above the original length, the original ones otherwise), with
    transformers' own init function, and skips the update while exporting; the module is
    restored afterwards. The graph is then exact for every sequence transformers runs with
    the same frequencies: any length up to the original maximum when TABLE_LEN is within it,
    and a full TABLE_LEN when beyond.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    saved = []
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        if not isinstance(rope_type, str) or "dynamic" not in rope_type:
            continue
        if not hasattr(module, "inv_freq") or not hasattr(module, "original_max_seq_len"):
            continue
        saved.append((module, module.inv_freq, module.attention_scaling, rope_type))
        if table_len > module.original_max_seq_len:
            # a tensor length, as transformers passes max(position_ids) + 1: same arithmetic
            length = torch.tensor(table_len)
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](
                module.config, device="cpu", seq_len=length
            )
            module.attention_scaling = scaling
        else:
            inv_freq = module.original_inv_freq
        module.register_buffer(
            "inv_freq", inv_freq.to(module.inv_freq.device, module.inv_freq.dtype), False
        )
        module.rope_type = "fixed"  # neither dynamic nor longrope: forward skips the update
    try:
        yield
    finally:
        for module, inv_freq, scaling, rope_type in saved:
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            module.attention_scaling = scaling
            module.rope_type = rope_type


def _export(
    model: torch.nn.Module, seq_len: int, meta: bool, context: int | None, seconds: dict
) -> tuple[fx.GraphModule, list[str]]:
    """torch.export + ATen decompositions + unlift of MODEL as it is now: the graph and its
    state placeholders' names, in call order."""
    dtype = next(model.parameters()).dtype
    args = example_inputs(seq_len, dtype, "meta" if meta else "cpu", context)
    wrapper = PrefillWrapper(model) if context is None else StatefulWrapper(model, context)
    t0 = time.perf_counter()
    table_len = context or seq_len
    family = known_family(getattr(model, "config", None))
    substitute = family.capture_context(model) if family else contextlib.nullcontext()
    with (
        torch.no_grad(),
        _grouped_mm_experts(model),
        _fixed_dynamic_rope(model, table_len),
        substitute,
    ):
        ep = torch.export.export(wrapper, args, strict=False)
    seconds["export"] = seconds.get("export", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    ep = ep.run_decompositions({})
    seconds["decompose"] = seconds.get("decompose", 0.0) + time.perf_counter() - t0
    return unlift(ep)


def _layer_states(model: torch.nn.Module):
    """layer -> the names of that layer's states, in the family's call order."""
    specs = family_of(model.config).states(model.config, 1, "float32")

    def names(layer: int) -> list[str]:
        return [s.name for s in specs if s.layers == (layer,)]

    return names


def capture(
    model: torch.nn.Module,
    seq_len: int = 64,
    meta: bool = False,
    context: int | None = None,
    repeat: bool = True,
) -> Captured:
    """Export MODEL at a fixed sequence length into an unlifted ATen GraphModule carrying its
    :class:`~anefx.core.signature.Signature`.

    With CONTEXT, the graph also reads and writes a KV cache of that many positions: the cache
    tensors become extra inputs and outputs (the signature's states). With REPEAT, only the
    first layers are exported and the others are copies of them in the graph
    (models/repeat_layers.py), so the cost does not grow with depth.
    """
    if seq_len < 1:
        raise AnefxInputError(f"--seq must be a positive integer, got {seq_len}")
    if context is not None and not seq_len <= context:
        raise AnefxInputError(f"--context {context} must be at least the batch {seq_len}")
    seconds: dict[str, float] = {}
    found = decoder_layers(model)
    total = len(found[1]) if found else None
    k = total
    if repeat and found:
        k = prefix_length([layer_signature(layer) for layer in found[1]])
    if found and k < total:
        with truncated(model, k):
            gm, states = _export(model, seq_len, meta, context, seconds)
        t0 = time.perf_counter()
        try:
            states = repeat_layers(gm, model, k, _layer_states(model), attr_name, states)
            seconds["repeat"] = time.perf_counter() - t0
        except RepeatError:
            # a structure the repetition does not cover: export every layer
            gm, states = _export(model, seq_len, meta, context, seconds)
            k = total
    else:
        gm, states = _export(model, seq_len, meta, context, seconds)
        k = total
    dtype = next(model.parameters()).dtype
    set_signature(gm, signature(model.config, seq_len, dtype, context, states))
    return Captured(
        graph_module=gm,
        seq_len=seq_len,
        dtype=dtype,
        meta=meta,
        input_names=[INPUT_IDS, POSITION_IDS, CAUSAL_MASK],
        seconds=seconds,
        context=context,
        exported_layers=k,
    )


def signature(
    config, seq_len: int, dtype: torch.dtype, context: int | None, states: list[str]
) -> Signature:
    """The captured graph's signature: ids, positions and mask in; logits (B, S, V) out; with
    CONTEXT, STATES (the caches' names in call order) as Core ML states."""
    fp = str(dtype).removeprefix("torch.")
    keys = context or seq_len
    vocab = config.vocab_size
    specs = {s.name: s for s in family_of(config).states(config, context, fp)} if context else {}
    return Signature(
        inputs=(
            Input(INPUT_IDS, Role.TOKENS, (1, seq_len), "int32", ("B", "S")),
            Input(POSITION_IDS, Role.POSITIONS, (1, seq_len), "int32", ("B", "S")),
            Input(CAUSAL_MASK, Role.MASK, (1, 1, seq_len, keys), fp, ("B", "1", "S", "T")),
        ),
        outputs=(
            Output(
                "logits",
                Role.LOGITS,
                (1, seq_len, vocab),
                fp,
                ("B", "S", "V"),
                vocab=(0, vocab),
                description="logits",
            ),
        ),
        states=tuple(specs[name] for name in states),
    )


def attr_name(target: str) -> str:
    """A GraphModule attribute name for a state-dict key."""
    name = target[len(_WRAPPER_PREFIX) :] if target.startswith(_WRAPPER_PREFIX) else target
    return name.replace(".", "_")


def unlift(ep: torch.export.ExportedProgram) -> tuple[fx.GraphModule, list[str]]:
    """Turn weight placeholders into get_attr constants; keep user inputs as placeholders.
    Returns the graph and the names of its state placeholders (mutated buffers: the KV cache),
    which follow the user inputs and whose new values follow the user outputs, in this order."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(ep.constants)
    mutated = {
        spec.target: spec.arg.name
        for spec in sig.output_specs
        if spec.kind == OutputKind.BUFFER_MUTATION
    }
    lifted, states, made = {}, {}, set()
    for spec in sig.input_specs:
        if spec.kind == InputKind.BUFFER and spec.target in mutated:
            states[spec.arg.name] = spec.target  # a KV cache: stays an input (Core ML state)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            lifted[spec.arg.name] = spec.target
            if spec.kind == InputKind.CONSTANT_TENSOR:
                made.add(spec.arg.name)  # a tensor the model's code made, not a weight

    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            target = lifted[node.name]
            name = attr_name(target)
            tensor = state[target]
            if isinstance(tensor, torch.nn.Parameter):
                tensor = tensor.detach()
            setattr(root, name, tensor)
            new = graph.get_attr(name)
            new.meta = dict(node.meta)
            new.meta["anefx_param"] = (
                target[len(_WRAPPER_PREFIX) :] if target.startswith(_WRAPPER_PREFIX) else target
            )
            if node.name in made:
                new.meta["anefx_lifted"] = True
            env[node] = new
        elif node.op == "output":
            user = [
                env[a]
                for a, spec in zip(node.args[0], sig.output_specs, strict=True)
                if spec.kind == OutputKind.USER_OUTPUT
            ]
            by_name = {n.name: env[n] for n in node.args[0] if isinstance(n, fx.Node)}
            graph.output(tuple(user) + tuple(by_name[mutated[t]] for t in states.values()))
        elif node.op == "placeholder" and node.name in states:
            new = graph.placeholder(states[node.name])
            new.meta = dict(node.meta)
            env[node] = new
        else:
            new = graph.node_copy(node, lambda n: env[n])
            if node.op == "placeholder":
                new.meta = dict(node.meta)
            env[node] = new
    gm = fx.GraphModule(root, graph)
    for node in gm.graph.nodes:
        mod = module_path(node)
        if mod:
            node.meta[MODULE] = mod
            if cls := module_class(node):
                node.meta[MODULE_CLASS] = cls
        elif "anefx_param" in node.meta:
            param = node.meta["anefx_param"]
            # the wrapper's own buffers (cache slots) belong to the KV cache, not the model
            node.meta[MODULE] = param.rsplit(".", 1)[0] if "." in param else "kv_cache"
    # The wrapper returns a single tensor; keep the output flat and un-tupled.
    out = gm.graph.output_node()
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    if states:
        # signature: the user inputs first, then the states in layer order
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        last = [n for n in phs if n.target not in states.values()][-1]
        for n in reversed([n for n in phs if n.target in states.values()]):
            last.append(n)
    gm.recompile()
    return gm, list(states.values())
