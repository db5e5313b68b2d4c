"""A dilated depthwise 1-D convolution becomes its K taps: shifted slices times per-channel
weights, summed (the ANE runs no dilated conv: ane-facts.md, "Ops that leave the ANE").

    before: y = conv1d(x(1,C,L), w(C,1,K), padding=p, dilation=D, groups=C)   (1,C,L')
    after:  xp = cat([zeros(1,C,p), x, zeros(1,C,p)], -1)                      (1,C,L+2p)
            y  = sum_k  slice(xp, -1, k D, k D + L') * w[:, 0, k](C,1)          (1,C,L')
L' = L + 2p - D (K - 1). Each output column t reads input columns t + k D - p, exactly what the
convolution reads: the same products, summed in tap order. Qwen4-Exp's PLE layers run one over
their hc x hidden stream channels (dilation = ngram_size). A conv that is not depthwise, has a
stride, a bias or a weight computed in the graph is left (conv1d_to_conv2d then reports it).
Runs before conv1d_to_conv2d.
"""

from __future__ import annotations

import torch
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
    replace,
    shape_of,
    val,
)

_PASS = "dilated_conv_to_taps"


def _ints(value, default: int) -> list[int]:
    if value is None:
        return [default]
    return [value] if isinstance(value, int) else list(value)


def _depthwise_dilated(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(x, weight (C, 1, K), padding, dilation) of a dilated depthwise conv1d, else None."""
    if node.target is not aten.conv1d.default:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    p = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    x, shape = p["input"], shape_of(p["input"])
    w = const_value(gm, p["weight"])
    dilation = _ints(p.get("dilation"), 1)
    padding = p.get("padding", 0)
    if shape is None or len(shape) != 3 or w is None or w.dim() != 3 or isinstance(padding, str):
        return None
    if dilation == [1] or len(dilation) != 1 or _ints(p.get("stride"), 1) != [1]:
        return None
    if p.get("bias") is not None or p.get("groups", 1) != shape[1] or w.shape[:2] != (shape[1], 1):
        return None
    pad = _ints(padding, 0)
    if len(pad) != 1:
        return None
    return x, w, pad[0], dilation[0]


def dilated_conv_to_taps(gm: fx.GraphModule) -> PassResult:
    """Rewrite each dilated depthwise conv1d into a sum of weighted shifted slices."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        found = _depthwise_dilated(gm, node) if is_op(node, aten.conv1d) else None
        if found is None:
            continue
        x, w, pad, dil = found
        batch, channels, length = shape_of(x)
        taps = w.shape[-1]
        out_len = shape_of(node)[-1]
        dtype = val(x).dtype
        with g.inserting_before(node):
            xp = x
            if pad:
                zeros = add_const(
                    gm, torch.zeros(batch, channels, pad, dtype=dtype), "conv_padding", like=node
                )
                xp = emit(g, aten.cat.default, ([zeros, x, zeros], 2), like=node)
            total = None
            for k in range(taps):
                part = emit(g, aten.slice.Tensor, (xp, 2, k * dil, k * dil + out_len), like=node)
                weight = add_const(
                    gm, w[:, 0, k : k + 1].to(dtype).contiguous(), f"{node.name}_tap{k}", like=node
                )
                term = emit(g, aten.mul.Tensor, (part, weight), like=node)
                total = (
                    term if total is None else emit(g, aten.add.Tensor, (total, term), like=node)
                )
        replace(node, total)
        modified = True
    if modified:
        g.eliminate_dead_code()  # the conv's weight, now read as taps
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No dilated depthwise conv1d with a constant weight is left."""
    return [
        f"{n.name}: a dilated depthwise conv1d left"
        for n in gm.graph.nodes
        if is_op(n, aten.conv1d) and _depthwise_dilated(gm, n) is not None
    ]


register_pass(_PASS, lambda: dilated_conv_to_taps, postcondition)
