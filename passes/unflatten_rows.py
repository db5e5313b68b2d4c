"""Row-wise work on tokens x heads flattened into rows runs on the unflattened tensor instead.

    before: o(1,S,H,dv) -> reshape(S*H, dv) ; z(1,S,H*dv) -> reshape(S*H, dv)
            n = layer_norm(cat([o2, -o2], 1), axis 1)[:, :dv] * silu(z2) -> reshape(1,S,H*dv)
    after:  o -> reshape(1,S,H,dv) ; z -> reshape(1,S,H,dv)
            n = layer_norm(cat([o4, -o4], -1), axis -1)[..., :dv] * silu(z4) -> reshape(1,S,H*dv)
Qwen3.5's gated norm (transformers) flattens (token, head) into rows of dv. On the
(B, C, 1, S) layout the tokens run along the last physical axis and the heads along the
channels, so rows (S*H) ordered token-major are a transpose the layout sweep must copy, and
copies back for out_proj. Every op between the flattening reshapes and the reshapes that end
the region works row by row (elementwise, or along the last axis: a norm, a slice, a concat),
so it computes the same on (1, S, H, dv): the flattening is dropped and the sweep carries the
layout through. A region with any other op (one mixing rows) is left as it is.
"""

from __future__ import annotations

import math

import torch.fx as fx

from anefx.core.ops import LAYER_NORM
from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    aten,
    const_value,
    is_op,
    recompile,
    shape_of,
    val,
)

_PASS = "unflatten_rows"
# ops applied to each row alone: elementwise ones (their other operands scalars, or constants
# broadcast along the row), and those along the last axis (their axis argument, by position)
_ELEMENTWISE = (
    aten.add,
    aten.sub,
    aten.mul,
    aten.div,
    aten.neg,
    aten.silu,
    aten.sigmoid,
    aten.exp,
    aten.tanh,
    aten.relu,
    aten.gelu,
    aten._to_copy,
)
_ALONG_AXIS = {aten.cat: 1, aten.slice: 1}  # the argument position of their axis


def _flatten_source(node: fx.Node) -> tuple[int, ...] | None:
    """For reshape(x, (N, D)) with x (.., D) or (.., H*D) merging at least two axes of more
    than one element (tokens and heads) into the N rows: the unflattened shape x's leading
    axes and D give, else None (a reshape that only drops unit axes mixes nothing)."""
    if not is_op(node, aten.reshape, aten.view):
        return None
    out, src = shape_of(node), shape_of(node.args[0])
    if out is None or src is None or len(out) != 2 or len(src) < 2:
        return None
    n, d = out
    if src[-1] == d and math.prod(src[:-1]) == n:
        shape = tuple(src)
    elif src[-1] % d == 0 and math.prod(src[:-1]) * (src[-1] // d) == n:
        shape = (*src[:-1], src[-1] // d, d)
    else:
        return None
    return shape if sum(s > 1 for s in shape[:-1]) >= 2 else None


def _row_op(node: fx.Node, width: int) -> bool:
    """NODE is an op that works row by row on a (WIDTH, D) value."""
    shape = shape_of(node)
    if shape is None or len(shape) != 2 or shape[0] != width:
        return False
    if is_op(node, *_ELEMENTWISE):
        return True
    if node.target is LAYER_NORM:
        return node.args[2] % 2 == 1
    for op, pos in _ALONG_AXIS.items():
        if is_op(node, op):
            return len(node.args) > pos and node.args[pos] % 2 == 1
    return False


def _row_constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A constant every row reads alike: a scalar, (D,) or (1, D)."""
    t = const_value(gm, node)
    return t is not None and (t.dim() <= 1 or t.dim() == 2 and t.shape[0] == 1)


def _region(gm: fx.GraphModule, start: fx.Node, width: int):
    """(entries, members, exits) of the row-wise region START opens, or None: every reader of
    a value of the region works row by row or reshapes the result out of it, and every operand
    of it is a flattened input, a value of the region or a constant alike for every row.
    The region grows both ways: the readers of its values, and the operands of its ops (the
    gate of a gated norm comes from another flattened input through its own row-wise op)."""
    entries, members, exits = {start}, set(), set()
    todo = [start]
    while todo:
        node = todo.pop()
        for u in node.users:
            if u in members or u in exits:
                continue
            if is_op(u, aten.reshape, aten.view) and _flatten_source(u) is None:
                exits.add(u)  # the region's result, reshaped to what the model wants
                continue
            if not _row_op(u, width):
                return None
            members.add(u)
            todo.append(u)
        for a in node.all_input_nodes if node in members else ():
            if a in entries or a in members or _row_constant(gm, a):
                continue
            if _flatten_source(a) is not None and shape_of(a)[0] == width:
                entries.add(a)  # another flattened input
            elif _row_op(a, width):
                members.add(a)  # an operand computed row by row from the region's inputs
            else:
                return None  # a value from outside, not alike for every row
            todo.append(a)
    return entries, members, exits


def _plan(gm: fx.GraphModule, node: fx.Node):
    """(entries, members, exits, lead) of the region the flattening NODE opens, or None: a
    region with ops and a result, whose flattened inputs all hold the same rows (spelled maybe
    with other unit axes: (1,S,H*D) with H = 1 gives (1,S))."""
    if _flatten_source(node) is None:
        return None
    found = _region(gm, node, shape_of(node)[0])
    if found is None or not found[1] or not found[2]:
        return None
    leads = {_flatten_source(e)[:-1] for e in found[0]}
    if len({tuple(d for d in x if d != 1) for x in leads}) != 1:
        return None
    return (*found, max(leads, key=len))


def unflatten_rows(gm: fx.GraphModule) -> PassResult:
    """Drop the (tokens x heads) -> rows flattening around row-wise regions."""
    g = gm.graph
    modified = False
    done: set[fx.Node] = set()
    for node in list(g.nodes):
        if node in done:
            continue
        plan = _plan(gm, node)
        if plan is None:
            continue
        entries, members, exits, lead = plan
        done |= entries
        for e in entries:  # the rows, unflattened: (.., H, D) instead of (.. * H, D)
            e.args = (e.args[0], [*lead, shape_of(e)[1]])
        for m in members:  # along the last axis of any rank (was axis 1 of 2)
            if m.target is LAYER_NORM:
                m.update_arg(2, -1)
            else:
                for op, pos in _ALONG_AXIS.items():
                    if is_op(m, op):
                        m.update_arg(pos, -1)
        modified = True
    if modified:
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No row-wise region is still entered through a (tokens x heads) flattening."""
    return [
        f"{n.name}: rows flattened for row-wise ops"
        for n in gm.graph.nodes
        if val(n) is not None and _plan(gm, n) is not None
    ]


register_pass(_PASS, lambda: unflatten_rows, postcondition)
