"""Splits, chunks, unbinds and integer indexing become slices (and reshapes).

    before: parts = split_with_sizes(x(1,S,2K+V), [K, K, V], -1) ; q = getitem(parts, 0) ...
            h = select(x(1,S,H,D), 0, 0) (S,H,D) ; u_i = select(u(H,N,C,D), 1, i) (H,C,D)
    after:  q = slice(x, -1, 0, K) (1,S,K) ; k = slice(x, -1, K, 2K) ; v = slice(x, -1, 2K, 2K+V)
            h = reshape(x, (S,H,D)) ; u_i = reshape(slice(u, 1, i, i+1), (H,C,D))
The emitter writes one op per tensor result; a split gives a tuple that only getitem reads.
Slices and reshapes are what the layout sweep carries in the (B, C, 1, S) layout; an index on
an axis of size 1 is a reshape alone. A split read by anything but getitem is left, reported.
"""

from __future__ import annotations

import operator

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
    shape_of,
    val,
)

_PASS = "split_to_slices"
_SPLITS = (aten.split, aten.split_with_sizes, aten.unbind, aten.chunk)


def _split_dim(node: fx.Node) -> int:
    """The axis a split cuts (unbind names it first, the others after their sizes)."""
    pos = 1 if is_op(node, aten.unbind) else 2
    dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", 0)
    return dim % len(shape_of(node.args[0]))


def _bounds(node: fx.Node) -> list[tuple[int, int]] | None:
    """The [start, end) of each part of a split along its axis (None: not a known split)."""
    shape = shape_of(node.args[0])
    parts = val(node)
    if shape is None or not isinstance(parts, (list, tuple)):
        return None
    dim = _split_dim(node)
    if is_op(node, aten.unbind):
        return [(i, i + 1) for i in range(shape[dim])]
    out, start = [], 0
    for p in parts:  # the parts' own sizes: the split's sizes resolved (chunk, a short last)
        out.append((start, start + int(p.shape[dim])))
        start += int(p.shape[dim])
    return out if start == shape[dim] else None


def _slice(g: fx.Graph, x: fx.Node, dim: int, start: int, end: int, like: fx.Node) -> fx.Node:
    """x[start:end] along DIM; the input itself when that is all of it. The new node carries
    its (meta) value: a later split or index in the same sweep reads its shape."""
    if (start, end) == (0, shape_of(x)[dim]):
        return x
    node = emit(g, aten.slice.Tensor, (x, dim, start, end), like=like)
    node.meta["val"] = aten.slice.Tensor(val(x), dim, start, end)
    return node


def _reshape(g: fx.Graph, x: fx.Node, like: fx.Node) -> fx.Node:
    """X reshaped to LIKE's shape, carrying LIKE's (meta) value."""
    node = emit(g, aten.reshape.default, (x, list(shape_of(like))), like=like)
    node.meta["val"] = val(like)
    return node


def split_to_slices(gm: fx.GraphModule) -> PassResult:
    """Rewrite splits (read through getitem) into slices, integer indexing into slice+reshape."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if is_op(node, *_SPLITS):
            bounds = _bounds(node)
            readers = list(node.users)
            if bounds is None or not all(
                u.target is operator.getitem and isinstance(u.args[1], int) for u in readers
            ):
                mark_unlowered(node, _PASS, "a split read by something else than getitem")
                continue
            x, dim = node.args[0], _split_dim(node)
            drop = is_op(node, aten.unbind)  # unbind's parts lose the axis
            for item in readers:
                start, end = bounds[item.args[1]]
                with g.inserting_before(item):
                    part = _slice(g, x, dim, start, end, like=item)
                    if drop:
                        part = _reshape(g, part, item)
                item.replace_all_uses_with(part)
                g.erase_node(item)
            g.erase_node(node)
            modified = True
        elif is_op(node, aten.select) and isinstance(node.args[2], int):
            x = node.args[0]
            shape = shape_of(x)
            dim = node.args[1] % len(shape)
            index = node.args[2] % shape[dim]
            with g.inserting_before(node):
                part = _slice(g, x, dim, index, index + 1, like=node)
                flat = _reshape(g, part, node)
            node.replace_all_uses_with(flat)
            g.erase_node(node)
            modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No split, chunk, unbind or integer select is left, but those the pass reported."""
    return left_unreported(gm, *_SPLITS, aten.select)


register_pass(_PASS, lambda: split_to_slices, postcondition)
