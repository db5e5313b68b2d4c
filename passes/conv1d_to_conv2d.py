"""A 1-D convolution (the causal depthwise conv of a linear-attention layer) becomes a conv2d
on the (B, C, 1, L) layout, computing only the output columns the graph reads.

    stateless prefill (transformers' causal_conv1d_fn; K the kernel, p = K - 1):
    before: y = conv1d(x(1,C,S), w(C,1,K), padding=p, groups=C) (1,C,S+K-1) -> slice(-1, 0, S)
    after:  y = reshape(conv2d(cat([zeros(1,C,1,K-1), reshape(x,(1,C,1,S))], -1),
                               w(C,1,1,K), groups=C), (1,C,S))
    prefill after a state (x = cat[state(1,C,K-1), new(1,C,S)], length L = K-1+S):
    before: conv1d(x, padding=p) (1,C,L+K-1) -> slice(-1, 0, L) -> silu -> slice(-1, -S)
    after:  silu(reshape(conv2d(reshape(x,(1,C,1,L)), w(C,1,1,K), groups=C), (1,C,S)))
    decode (causal_conv1d_update: x = cat[state, new], length K, no padding):
    before: conv1d(x, padding=0) (1,C,1) -> slice(-1, -1)
    after:  reshape(conv2d(reshape(x,(1,C,1,K)), w(C,1,1,K), groups=C), (1,C,1))
Output column t of a conv with padding p reads input columns t-p .. t-p+K-1. The columns the
graph reads (the union of the slices of the output, through chains of slices and the
elementwise ops between them, as the SiLU transformers applies between its two) fix which input
columns are needed: those outside the input are zeros, concatenated as a constant (only a
causal left padding of the stateless prefill needs them), so the conv itself has no padding
(Core ML's conv pads both sides alike). A stride or dilation other than 1 is left, reported.
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
    mark_unlowered,
    recompile,
    shape_of,
    unlowered,
    val,
)

_PASS = "conv1d_to_conv2d"


def _ints(value, default: int) -> list[int]:
    if value is None:
        return [default]
    return [value] if isinstance(value, int) else list(value)


def _params(node: fx.Node) -> dict | None:
    """conv1d / convolution arguments by name (None: a form not handled, e.g. padding='same')."""
    if is_op(node, aten.conv1d) and node.target is aten.conv1d.default:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    elif node.target is aten.convolution.default:
        names = (
            "input",
            "weight",
            "bias",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
        )
    else:
        return None
    p = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if len(shape_of(p["input"]) or ()) != 3:
        return None
    return p


def _why_not(gm: fx.GraphModule, p: dict) -> str | None:
    if p.get("transposed", False):
        return "a transposed convolution"
    if _ints(p.get("stride"), 1) != [1] or _ints(p.get("dilation"), 1) != [1]:
        return "a stride or dilation other than 1"
    if len(_ints(p.get("padding"), 0)) != 1:
        return "padding given per side"
    if any(_ints(p.get("output_padding"), 0)):
        return "an output padding"
    if const_value(gm, p["weight"]) is None:
        return "a weight computed in the graph"
    bias = p.get("bias")
    if bias is not None and const_value(gm, bias) is None:
        return "a bias computed in the graph"
    return None


def _slice_range(node: fx.Node, size: int) -> tuple[int, int] | None:
    """[start, end) of a step-1 slice along the last axis of a rank-3 tensor, else None."""
    if not is_op(node, aten.slice) or node.args[1] % 3 != 2:
        return None
    if (node.args[4] if len(node.args) > 4 else 1) != 1:
        return None
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    return (start, end) if end > start else None


# elementwise ops of one tensor: they commute with a slice, so the columns read through them
# are the columns read of their input (transformers applies the SiLU between its two slices)
_UNARY = (
    aten.silu,
    aten.sigmoid,
    aten.relu,
    aten.gelu,
    aten.tanh,
    aten.exp,
    aten.neg,
    aten._to_copy,
    aten.mul,
    aten.add,
    aten.sub,
    aten.div,
)


def _unary_of(u: fx.Node, node: fx.Node) -> bool:
    """U applies an elementwise op to NODE alone (scalars beside it), keeping its shape."""
    if not is_op(u, *_UNARY) or u.args[0] is not node or shape_of(u) != shape_of(node):
        return False
    others = [*u.args[1:], *u.kwargs.values()]
    return not any(isinstance(a, fx.Node) for a in others)


def _reads(node: fx.Node, offset: int, size: int, chain: list, out: list) -> bool:
    """Collect (reader, start, end, chain): READER's value is CHAIN (elementwise ops) applied
    to the output columns [start, end), following slices of slices and elementwise ops whose
    readers slice again. False when something reads NODE whole in another way."""
    for u in node.users:
        r = _slice_range(u, size)
        if r is not None:
            a, b = r
            inner: list = []
            if u.users and _reads(u, offset + a, b - a, chain, inner):
                out.extend(inner)  # every reader of this slice slices it again: look through
            else:
                out.append((u, offset + a, offset + b, chain))
        elif _unary_of(u, node):
            inner = []
            if u.users and _reads(u, offset, size, [*chain, u], inner):
                out.extend(inner)
            else:
                out.append((u, offset, offset + size, [*chain, u]))
        else:
            return False
    return True


def conv1d_to_conv2d(gm: fx.GraphModule) -> PassResult:
    """Rewrite each rank-3 conv1d into a conv2d computing the columns the graph reads."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.conv1d, aten.convolution):
            continue
        p = _params(node)
        if p is None:
            if is_op(node, aten.conv1d):
                mark_unlowered(node, _PASS, "a conv1d form not handled (padding='same'/'valid')")
            continue
        why = _why_not(gm, p)
        if why is not None:
            mark_unlowered(node, _PASS, why)
            continue
        x = p["input"]
        batch, _, length = shape_of(x)
        w = const_value(gm, p["weight"])
        cout, _, k = w.shape
        pad = _ints(p.get("padding"), 0)[0]
        n_out = shape_of(node)[-1]
        reads: list = []
        if not node.users or not _reads(node, 0, n_out, [], reads):
            reads = [(node, 0, n_out, [])]
        lo, hi = min(r[1] for r in reads), max(r[2] for r in reads)
        a, b = lo - pad, hi - pad + k - 1  # the input columns [a, b) they need
        dtype = val(x).dtype
        with g.inserting_before(node):
            x4 = emit(g, aten.reshape.default, (x, [batch, shape_of(x)[1], 1, length]), like=node)
            if (max(a, 0), min(b, length)) != (0, length):
                x4 = emit(g, aten.slice.Tensor, (x4, 3, max(a, 0), min(b, length)), like=node)
            parts = [x4]
            for side, width in ((0, -a), (1, b - length)):
                if width > 0:  # columns outside the input: the zeros of the padding
                    zeros = torch.zeros(
                        (batch, shape_of(x)[1], 1, width), dtype=dtype, device=w.device
                    )
                    zero = add_const(gm, zeros, "conv_padding", like=node)
                    parts.insert(0 if side == 0 else len(parts), zero)
            if len(parts) > 1:
                x4 = emit(g, aten.cat.default, (parts, 3), like=node)
            w4 = add_const(gm, w.reshape(cout, w.shape[1], 1, k), f"{node.name}_weight", node)
            bias = p.get("bias")
            groups = p.get("groups", 1)
            conv = emit(
                g,
                aten.conv2d.default,
                (x4, w4, bias, [1, 1], [0, 0], [1, 1], groups),
                like=node,
            )
            y = emit(g, aten.reshape.default, (conv, [batch, cout, hi - lo]), like=node)
            # a conv later in this sweep may read it (through slices): it needs its shape
            y.meta["val"] = torch.empty((batch, cout, hi - lo), dtype=dtype, device="meta")
        for reader, start, end, chain in reads:
            part = y
            with g.inserting_before(reader):  # after y: reader is downstream of the conv
                if (start, end) != (lo, hi):
                    part = emit(g, aten.slice.Tensor, (y, 2, start - lo, end - lo), like=reader)
                # the elementwise ops on the way, now on the columns read only
                for op in chain:
                    part = emit(g, op.target, (part, *op.args[1:]), dict(op.kwargs), like=op)
            part.meta["val"] = val(reader)
            reader.replace_all_uses_with(part)
        modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No conv1d (or rank-3 convolution) is left, but those the pass reported."""
    return [
        f"{n.name}: {n.target} left"
        for n in gm.graph.nodes
        if (is_op(n, aten.conv1d) or is_op(n, aten.convolution) and len(shape_of(n) or ()) == 3)
        and not unlowered(n)
    ]


register_pass(_PASS, lambda: conv1d_to_conv2d, postcondition)
