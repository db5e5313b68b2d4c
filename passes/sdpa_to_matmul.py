"""scaled_dot_product_attention becomes the matmuls and softmax it stands for.

    before: o(1,H,S,Dv) = scaled_dot_product_attention(q(1,H,S,D), k(1,H,T,D), v(1,H,T,Dv),
                                                        mask(1,1,S,T), scale=s)
    after:  w = matmul(q, transpose(k, -2, -1)) * s + mask (1,H,S,T)
            o = matmul(softmax(w, -1), v)
A model built with transformers' default attention ("sdpa") is captured with this one op; its
math is what eager attention writes, and in that spelling limit_rank folds the GQA repeat of k
and v into matmul broadcasting. Dropout, a causal flag, a boolean mask and enable_gqa are not
rewritten here: the op is left, and reported.
"""

from __future__ import annotations

import math

import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    aten,
    emit,
    is_op,
    left_unreported,
    mark_unlowered,
    recompile,
    replace,
    shape_of,
    val,
)

_PASS = "sdpa_to_matmul"
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _arguments(node: fx.Node) -> dict:
    params = dict(zip(_NAMES, node.args, strict=False))
    params.update(node.kwargs)
    return params


def _why_not(p: dict) -> str | None:
    """Why the call is not rewritten here, or None."""
    if p.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    if p.get("is_causal", False):
        return "a causal flag instead of a mask input (the mask would be built in the graph)"
    if p.get("enable_gqa", False):
        return "enable_gqa (key/value heads repeated inside the op)"
    mask = p.get("attn_mask")
    if mask is not None and not (isinstance(mask, fx.Node) and val(mask).is_floating_point()):
        return "a boolean mask"
    if len(shape_of(p["query"]) or ()) < 2:
        return "a query without (sequence, feature) axes"
    return None


def sdpa_to_matmul(gm: fx.GraphModule) -> PassResult:
    """Rewrite every scaled_dot_product_attention it can into matmul, scale, mask, softmax."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.scaled_dot_product_attention):
            continue
        p = _arguments(node)
        why = _why_not(p)
        if why is not None:
            mark_unlowered(node, _PASS, why)
            continue
        q, k, v, mask = p["query"], p["key"], p["value"], p.get("attn_mask")
        scale = p.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(shape_of(q)[-1])
        with g.inserting_before(node):
            kt = emit(g, aten.transpose.int, (k, -2, -1), like=node)
            w = emit(g, aten.matmul.default, (q, kt), like=node)
            w = emit(g, aten.mul.Tensor, (w, float(scale)), like=node)
            if mask is not None:
                w = emit(g, aten.add.Tensor, (w, mask), like=node)
            probs = emit(g, aten._softmax.default, (w, -1, False), like=node)
            out = emit(g, aten.matmul.default, (probs, v), like=node)
        replace(node, out)
        modified = True
    if modified:
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No scaled_dot_product_attention is left, but those the pass reported."""
    return left_unreported(gm, aten.scaled_dot_product_attention)


register_pass(_PASS, lambda: sdpa_to_matmul, postcondition)
