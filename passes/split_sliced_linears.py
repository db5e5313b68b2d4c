"""A dense layer read only in slices of its output channels becomes one dense layer per slice.

    before: y(1,S,2*H*D) = linear(x(1,S,C), W(2*H*D,C)) -> reshape(1,S,H,2D)
            q = slice(., -1, 0, D) (1,S,H,D) ; gate = slice(., -1, D, 2D) (1,S,H,D)
    after:  q = reshape(linear(x, W[rows h*2D + [0, D)]), (1,S,H,D))
            gate = reshape(linear(x, W[rows h*2D + [D, 2D)]), (1,S,H,D))
Qwen3.5's gated attention projects each head's [query | gate] with one q_proj and splits the
activations per head; the split on the head axis would be a strided gather of channels on the
ANE. Splitting the weight rows instead gives two linears (two 1x1 convs after
linear_to_conv2d) whose outputs need no slicing. The slices must not overlap (no weight is
stored twice); a linear read in any other way stays as it is.
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
    shape_of,
)

_PASS = "split_sliced_linears"


def _last_axis_slice(node: fx.Node) -> tuple[int, int] | None:
    """[start, end) of a step-1 slice along the last axis, else None."""
    if not is_op(node, aten.slice):
        return None
    shape = shape_of(node.args[0])
    if shape is None or node.args[1] % len(shape) != len(shape) - 1:
        return None
    if (node.args[4] if len(node.args) > 4 else 1) != 1:
        return None
    size = shape[-1]
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    return (start, end) if end > start else None


def _match(gm: fx.GraphModule, lin: fx.Node):
    """(base, heads, per_head, {range: [slice nodes]}) of a linear read only in slices."""
    w = const_value(gm, lin.args[1])
    ys = shape_of(lin)
    if w is None or ys is None or w.dim() != 2 or not lin.users:
        return None
    base, heads, per = lin, 1, ys[-1]
    users = list(lin.users)
    if len(users) == 1 and is_op(users[0], aten.reshape, aten.view):
        rs = shape_of(users[0])
        # the output channels split into (heads, per head): the head-major order of transformers
        if rs is not None and len(rs) == len(ys) + 1 and rs[:-2] == ys[:-1]:
            base, heads, per = users[0], rs[-2], rs[-1]
    ranges: dict[tuple[int, int], list[fx.Node]] = {}
    for u in base.users:
        r = _last_axis_slice(u)
        if r is None:
            return None
        ranges.setdefault(r, []).append(u)
    spans = sorted(ranges)
    if spans == [(0, per)]:
        return None  # read whole: nothing to split
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        return None  # overlapping slices would store rows twice
    return base, heads, per, ranges


def split_sliced_linears(gm: fx.GraphModule) -> PassResult:
    """Split each linear read only in disjoint slices into one linear per slice."""
    g = gm.graph
    modified = False
    for lin in list(g.nodes):
        if not is_op(lin, aten.linear):
            continue
        m = _match(gm, lin)
        if m is None:
            continue
        base, heads, per, ranges = m
        x, w_node = lin.args[0], lin.args[1]
        w = const_value(gm, w_node)
        b_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        b = const_value(gm, b_node) if b_node is not None else None
        if b_node is not None and b is None:
            continue  # a bias computed in the graph: not split here
        lead = list(shape_of(base)[:-1])
        order = {n: i for i, n in enumerate(g.nodes)}
        first = min(base.users, key=order.__getitem__)  # every new node before every reader
        for (start, end), readers in ranges.items():
            rows = torch.tensor(
                [h * per + j for h in range(heads) for j in range(start, end)],
                device=w.device,
            )
            with g.inserting_before(first):
                wn = add_const(gm, w.index_select(0, rows), f"{w_node.target}_{start}_{end}", lin)
                bn = None
                if b is not None:
                    bn = add_const(gm, b.index_select(0, rows), f"{b_node.target}_{start}", lin)
                part = emit(g, aten.linear.default, (x, wn, bn), like=lin)
                if base is not lin:
                    part = emit(g, aten.reshape.default, (part, [*lead, end - start]), like=base)
            part.meta["val"] = readers[0].meta.get("val")
            for r in readers:
                r.replace_all_uses_with(part)
        modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No linear with a constant weight is read only through disjoint slices of its output."""
    return [
        f"{n.name}: linear read only in slices"
        for n in gm.graph.nodes
        if is_op(n, aten.linear) and _match(gm, n) is not None
    ]


register_pass(_PASS, lambda: split_sliced_linears, postcondition)
