"""squeeze and unsqueeze become reshape, the one view op the emitter writes; an expand that
adds leading axes first reshapes to its rank.

    before: o(H,S,D) -> transpose(0,1) -> unsqueeze(0) (1,S,H,D) ; w(C,1,K) -> squeeze(1)
            eye(C,C) -> expand(H,N,C,C)
    after:  o -> transpose(0,1) -> reshape(1,S,H,D) ; eye -> reshape(1,1,C,C) -> expand(H,N,C,C)
Runs after limit_rank, which reads the GQA repeat's unsqueeze; the layout sweep then treats
these as any other reshape, and Core ML's tile (the emitted expand) keeps the rank.
"""

from __future__ import annotations

import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    add_const,
    aten,
    const_value,
    emit,
    is_op,
    keep_unlowered,
    recompile,
    shape_of,
)

_PASS = "views_to_reshape"


def _widening_expand(node: fx.Node) -> bool:
    """An expand whose result has more axes than its input."""
    if not is_op(node, aten.expand):
        return False
    src, out = shape_of(node.args[0]), shape_of(node)
    return src is not None and out is not None and len(out) > len(src)


def _reshaped(gm: fx.GraphModule, g: fx.Graph, x: fx.Node, shape: list[int], like: fx.Node):
    """X reshaped to SHAPE: a constant's view when X is one (nothing left to compute)."""
    t = const_value(gm, x)
    if t is not None:
        return add_const(gm, t.reshape(shape), f"{x.target}_reshaped", like=like)
    return emit(g, aten.reshape.default, (x, shape), like=like)


def views_to_reshape(gm: fx.GraphModule) -> PassResult:
    """Rewrite every squeeze / unsqueeze into a reshape to its result's shape, and give an
    expand adding leading axes an input of its rank."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if is_op(node, aten.squeeze, aten.unsqueeze):
            shape = shape_of(node)
            if shape is None:
                continue
            with g.inserting_before(node):
                new = _reshaped(gm, g, node.args[0], list(shape), node)
            new.meta["val"] = node.meta.get("val")
            keep_unlowered(node, new)  # a rank-5 view limit_rank reported stays reported
            node.replace_all_uses_with(new)
            g.erase_node(node)
            modified = True
        elif _widening_expand(node):
            src, out = shape_of(node.args[0]), shape_of(node)
            with g.inserting_before(node):
                ranked = [1] * (len(out) - len(src)) + list(src)
                r = _reshaped(gm, g, node.args[0], ranked, node)
            node.update_arg(0, r)
            modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No squeeze or unsqueeze is left, and no expand adds axes."""
    return [
        f"{n.name}: {n.target} left"
        for n in gm.graph.nodes
        if is_op(n, aten.squeeze, aten.unsqueeze) or _widening_expand(n)
    ]


register_pass(_PASS, lambda: views_to_reshape, postcondition)
