"""A tensor repeated whole along axes (torch's Tensor.repeat) becomes a concatenation of copies.

    before: y = repeat(x(B,S,H), [1, 1, hc])                 (B,S,hc*H)
    after:  y = cat([x, x, ..., x] (hc times), dim=-1)       (B,S,hc*H)
Qwen4-Exp starts its hc residual streams as copies of the embedding this way. Each axis with a
count above 1 becomes one concatenation of that many copies (axes in turn); the emitter has
cat, not tile. A repeat adding leading axes, or whose counts are not integers, is left and
reported.
"""

from __future__ import annotations

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

_PASS = "repeat_to_cat"
# a count above this stays a repeat: a concatenation of thousands of inputs is no lowering
MAX_COPIES = 64


def repeat_to_cat(gm: fx.GraphModule) -> PassResult:
    """Rewrite repeat(x, counts) into one cat of copies per repeated axis."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.repeat):
            continue
        x, counts = node.args[0], list(node.args[1])
        shape = shape_of(x) if isinstance(x, fx.Node) else None
        if (
            shape is None
            or len(counts) != len(shape)
            or not all(isinstance(c, int) and 1 <= c <= MAX_COPIES for c in counts)
        ):
            mark_unlowered(node, _PASS, "a repeat adding axes, or counts not small integers")
            continue
        out = x
        with g.inserting_before(node):
            for axis, count in enumerate(counts):
                if count > 1:
                    out = emit(g, aten.cat.default, ([out] * count, axis), like=node)
        replace(node, out)
        modified = True
    if modified:
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No repeat is left, but those the pass reported."""
    return left_unreported(gm, aten.repeat)


register_pass(_PASS, lambda: repeat_to_cat, postcondition)
