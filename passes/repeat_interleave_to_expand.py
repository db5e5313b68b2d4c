"""repeat_interleave along one axis becomes reshape -> expand -> reshape (rank <= 4).

    before: k(Hk,S,D) -> repeat_interleave(n, dim=0) -> (Hk*n,S,D)
    after:  k -> reshape(Hk,1,S,D) -> expand(Hk,n,S,D) -> reshape(Hk*n,S,D)
The delta rule repeats each key head for the n = Hv / Hk value heads it serves (as GQA
repeats key/value heads; limit_rank). Each element is repeated n times in place: a new axis of
size n after the repeated one, broadcast, then merged into it. Axes before the repeated one
(and, if still needed, after it) are merged so the broadcast stays within rank 4. A repeat
count given as a tensor, or a repeat of the flattened input, is left and reported.
"""

from __future__ import annotations

import math

import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.core.rules import MAX_RANK
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

_PASS = "repeat_interleave_to_expand"


def _grouped(shape: tuple[int, ...], dim: int) -> tuple[list[int], int]:
    """SHAPE with a unit axis after DIM, axes merged so the result has rank <= MAX_RANK; and
    the position of the unit axis."""
    before, axis, after = list(shape[:dim]), shape[dim], list(shape[dim + 1 :])
    if len(before) + len(after) + 2 > MAX_RANK and before:
        before = [math.prod(before)]
    if len(before) + len(after) + 2 > MAX_RANK:
        after = [math.prod(after)]
    return [*before, axis, 1, *after], len(before) + 1


def repeat_interleave_to_expand(gm: fx.GraphModule) -> PassResult:
    """Rewrite repeat_interleave(x, n, dim) with an integer n into reshape/expand/reshape."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.repeat_interleave):
            continue
        args = dict(zip(("self", "repeats", "dim"), node.args, strict=False)) | node.kwargs
        x, n, dim = args.get("self"), args.get("repeats"), args.get("dim")
        shape = shape_of(x) if isinstance(x, fx.Node) else None
        if not isinstance(n, int) or dim is None or shape is None:
            mark_unlowered(node, _PASS, "a repeat count held in a tensor, or no axis")
            continue
        dim %= len(shape)
        grouped, unit = _grouped(shape, dim)
        wide = list(grouped)
        wide[unit] = n
        with g.inserting_before(node):
            r = emit(g, aten.reshape.default, (x, grouped), like=node)
            e = emit(g, aten.expand.default, (r, wide), like=node)
            out = emit(g, aten.reshape.default, (e, list(shape_of(node))), like=node)
        replace(node, out)
        modified = True
    if modified:
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No repeat_interleave is left, but those the pass reported."""
    return left_unreported(gm, aten.repeat_interleave)


register_pass(_PASS, lambda: repeat_interleave_to_expand, postcondition)
