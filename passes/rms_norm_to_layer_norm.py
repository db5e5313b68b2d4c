"""RMSNorm -> layer_norm in the exact form (every norm: model, layer, per-head q/k; any eps).

    before: x(..,D) -> pow(2) -> mean(-1, keepdim) -> add(eps) -> rsqrt -> mul(x, .)
            [-> cast] -> mul(w(D), .) -> y(..,D)
    after:  y = slice(layer_norm(cat([x, -x], -1), weight=cat([w, w]), axis=-1, eps), -1, 0, D)
cat([x, -x]) has mean exactly 0, so layer_norm over 2D is x / sqrt(mean(x^2) + eps): RMSNorm,
not LayerNorm, on inputs of any mean. The match is on the arithmetic, not on module names, and
the fp32 up-cast transformers wraps around the norm is dropped (the ANE computes in fp16).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.ops import LAYER_NORM
from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    add_const,
    aten,
    const_value,
    emit,
    is_op,
    mark_unlowered,
    recompile,
    shape_of,
    unlowered,
    val,
)


def _strip_cast(node):
    while is_op(node, aten._to_copy) and set(node.kwargs) <= {"dtype"}:
        node = node.args[0]
    return node


def _is_square_of(node, x) -> bool:
    if is_op(node, aten.pow) and node.args[1] == 2:
        return _strip_cast(node.args[0]) is x or node.args[0] is x
    if is_op(node, aten.mul) and node.args[0] is node.args[1]:
        return True
    return False


def _match(rsqrt: fx.Node):
    """From an rsqrt node: (x, eps, scaled, out, weight) or None."""
    add = rsqrt.args[0]
    if not is_op(add, aten.add) or not isinstance(add.args[1], (int, float)):
        return None
    eps = float(add.args[1])
    mean = add.args[0]
    if not is_op(mean, aten.mean) or len(mean.args) < 3 or mean.args[2] is not True:
        return None
    sq = mean.args[0]
    x_up = sq.args[0]
    x = _strip_cast(x_up)
    rank = len(shape_of(x) or ())
    if [d % rank for d in mean.args[1]] != [rank - 1] or not _is_square_of(sq, x):
        return None
    scaled = [u for u in rsqrt.users if is_op(u, aten.mul) and x_up in u.args]
    if len(scaled) != 1 or len(rsqrt.users) != 1:
        return None
    scaled = scaled[0]
    out, weight = scaled, None
    nxt = list(scaled.users)
    if len(nxt) == 1 and is_op(nxt[0], aten._to_copy):
        out = nxt[0]
        nxt = list(out.users)
    if len(nxt) == 1 and is_op(nxt[0], aten.mul):
        other = [a for a in nxt[0].args if a is not out]
        if len(other) == 1 and isinstance(other[0], fx.Node) and other[0].op == "get_attr":
            if shape_of(other[0]) == (shape_of(x)[-1],):
                out, weight = nxt[0], other[0]
    return x, eps, out, weight


def rms_norm_to_layer_norm(gm: fx.GraphModule) -> PassResult:
    """Rewrite every RMSNorm (found by its arithmetic) into the exact layer_norm form."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.rsqrt) or node.graph is not g:
            continue
        m = _match(node)
        if m is None:
            mark_unlowered(node, "rms_norm_to_layer_norm", _NOT_RMS)
            continue
        x, eps, out, weight = m
        dim = shape_of(x)[-1]
        out_dtype = val(out).dtype
        w = const_value(gm, weight) if weight is not None else None
        with g.inserting_before(out):
            src = x
            if val(x).dtype != out_dtype:
                src = emit(g, aten._to_copy.default, (x,), {"dtype": out_dtype}, like=out)
            neg = emit(g, aten.neg.default, (src,), like=out)
            both = emit(g, aten.cat.default, ([src, neg], -1), like=out)
            wnode = None
            if w is not None:
                wnode = add_const(
                    gm, torch.cat([w, w]).to(out_dtype), f"{weight.target}_x2", like=out
                )
            ln = emit(g, LAYER_NORM, (both, wnode, -1, eps), like=out)
            half = emit(g, aten.slice.Tensor, (ln, -1, 0, dim), like=out)
        out.replace_all_uses_with(half)
        modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    for node in g.nodes:  # a pow no RMSNorm consumed (another normalisation, a power)
        if is_op(node, aten.pow) and not unlowered(node):
            mark_unlowered(node, "rms_norm_to_layer_norm", _NOT_RMS)
    return PassResult(gm, modified)


_NOT_RMS = "not an RMSNorm (x * rsqrt(mean(x^2, -1) + eps) [* w]): left for the checker"


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No rsqrt or pow is left but those the pass reported as not an RMSNorm: every RMSNorm
    became layer_norm."""
    return [
        f"{n.name}: {n.target} left (an RMSNorm the pass did not recognise?)"
        for n in gm.graph.nodes
        if is_op(n, aten.rsqrt, aten.pow) and not unlowered(n)
    ]


register_pass("rms_norm_to_layer_norm", lambda: rms_norm_to_layer_norm, postcondition)
