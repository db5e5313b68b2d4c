"""Split a conv wider than the ANE limit (the LM head) into slices that fit.

    before: x(1,C,1,S) -> conv(W(V,C,1,1)) (1,V,1,S) -> permute -> view -> logits(1,S,V)
    after:  x -> conv(W[0:w]) (1,w,1,S), conv(W[w:2w]), ..., conv(W[(k-1)w:V])
            graph outputs: the k slices, channels-first; k = ceil(V / limit) from the rule table
A wide conv that does not feed the output is split the same way and concatenated on channels.
Tied heads slice the embedding's storage (views), so no weight is copied in memory.
"""

from __future__ import annotations

import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.core.rules import MAX_CONV_OUT_CHANNELS, lm_head_slice_width
from anefx.core.signature import Output, Role, has_signature, set_signature, signature_of
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


def _to_output(conv: fx.Node) -> fx.Node | None:
    """The node that hands CONV to the graph output through layout-only nodes (else None)."""
    node = conv
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        (user,) = users
        if user.op == "output":
            return node
        if not is_op(user, aten.permute, aten.reshape, aten.transpose):
            return None
        node = user


def split_lm_head(gm: fx.GraphModule) -> PassResult:
    """Split every conv with more output channels than MAX_CONV_OUT_CHANNELS."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.conv2d):
            continue
        w = const_value(gm, node.args[1])
        if w is None or w.shape[0] <= MAX_CONV_OUT_CHANNELS:
            continue
        width = w.shape[0]
        step = lm_head_slice_width(width)
        bias = node.args[2] if len(node.args) > 2 else None
        bt = const_value(gm, bias) if bias is not None else None
        parts = []
        with g.inserting_before(node):
            for start in range(0, width, step):
                end = min(start + step, width)
                ws = add_const(gm, w[start:end], f"{node.args[1].target}_{start}", like=node)
                bs = add_const(gm, bt[start:end], "bias", like=node) if bt is not None else None
                parts.append(
                    (start, end, emit(g, aten.conv2d.default, (node.args[0], ws, bs), like=node))
                )
        tail = _to_output(node)
        if tail is not None:
            out = g.output_node()
            values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
            # the slices replace the logits; other outputs (KV-cache states) follow unchanged
            rest = tuple(v for v in values if v is not tail)
            g.erase_node(out)
            g.output(tuple(p for _, _, p in parts) + rest)
            if has_signature(gm):
                _record_slices(
                    gm, values.index(tail), shape_of(node), [(a, b) for a, b, _ in parts]
                )
        else:
            with g.inserting_after(parts[-1][2]):
                cat = emit(g, aten.cat.default, ([p for _, _, p in parts], 1), like=node)
            node.replace_all_uses_with(cat)
        modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


def _record_slices(
    gm: fx.GraphModule, index: int, shape: tuple[int, ...], ranges: list[tuple[int, int]]
) -> None:
    """The signature's output INDEX (the logits) becomes the slices, in the graph's order."""
    sig = signature_of(gm)
    logits = sig.outputs[index]
    first = logits.vocab[0] if logits.vocab else 0
    slices = tuple(
        Output(
            f"logits_{i}",
            Role.LOGITS,
            (shape[0], b - a, shape[2], shape[3]),
            logits.dtype,
            ("B", "V", "1", "S"),
            vocab=(first + a, first + b),
            description=f"logits for vocabulary ids {first + a}..{first + b - 1}, "
            f"(1, {b - a}, 1, S)",
        )
        for i, (a, b) in enumerate(ranges)
    )
    rest = tuple(o for i, o in enumerate(sig.outputs) if i != index)
    set_signature(gm, sig.replace(outputs=slices + rest))


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No conv has more than MAX_CONV_OUT_CHANNELS output channels."""
    out = []
    for n in gm.graph.nodes:
        s = shape_of(n)
        if is_op(n, aten.conv2d) and s and s[1] > MAX_CONV_OUT_CHANNELS:
            out.append(
                f"{n.name}: conv with {s[1]} output channels (limit {MAX_CONV_OUT_CHANNELS})"
            )
    return out


register_pass("split_lm_head", lambda: split_lm_head, postcondition)
