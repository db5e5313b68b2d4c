"""A constant padding becomes a concatenation with constant blocks (the emitter has cat).

    before: y = pad(x(1,C,L), [left, right], value=v)                      (1,C,left+L+right)
    after:  y = cat([full(1,C,left, v), x, full(1,C,right, v)], dim=-1)
Pairs of the pad list apply to the last axis first, as torch's pad reads them; each padded axis
is one concatenation. Qwen4-Exp's PLE layers pad their conv input on the left this way. A
reflect / replicate / circular pad, or a negative (cropping) width, is left and reported.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    add_const,
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

_PASS = "pad_to_cat"


def _constant_pad(node: fx.Node) -> tuple | None:
    """(x, widths per pair, value) of a constant pad, else None."""
    if node.target is aten.constant_pad_nd.default:
        x, pads = node.args[0], list(node.args[1])
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    elif node.target is aten.pad.default:
        x, pads = node.args[0], list(node.args[1])
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if mode != "constant":
            return None
    else:
        return None
    if shape_of(x) is None or len(pads) % 2 or any(not isinstance(p, int) or p < 0 for p in pads):
        return None
    return x, pads, 0.0 if value is None else value


def pad_to_cat(gm: fx.GraphModule) -> PassResult:
    """Rewrite each constant pad into concatenations with constant blocks."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if not is_op(node, aten.pad, aten.constant_pad_nd):
            continue
        found = _constant_pad(node)
        if found is None:
            mark_unlowered(node, _PASS, "a pad that is not constant, or crops")
            continue
        x, pads, value = found
        dtype = val(x).dtype
        out, shape = x, list(shape_of(x))
        with g.inserting_before(node):
            for pair in range(len(pads) // 2):
                axis = len(shape) - 1 - pair
                before, after = pads[2 * pair], pads[2 * pair + 1]
                parts = [out]
                for side, width in ((0, before), (1, after)):
                    if width:
                        block = list(shape)
                        block[axis] = width
                        fill = torch.full(block, value, dtype=dtype)
                        const = add_const(gm, fill, "pad_value", like=node)
                        parts.insert(0 if side == 0 else len(parts), const)
                if len(parts) > 1:
                    out = emit(g, aten.cat.default, (parts, axis), like=node)
                    shape[axis] += before + after
                    out.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        replace(node, out)
        modified = True
    if modified:
        recompile(gm)
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No pad is left, but those the pass reported."""
    return left_unreported(gm, aten.pad, aten.constant_pad_nd)


register_pass(_PASS, lambda: pad_to_cat, postcondition)
