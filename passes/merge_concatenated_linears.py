"""Dense layers of one input whose outputs are concatenated become one dense layer.

    before: y_i = linear(x(1,S,C), W_i (N_i,C)) -> [reshapes back to (1,S,N_i)] ;
            y = cat([y_1, ..., y_n], -1) (1,S,sum N_i)
    after:  y = linear(x, cat([W_1, ..., W_n], 0) (sum N_i,C))
Qwen3-Next's linear layer projects q | k | v | z with one in_proj_qkvz whose rows are
interleaved per key head; split_sliced_linears gives each part its own linear (rows gathered
in the weight), and transformers then concatenates q, k and v for the depthwise conv. Joining
those three again gives the one q | k | v projection Qwen3.5 stores (one 1x1 conv instead of
three and a concat). Each y_i must be read by the concat alone (through reshapes that end in
its own shape: the identity), so no weight is stored twice; biases are joined likewise (all
present or none). Any other concat stays as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import PassResult, add_const, aten, const_value, emit, is_op, recompile
from anefx.passes._util import shape_of as _shape

_PASS = "merge_concatenated_linears"
_VIEWS = (aten.reshape, aten.view, aten._unsafe_view)


def _source_linear(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The linear NODE is (through reshapes back to the linear's shape), read by nothing
    else on the way, with a constant weight; else None."""
    shape, chain = _shape(node), node
    while is_op(chain, *_VIEWS) and len(chain.users) == 1:
        chain = chain.args[0]
    if not is_op(chain, aten.linear) or len(chain.users) != 1 or _shape(chain) != shape:
        return None
    return chain if const_value(gm, chain.args[1]) is not None else None


def _match(gm: fx.GraphModule, cat: fx.Node) -> list[fx.Node] | None:
    """The linears CAT joins along its last axis, when it joins only linears of one input with
    constant weights (and all or none with constant biases); else None."""
    if not is_op(cat, aten.cat) or len(cat.args[0]) < 2:
        return None
    shape = _shape(cat)
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if shape is None or dim % len(shape) != len(shape) - 1:
        return None
    linears = [_source_linear(gm, a) for a in cat.args[0]]
    if any(lin is None for lin in linears) or len(set(linears)) != len(linears):
        return None
    if len({lin.args[0] for lin in linears}) != 1:
        return None
    biases = [lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias") for lin in linears]
    if any(b is not None for b in biases) and any(
        b is None or const_value(gm, b) is None for b in biases
    ):
        return None
    return linears


def merge_concatenated_linears(gm: fx.GraphModule) -> PassResult:
    """Join each concat of linears of one input into one linear (weights concatenated)."""
    g = gm.graph
    modified = False
    for cat in list(g.nodes):
        linears = _match(gm, cat)
        if linears is None:
            continue
        first = linears[0]
        weight = torch.cat([const_value(gm, lin.args[1]) for lin in linears], 0)
        bias_nodes = [lin.args[2] if len(lin.args) > 2 else None for lin in linears]
        with g.inserting_before(cat):
            w = add_const(gm, weight, f"{first.args[1].target}_merged", first)
            b = None
            if bias_nodes[0] is not None:
                bias = torch.cat([const_value(gm, n) for n in bias_nodes], 0)
                b = add_const(gm, bias, f"{bias_nodes[0].target}_merged", first)
            merged = emit(g, aten.linear.default, (first.args[0], w, b), like=first)
        merged.meta["val"] = cat.meta.get("val")
        cat.replace_all_uses_with(merged)
        modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No concat joins linears of one input (each read by it alone) along the last axis."""
    return [
        f"{n.name}: concat of linears of one input"
        for n in gm.graph.nodes
        if _match(gm, n) is not None
    ]


register_pass(_PASS, lambda: merge_concatenated_linears, postcondition)
