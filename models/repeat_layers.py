"""Capture cost that does not grow with depth: export a few decoder layers, repeat them in fx.

Every decoder layer of a model of one structure traces to the same ATen subgraph; only its
weights and its KV-cache state differ. So the model is exported with its first K layers (enough
that every kind of layer, by structure, appears after layer 0), and each further layer j is a
copy of the last captured layer of its kind t, with layer t's parameters replaced by layer j's,
its state by layer j's state, and its residual input by layer j-1's output. The result is the
graph a full export gives, up to node names; tests compare the two numerically. Anything that
does not fit (a layer reading another layer's values, a block with several outputs) raises
:class:`RepeatError` and the caller falls back to a full export.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator

import torch
import torch.fx as fx

from anefx.core.annotations import MODULE
from anefx.models.families import FAMILIES


class RepeatError(Exception):
    """The captured layers cannot be repeated safely (the reason is the message)."""


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList of decoder layers and its path (the family's, ``model.layers``), if the
    model is of a known family and has one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        return None
    try:
        layers = model.get_submodule(family.layers_path)
    except AttributeError:
        return None
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return family.layers_path, layers
    return None


def layer_signature(layer: torch.nn.Module) -> tuple:
    """What makes two layers trace alike: module types, parameter shapes, attention kind."""
    parts: list = []
    for name, mod in layer.named_modules():
        extra = tuple(
            (a, repr(getattr(mod, a)))
            for a in ("sliding_window", "attention_type", "layer_type", "is_causal", "scaling")
            if hasattr(mod, a)
        )
        parts.append((name, type(mod).__name__, extra))
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return tuple(parts)


def prefix_length(signatures: list[tuple]) -> int:
    """Fewest leading layers (>= 2) such that every later layer's kind occurs among layers
    1..K-1 of them (layer 0 reads the embedding, not another layer)."""
    n = len(signatures)
    for k in range(2, n + 1):
        seen = set(signatures[1:k])
        if all(s in seen for s in signatures[k:]):
            return k
    return n


@contextlib.contextmanager
def truncated(model: torch.nn.Module, k: int) -> Iterator[None]:
    """MODEL with only its first K decoder layers (config included) while inside."""
    found = decoder_layers(model)
    assert found is not None
    path, layers = found
    owner_path, _, leaf = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    config = model.config
    saved_layers, saved_n = layers, config.num_hidden_layers
    saved_types = getattr(config, "layer_types", None)
    setattr(owner, leaf, torch.nn.ModuleList(list(layers)[:k]))
    config.num_hidden_layers = k
    if isinstance(saved_types, list):
        config.layer_types = saved_types[:k]
    try:
        yield
    finally:
        setattr(owner, leaf, saved_layers)
        config.num_hidden_layers = saved_n
        if isinstance(saved_types, list):
            config.layer_types = saved_types


def _block_of(node: fx.Node, prefix: str) -> int | None:
    module = node.meta.get(MODULE) or ""
    if not module.startswith(prefix + "."):
        return None
    head = module[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def repeat_layers(
    gm: fx.GraphModule,
    model: torch.nn.Module,
    captured: int,
    layer_states,
    attr_name,
    state_names: list[str] | None = None,
) -> list[str]:
    """Extend GM (MODEL's first CAPTURED layers) to all of MODEL's layers; returns the names of
    its state placeholders in call order (the graph's state outputs follow the same order).

    LAYER_STATES(layer) names a layer's state placeholders, in call order (the family's states
    of that layer: K and V, or a conv window and a recurrent state); ATTR_NAME(fqn) is the
    GraphModule attribute for a parameter (as capture's unlift names them); STATE_NAMES are the
    captured graph's states, in call order (unlift returns them).
    """
    state_names = list(state_names or [])
    layer_states_of = layer_states
    prefix, layers = decoder_layers(model)
    total = len(layers)
    if captured >= total:
        return state_names
    sigs = [layer_signature(layer) for layer in layers]
    template_of = {}
    for j in range(captured, total):
        t = max((i for i in range(1, captured) if sigs[i] == sigs[j]), default=None)
        if t is None:
            raise RepeatError(f"layer {j} has no captured layer of its kind")
        template_of[j] = t

    g = gm.graph
    nodes = list(g.nodes)
    blocks: dict[int, list[fx.Node]] = {}
    for n in nodes:
        b = _block_of(n, prefix)
        if b is not None:
            blocks.setdefault(b, []).append(n)
    if sorted(blocks) != list(range(captured)):
        raise RepeatError(f"captured blocks {sorted(blocks)}, expected 0..{captured - 1}")
    member = {n: b for b, ns in blocks.items() for n in ns}
    out_node = g.output_node()

    def residual_out(b: int) -> fx.Node:
        """The one node of block B read outside it (the hidden state), state outputs aside."""
        outs = [
            n for n in blocks[b] if any(u is not out_node and member.get(u) != b for u in n.users)
        ]
        if len(outs) != 1:
            raise RepeatError(f"layer {b} passes {len(outs)} values on, expected 1")
        return outs[0]

    residual = {b: residual_out(b) for b in blocks}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    states = {n.target: n for n in placeholders}
    outputs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else None
    if state_names and outputs is None:
        raise RepeatError("a stateful graph without a tuple output")
    state_out_index = {}
    if state_names:
        first_state = len(outputs) - len(state_names)
        for i, name in enumerate(state_names):
            state_out_index[name] = first_state + i

    last = residual[captured - 1]
    tail_users = [u for u in last.users if member.get(u) is None and u is not out_node]
    after_last = nodes[nodes.index(last) + 1 :]
    anchor = next(n for n in after_last if member.get(n) is None)  # copies go before the tail
    last_placeholder = placeholders[-1]
    current = last
    new_states: list[tuple[str, fx.Node]] = []
    for j in range(captured, total):
        t = template_of[j]
        env: dict[fx.Node, fx.Node] = {}
        layer_states = {}
        for old, new_name in zip(layer_states_of(t), layer_states_of(j), strict=True):
            if old in states:
                with g.inserting_after(last_placeholder):
                    ph = g.placeholder(new_name)
                last_placeholder = ph  # states follow the inputs, in layer order
                ph.meta = dict(states[old].meta)
                env[states[old]] = ph
                layer_states[old] = ph

        def arg(a: fx.Node, t: int = t, env: dict = env, current: fx.Node = current) -> fx.Node:
            if a in env:
                return env[a]
            if a is residual.get(t - 1):
                return current
            owner = member.get(a)
            if owner is not None and owner != t:
                raise RepeatError(f"layer {t} reads {a.name} of layer {owner}")
            return a

        old_prefix, new_prefix = f"{prefix}.{t}", f"{prefix}.{j}"
        for n in blocks[t]:
            if n.op == "get_attr" and n.meta.get("anefx_lifted"):
                # a constant the layer's code made (not a weight): the same tensor, under a name
                # of this layer's, as a full export lifts one per layer (shared, CSE would merge
                # the layers' uses of it and the graph would differ from the full export's)
                name = f"{n.target}_{prefix.replace('.', '_')}_{j}"
                gm.register_buffer(name, operator.attrgetter(n.target)(gm), persistent=False)
                with g.inserting_before(anchor):
                    new = g.get_attr(name)
                new.meta = dict(n.meta)
                env[n] = new
                continue
            if n.op == "get_attr":
                fqn = n.meta.get("anefx_param", "")
                if not fqn.startswith(old_prefix + "."):
                    raise RepeatError(f"{n.target}: a constant of layer {t} that is no parameter")
                fqn = new_prefix + fqn[len(old_prefix) :]
                tensor = _tensor(model, fqn)
                name = attr_name(fqn)
                gm.register_buffer(name, tensor, persistent=False)
                with g.inserting_before(anchor):
                    new = g.get_attr(name)
                new.meta = dict(n.meta)
                new.meta["anefx_param"] = fqn
            else:
                with g.inserting_before(anchor):
                    new = g.node_copy(n, arg)
                new.meta = dict(n.meta)
            new.meta.pop("nn_module_stack", None)
            module = n.meta.get(MODULE) or ""
            new.meta[MODULE] = new_prefix + module[len(old_prefix) :]
            env[n] = new
        current = env[residual[t]]
        for old, new_name in zip(layer_states_of(t), layer_states_of(j), strict=True):
            if old in layer_states:
                value = outputs[state_out_index[old]]
                if value not in env:
                    raise RepeatError(f"the new value of {old} is not computed in layer {t}")
                new_states.append((new_name, env[value]))
    for u in tail_users:
        u.replace_input_with(last, current)
    order = list(state_names)
    if new_states:
        order += [name for name, _ in new_states]
        values = dict(zip(state_names, outputs[first_state:], strict=True))
        values.update(dict(new_states))
        out_node.args = (tuple(outputs[:first_state]) + tuple(values[n] for n in order),)
    g.eliminate_dead_code()
    gm.recompile()
    return order


def _tensor(model: torch.nn.Module, fqn: str) -> torch.Tensor:
    module_path, _, name = fqn.rpartition(".")
    module = model.get_submodule(module_path)
    t = getattr(module, name)
    if not isinstance(t, torch.Tensor):
        raise RepeatError(f"{fqn} is not a tensor")
    return t.detach() if isinstance(t, torch.nn.Parameter) else t
