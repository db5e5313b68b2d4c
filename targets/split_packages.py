"""Split a lowered decoder graph into parts of contiguous layers sized by weight bytes.

A part is a graph of its own: the embedding part maps ids to the hidden state, each decoder
chunk maps the hidden state through its layers (the last one applies the final norm), the head
parts map the normed hidden state to their logits slices. Nodes that depend only on the
positions and the mask (the KV-cache write matrix, the rotary rows) are copied into every part
that reads them, so a chunk's inputs are the hidden state, ``position_ids``, ``causal_mask``
and its own layers' KV states. The plan is data (:class:`PartPlan`) computed from one graph and
applied to every graph of the model (prefill and decode), so both split identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from anefx.core.annotations import MODULE
from anefx.core.signature import (
    Input,
    Output,
    Role,
    Signature,
    Source,
    axis_map,
    set_signature,
    signature_of,
)
from anefx.errors import AnefxGraphError
from anefx.lowering.checker import weight_key
from anefx.models import families

EMBED, DECODER, HEAD = "embed", "decoder", "head"
HIDDEN = "hidden_states"


@dataclass(frozen=True)
class PartPlan:
    """One part: its name (the package's file stem), kind, layers and logits outputs."""

    name: str
    kind: str
    layers: tuple[int, ...] = ()
    outputs: tuple[str, ...] = ()  # head: the logits outputs it computes
    weight_bytes: int = 0  # as the lowered graph holds them (fp16)
    planned_bytes: int = 0  # as the package will store them (palettized: fewer), what sized it

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "layers": list(self.layers),
            "outputs": list(self.outputs),
            "weight_bytes": self.weight_bytes,
            "planned_bytes": self.planned_bytes,
        }


@dataclass
class _Roles:
    """Each node's role: None for a node every part may copy (position-only), else
    ("embed",) / ("layer", i) / ("head", output index) / ("after", None) (rest, placed after
    its inputs)."""

    role: dict[fx.Node, tuple | None] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)
    n_user_outputs: int = 0


def layer_of(module: str | None) -> int | None:
    """The decoder layer index in a module path such as ``model.layers.3.self_attn``, by the
    families' decoder-layer paths (models/families/)."""
    return families.layer_index(module)


def _output_values(gm: fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = out.args[0]
    return list(vals) if isinstance(vals, (tuple, list)) else [vals]


def _roles(gm: fx.GraphModule) -> _Roles:
    sig = signature_of(gm)
    outs = _output_values(gm)
    n_user = len(sig.outputs)
    r = _Roles(output_names=[o.name for o in sig.outputs], n_user_outputs=n_user)
    nodes = list(gm.graph.nodes)
    dependent: set[fx.Node] = set()  # reads the token ids, directly or not
    tokens = sig.placeholder(gm, Role.TOKENS)
    for n in nodes:
        if n is tokens or any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    embed_modules = {
        n.meta.get(MODULE) for n in nodes if n.target is torch.ops.aten.embedding.default
    }
    # the head: the modules of the nodes producing the user outputs
    head_modules = {o.meta.get(MODULE) for o in outs[:n_user] if isinstance(o, fx.Node)} - {None}
    # which user outputs each node reaches (walk backwards from each output)
    reaches: dict[fx.Node, int] = {}
    for i, o in enumerate(outs[:n_user]):
        stack = [o] if isinstance(o, fx.Node) else []
        while stack:
            n = stack.pop()
            if n in reaches or n.meta.get(MODULE) not in head_modules:
                continue
            reaches[n] = i  # lowest output index: outputs are visited in order
            stack.extend(n.all_input_nodes)
    for n in nodes:
        if n.op in ("output", "placeholder") or n not in dependent:
            r.role[n] = None
            continue
        module = n.meta.get(MODULE)
        layer = layer_of(module)
        if layer is not None:
            r.role[n] = ("layer", layer)
        elif module in embed_modules:
            r.role[n] = (EMBED,)
        elif module in head_modules and n in reaches:
            r.role[n] = (HEAD, reaches[n])
        else:
            r.role[n] = ("after", None)
    return r


def _nbytes(gm: fx.GraphModule, node: fx.Node) -> tuple[Hashable, int] | None:
    """(key of the stored bytes, bytes) of a get_attr tensor: the checker's key, so a weight
    split in slices counts every slice (keyed by storage alone, only its first one counted)."""
    t = gm
    for part in node.target.split("."):
        t = getattr(t, part)
    if not isinstance(t, torch.Tensor):
        return None
    return (weight_key(t), t.nbytes)


def _weights_by_role(gm: fx.GraphModule, roles: _Roles) -> dict[tuple, int]:
    """Weight bytes each role reads (a tensor read by several roles counts for each)."""
    seen: dict[tuple, set] = {}
    out: dict[tuple, int] = {}
    for n in gm.graph.nodes:
        role = roles.role.get(n)
        if role is None:
            continue
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                continue
            got = _nbytes(gm, a)
            if got is None or got[0] in seen.setdefault(role, set()):
                continue
            seen[role].add(got[0])
            out[role] = out.get(role, 0) + got[1]
    return out


def _min_cap_chunks(sizes: list[int], cap: int) -> list[list[int]]:
    """Contiguous groups of SIZES (indices), fewest groups with sums <= CAP (an item above CAP
    is a group of its own), balanced: the largest sum of a group of several items is as small
    as that count allows."""

    def greedy(limit: int) -> list[list[int]]:
        groups: list[list[int]] = []
        total = 0
        for i, s in enumerate(sizes):
            if groups and total + s <= limit:
                groups[-1].append(i)
                total += s
            else:
                groups.append([i])
                total = s
        return groups

    if not sizes:
        return []
    count = len(greedy(cap))
    lo, hi = 1, cap
    while lo < hi:  # the smallest limit that still needs no more groups
        mid = (lo + hi) // 2
        if len(greedy(mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    return greedy(lo)


def plan_parts(
    gm: fx.GraphModule, max_bytes: int, stored: dict[str, float] | None = None
) -> list[PartPlan]:
    """The parts of GM's model under MAX_BYTES of stored weights each: one part when all fits,
    else the embedding, decoder chunks of contiguous layers, and head parts of whole slices.

    STORED maps a part kind (embed, decoder, head) to the fraction of its fp16 bytes the
    package will store (below 1 for palettized weights); missing kinds store all."""
    stored = stored or {}
    roles = _roles(gm)
    by_role = _weights_by_role(gm, roles)
    layers = sorted({r[1] for r in roles.role.values() if r and r[0] == "layer"})
    if layers != list(range(len(layers))):
        raise AnefxGraphError(f"decoder layers {layers} are not numbered 0..n-1")
    embed = by_role.get((EMBED,), 0)
    sizes = [by_role.get(("layer", i), 0) for i in layers]
    sizes[-1] += by_role.get(("after", None), 0)  # the final norm: in the last chunk
    heads = [by_role.get((HEAD, i), 0) for i in range(roles.n_user_outputs)]

    def kept(n: float, kind: str) -> int:
        return int(n * stored.get(kind, 1.0))

    planned = kept(embed, EMBED) + kept(sum(sizes), DECODER) + kept(sum(heads), HEAD)
    if planned <= max_bytes:
        total = embed + sum(sizes) + sum(heads)
        return [
            PartPlan("model", "whole", tuple(layers), tuple(roles.output_names), total, planned)
        ]
    plans = [PartPlan(EMBED, EMBED, weight_bytes=embed, planned_bytes=kept(embed, EMBED))]
    layer_kept = [kept(n, DECODER) for n in sizes]
    width = len(str(len(layers) - 1))
    for g in _min_cap_chunks(layer_kept, max_bytes):
        first, last = layers[g[0]], layers[g[-1]]
        plans.append(
            PartPlan(
                f"layers_{first:0{width}d}-{last:0{width}d}",
                DECODER,
                tuple(layers[i] for i in g),
                weight_bytes=sum(sizes[i] for i in g),
                planned_bytes=sum(layer_kept[i] for i in g),
            )
        )
    head_kept = [kept(n, HEAD) for n in heads]
    head_groups = _min_cap_chunks(head_kept, max_bytes)
    for k, g in enumerate(head_groups):
        plans.append(
            PartPlan(
                HEAD if len(head_groups) == 1 else f"{HEAD}_{k}",
                HEAD,
                outputs=tuple(roles.output_names[i] for i in g),
                weight_bytes=sum(heads[i] for i in g),
                planned_bytes=sum(head_kept[i] for i in g),
            )
        )
    return plans


def _part_index(plans: list[PartPlan], roles: _Roles) -> dict[fx.Node, int | None]:
    """Each node's part (index into PLANS); None for position-only nodes every part copies."""
    if len(plans) == 1:
        return {n: (None if r is None else 0) for n, r in roles.role.items()}
    of_layer = {layer: i for i, p in enumerate(plans) for layer in p.layers}
    of_output = {roles.output_names.index(o): i for i, p in enumerate(plans) for o in p.outputs}
    last_decoder = max(i for i, p in enumerate(plans) if p.kind == DECODER)
    index: dict[fx.Node, int | None] = {}
    for n, role in roles.role.items():
        if role is None:
            index[n] = None
        elif role[0] == EMBED:
            index[n] = 0
        elif role[0] == "layer":
            if role[1] not in of_layer:
                raise AnefxGraphError(f"layer {role[1]} of node {n.name} is in no part")
            index[n] = of_layer[role[1]]
        elif role[0] == HEAD:
            index[n] = of_output[role[1]]
        else:  # after its inputs, and at least in the last decoder chunk (the final norm)
            ins = [index[a] for a in n.all_input_nodes if index.get(a) is not None]
            index[n] = max([*ins, last_decoder]) if ins else last_decoder
    return index


def split_graph(gm: fx.GraphModule, plans: list[PartPlan]) -> list[fx.GraphModule]:
    """GM cut into one GraphModule per plan, each with its inputs, outputs and states.

    A value computed in one part and read in a later one leaves the first as an output and
    enters the second as an input, both named ``hidden_states`` (``hidden_states_<k>`` when a
    part passes on several); each part's signature says where each of its inputs comes from
    (a model input, or an earlier part's output) and which non-layer modules it computes.
    """
    roles = _roles(gm)
    index = _part_index(plans, roles)
    state_names = [s.name for s in signature_of(gm).states]
    outs = _output_values(gm)
    n_user = roles.n_user_outputs
    state_value = dict(zip(state_names, outs[n_user:], strict=True))
    # values crossing into a later part, named per producing part
    crossing: dict[fx.Node, str] = {}
    for p in range(len(plans)):
        leaving = []
        for n in gm.graph.nodes:
            if index.get(n) != p:
                continue
            later = {index[u] for u in n.users if u.op != "output" and index.get(u) is not None}
            if any(q != p for q in later):
                if any(q < p for q in later):
                    raise AnefxGraphError(f"node {n.name} is read by an earlier part")
                leaving.append(n)
        for k, n in enumerate(leaving):
            crossing[n] = HIDDEN if len(leaving) == 1 else f"{HIDDEN}_{k}"
    parts = []
    for p, plan in enumerate(plans):
        parts.append(_extract(gm, p, plan, index, crossing, roles, state_names, state_value, outs))
    return parts


def _extract(
    gm: fx.GraphModule,
    p: int,
    plan: PartPlan,
    index: dict[fx.Node, int | None],
    crossing: dict[fx.Node, str],
    roles: _Roles,
    state_names: list[str],
    state_value: dict[str, fx.Node],
    outs: list,
) -> fx.GraphModule:
    """Part P of GM as a GraphModule of its own (see :func:`split_graph`)."""
    own = [n for n in gm.graph.nodes if index.get(n) == p]
    if not own:
        raise AnefxGraphError(f"part {plan.name} has no nodes")
    # a state belongs to the part that writes it; no other part may read it
    my_states = [s for s in state_names if index.get(state_value[s]) == p]
    needed: set[fx.Node] = set()
    external: list[fx.Node] = []  # values from earlier parts
    stack = list(own) + [state_value[s] for s in my_states]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if index.get(n) is not None and index[n] != p:
            if n not in external:
                external.append(n)
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    for n in needed:
        if n.op == "placeholder" and n.name in state_names and n.name not in my_states:
            raise AnefxGraphError(
                f"state {n.name} is read in part {plan.name} but written elsewhere"
            )
    sig = signature_of(gm)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[Input] = []
    for n in external:  # first: the hidden state(s) from earlier parts
        # two earlier parts may both call theirs hidden_states: the input names its part then
        taken = {i.name for i in inputs}
        name = crossing[n] if crossing[n] not in taken else f"{crossing[n]}_p{index[n]}"
        ph = g.placeholder(name)
        ph.meta = dict(n.meta)
        ph.meta.pop("anefx_pass", None)
        env[n] = ph
        inputs.append(_hidden(n, Input, ph.name, source=Source(part=index[n], output=crossing[n])))
    for n in gm.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            new = g.placeholder(n.name)
            new.meta = dict(n.meta)
            given = sig.named(n.name)
            if isinstance(given, Input):
                inputs.append(dataclasses.replace(given, source=Source(model=n.name)))
        else:
            new = g.node_copy(n, lambda a: env[a])
        env[n] = new
    results, outputs = [], []
    for n in own:
        if n in crossing and any(index.get(u, p) != p for u in n.users if u.op != "output"):
            results.append(env[n])
            outputs.append(
                _hidden(
                    n,
                    Output,
                    crossing[n],
                    description="hidden state (1, C, 1, S) fp16 for the next part",
                )
            )
    for i, o in enumerate(outs[: roles.n_user_outputs]):
        if index.get(o) == p:
            results.append(env[o])
            outputs.append(sig.outputs[i])
    for s in my_states:
        results.append(env[state_value[s]])
    g.output(tuple(results))
    sub = fx.GraphModule(gm, g)
    sub.meta = dict(gm.meta)
    # the modules outside the decoder layers this part computes (the final norm shows here)
    modules = sorted({m for n in own if (m := n.meta.get(MODULE)) and layer_of(m) is None})
    set_signature(
        sub,
        Signature(
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            states=tuple(s for s in sig.states if s.name in my_states),
            modules=tuple(modules),
        ),
    )
    return sub


# the residual stream's logical axes, as captured: (B, S, C)
_STREAM = ("B", "S", "C")


def _hidden(node: fx.Node, kind: type, name: str, **extra):
    """The Input or Output (KIND) carrying NODE, a hidden state, between parts: its physical
    layout named from the layout pass's axis map (the (B, C, 1, S) of the decoder)."""
    val = node.meta["val"]
    m = axis_map(node)
    if m is None:
        axes = _STREAM if val.dim() == 3 else tuple("1" for _ in range(val.dim()))
    else:
        named = ["1"] * val.dim()
        for logical, physical in enumerate(m.dims):
            if physical is not None:
                named[physical] = _STREAM[logical]
        axes = tuple(named)
    dtype = str(val.dtype).removeprefix("torch.")
    return kind(name, Role.HIDDEN, tuple(int(d) for d in val.shape), dtype, axes, **extra)


def _by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)
