"""L2 normalisation -> layer_norm in an exact form (the delta rule's q and k, any eps).

    before: x(..,D) -> mul(x, x) -> sum(-1, keepdim) -> add(eps) -> rsqrt -> mul(x, .) -> y(..,D)
    after:  z = mul(x, sqrt(D)) ; y = slice(layer_norm(cat([z, -z], -1), weight=1/sqrt(D) (2D),
                                                      axis=-1, eps), -1, 0, D)
The identity: cat([z, -z]) has mean exactly 0 and variance mean(z^2) = sum(z^2) / D over its
2D entries; with z = sqrt(D) x that is sum(x^2), so layer_norm gives
sqrt(D) x / sqrt(sum(x^2) + eps) on the first half, and gamma = 1/sqrt(D) leaves
x / sqrt(sum(x^2) + eps): the L2 norm with the same eps. (Without the scale, layer_norm would
need eps / D: 1e-6 / D is 0 in fp16 from D = 48 on (dk = 128 in the models), and a zero
row would be 0/0.)
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from anefx.core.ops import LAYER_NORM
from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    add_const,
    aten,
    emit,
    is_op,
    mark_unlowered,
    recompile,
    shape_of,
    unlowered,
    val,
)

_PASS = "l2_norm_to_layer_norm"


def _square_of(node) -> fx.Node | None:
    """x for x * x or x ** 2, else None."""
    if is_op(node, aten.mul) and node.args[0] is node.args[1] and isinstance(node.args[0], fx.Node):
        return node.args[0]
    if is_op(node, aten.pow) and node.args[1] == 2 and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _match(rsqrt: fx.Node):
    """From an rsqrt: (x, eps, out) of out = x * rsqrt(sum(x * x, -1, keepdim) + eps), else
    None, or a reason when it is a sum of squares over another axis."""
    add = rsqrt.args[0]
    if not is_op(add, aten.add) or not isinstance(add.args[1], (int, float)):
        return None
    total = add.args[0]
    if not is_op(total, aten.sum) or len(total.args) < 3 or total.args[2] is not True:
        return None
    if total.kwargs.get("dtype") is not None:
        return None
    x = _square_of(total.args[0])
    if x is None:
        return None
    rank = len(shape_of(x) or ())
    dims = total.args[1]
    if not isinstance(dims, (list, tuple)) or [d % rank for d in dims] != [rank - 1]:
        return "a sum of squares over another axis than the last"
    if len(rsqrt.users) != 1:
        return None
    out = next(iter(rsqrt.users))
    if not is_op(out, aten.mul) or set(out.args) != {x, rsqrt}:
        return None
    if shape_of(out) != shape_of(x):
        return None
    return x, float(add.args[1]), out


def l2_norm_to_layer_norm(gm: fx.GraphModule) -> PassResult:
    """Rewrite every L2 normalisation over the last axis into the exact layer_norm form."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.rsqrt) or node.graph is not g:
            continue
        m = _match(node)
        if not isinstance(m, tuple):
            if isinstance(m, str):
                mark_unlowered(node, _PASS, m)
            elif unlowered(node) and _PASS not in unlowered(node):
                # rms_norm_to_layer_norm said: not an RMSNorm; nor is it an L2 norm
                mark_unlowered(node, _PASS, _NEITHER)
            continue
        x, eps, out = m
        dim = shape_of(x)[-1]
        dtype = val(out).dtype
        scale = math.sqrt(dim)
        with g.inserting_before(out):
            z = emit(g, aten.mul.Tensor, (x, scale), like=out)
            neg = emit(g, aten.neg.default, (z,), like=out)
            both = emit(g, aten.cat.default, ([z, neg], -1), like=out)
            gamma = add_const(gm, torch.full((2 * dim,), 1.0 / scale, dtype=dtype), "l2_gamma", out)
            ln = emit(g, LAYER_NORM, (both, gamma, -1, eps), like=out)
            half = emit(g, aten.slice.Tensor, (ln, -1, 0, dim), like=out)
        half.meta["val"] = val(out)  # a later match in this sweep reads its shape
        out.replace_all_uses_with(half)
        modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


_NEITHER = (
    "neither an RMSNorm nor an L2 norm (x * rsqrt(sum(x * x, -1, keepdim) + eps)): left for "
    "the checker"
)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No rsqrt is left but those reported as unlowered: every L2 norm became layer_norm."""
    return [
        f"{n.name}: rsqrt left (an L2 norm the pass did not recognise?)"
        for n in gm.graph.nodes
        if is_op(n, aten.rsqrt) and not unlowered(n)
    ]


register_pass(_PASS, lambda: l2_norm_to_layer_norm, postcondition)
