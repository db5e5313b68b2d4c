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

import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from anefx.errors import AnefxInputError

# Names of the captured inputs, in call order. The emitter and the report use them verbatim.
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
CAUSAL_MASK = "causal_mask"

INPUT_DESCRIPTIONS = {
    INPUT_IDS: "token ids, int32 (1, S)",
    POSITION_IDS: "position of each token, int32 (1, S)",
    CAUSAL_MASK: "additive attention mask, (1, 1, S, S): 0 where attending is allowed, "
    "a large negative value elsewhere",
}


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


def causal_mask(seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive causal mask the captured graph expects, (1, 1, S, S)."""
    neg = torch.finfo(torch.float16).min  # representable in fp16 and fp32 alike
    m = torch.full((seq_len, seq_len), neg, dtype=dtype).triu(1)
    return m[None, None]


def example_inputs(seq_len: int, dtype: torch.dtype, device: str = "cpu") -> tuple:
    """Inputs with the captured shapes: ids, positions 0..S-1, causal mask."""
    ids = torch.zeros(1, seq_len, dtype=torch.int32, device=device)
    pos = torch.arange(seq_len, dtype=torch.int32, device=device)[None]
    mask = causal_mask(seq_len, dtype).to(device)
    return ids, pos, mask


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


def capture(model: torch.nn.Module, seq_len: int = 64, meta: bool = False) -> Captured:
    """Export MODEL at a fixed sequence length into an unlifted ATen GraphModule."""
    if seq_len < 1:
        raise AnefxInputError(f"--seq must be a positive integer, got {seq_len}")
    dtype = next(model.parameters()).dtype
    device = "meta" if meta else "cpu"
    args = example_inputs(seq_len, dtype, device)
    seconds = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(PrefillWrapper(model), args, strict=False)
    seconds["export"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ep = ep.run_decompositions({})
    seconds["decompose"] = time.perf_counter() - t0
    gm = unlift(ep)
    return Captured(
        graph_module=gm,
        seq_len=seq_len,
        dtype=dtype,
        meta=meta,
        input_names=[INPUT_IDS, POSITION_IDS, CAUSAL_MASK],
        seconds=seconds,
    )


def attr_name(target: str) -> str:
    """A GraphModule attribute name for a state-dict key."""
    name = target[len(_WRAPPER_PREFIX) :] if target.startswith(_WRAPPER_PREFIX) else target
    return name.replace(".", "_")


def unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """Turn weight placeholders into get_attr constants; keep user inputs as placeholders."""
    from torch.export.graph_signature import InputKind

    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(ep.constants)
    lifted = {}
    for spec in sig.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            lifted[spec.arg.name] = spec.target

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
            new.meta["anefx_param"] = target[len(_WRAPPER_PREFIX) :]
            env[node] = new
        elif node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda n: env[n]))
        else:
            new = graph.node_copy(node, lambda n: env[n])
            if node.op == "placeholder":
                new.meta = dict(node.meta)
            env[node] = new
    gm = fx.GraphModule(root, graph)
    for node in gm.graph.nodes:
        mod = module_path(node)
        if mod:
            node.meta["anefx_module"] = mod
        elif "anefx_param" in node.meta:
            node.meta["anefx_module"] = node.meta["anefx_param"].rsplit(".", 1)[0]
    # The wrapper returns a single tensor; keep the output flat and un-tupled.
    out = gm.graph.output_node()
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    gm.recompile()
    return gm
