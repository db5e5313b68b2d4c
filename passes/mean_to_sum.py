"""A mean over axes becomes a sum over them times 1/n (the emitter has sum, not mean).

    before: y = mean(x(B,S,hc,H), dim=[-2], keepdim=False)            (B,S,H)
    after:  y = mul(sum(x, dim=[-2], keepdim=False), 1 / hc)           (B,S,H)
The mean a norm computes (mean of squares) is consumed earlier by the norm rewrites
(rms_norm_to_layer_norm, l2_norm_to_layer_norm); what is left is a plain average, as Qwen4-Exp's
hyper-connections take over their residual streams. n is the product of the reduced axes,
static; the result has the mean's dtype. A mean without axes, or with a dtype argument, is left
and reported.
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
)

_PASS = "mean_to_sum"


def mean_to_sum(gm: fx.GraphModule) -> PassResult:
    """Rewrite mean.dim(x, dims, keepdim) as sum.dim_IntList(x, dims, keepdim) * (1 / n)."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.mean):
            continue
        args = dict(zip(("self", "dim", "keepdim"), node.args, strict=False)) | node.kwargs
        x, dims, keep = args.get("self"), args.get("dim"), args.get("keepdim", False)
        shape = shape_of(x) if isinstance(x, fx.Node) else None
        if node.target is not aten.mean.dim or not dims or shape is None or "dtype" in args:
            mark_unlowered(node, _PASS, "a mean over every axis, or with a dtype")
            continue
        n = math.prod(shape[d % len(shape)] for d in dims)
        with g.inserting_before(node):
            total = emit(g, aten.sum.dim_IntList, (x, list(dims), keep), like=node)
            out = emit(g, aten.mul.Tensor, (total, 1.0 / n), like=node)
        total.meta["val"] = node.meta.get("val")
        replace(node, out)
        modified = True
    if modified:
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No mean is left, but those the pass reported."""
    return left_unreported(gm, aten.mean)


register_pass(_PASS, lambda: mean_to_sum, postcondition)
