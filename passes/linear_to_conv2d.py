"""Every dense layer becomes a 1x1 Conv2d on the (B, C, 1, S) layout.

    before: y(1,S,Co) = linear(x(1,S,Ci), W(Co,Ci), b?)
    after:  y = view(permute(conv2d(permute(view(x,(1,1,S,Ci)),(0,3,1,2)), W(Co,Ci,1,1), b?),
                             (0,2,3,1)), (1,S,Co))
The permutes written here cancel in sink_layout_changes, which carries (B, C, 1, S) through the
decoder: a layer keeps 0 transposes and 8 reshapes (head split/merge, grouped-query batch).
"""

from __future__ import annotations

import math

import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    add_const,
    aten,
    const_value,
    emit,
    is_op,
    recompile,
    shape_of,
)


def linear_to_conv2d(gm: fx.GraphModule) -> PassResult:
    """Replace aten.linear (weights known at compile time) with conv2d + layout changes."""
    g = gm.graph
    modified = False
    weights: dict[str, fx.Node] = {}
    for node in list(g.nodes):
        if not is_op(node, aten.linear):
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        wt = const_value(gm, w)
        xs = shape_of(x)
        if wt is None or xs is None:
            continue
        cout, cin = wt.shape
        rows = math.prod(xs[:-1])
        with g.inserting_before(node):
            if w.target not in weights:
                # a view of the same storage: tied embeddings stay shared
                weights[w.target] = add_const(
                    gm, wt.view(cout, cin, 1, 1), f"{w.target}_conv", like=node
                )
            x4 = emit(g, aten.reshape.default, (x, [1, 1, rows, cin]), like=node)
            xc = emit(g, aten.permute.default, (x4, [0, 3, 1, 2]), like=node)
            conv = emit(g, aten.conv2d.default, (xc, weights[w.target], b), like=node)
            yc = emit(g, aten.permute.default, (conv, [0, 2, 3, 1]), like=node)
            y = emit(g, aten.reshape.default, (yc, [*xs[:-1], cout]), like=node)
        node.replace_all_uses_with(y)
        g.erase_node(node)
        modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No aten.linear is left."""
    return [f"{n.name}: aten.linear left" for n in gm.graph.nodes if is_op(n, aten.linear)]


register_pass("linear_to_conv2d", lambda: linear_to_conv2d, postcondition)
