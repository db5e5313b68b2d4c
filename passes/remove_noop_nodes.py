"""Clean-up: remove aliases, shape asserts, no-op conversions, duplicates and dead code.

    before: x(1,S,C) -> _assert_tensor_metadata ; alias(x) -> clone -> _to_copy(fp32->fp32)
            -> mul(., 1.0) -> _unsafe_view(1,S,C) -> y ; two equal cos(table) nodes
            n(1,S,C) fp32 -> type_as(., x fp16)
    after:  x(1,S,C) -> y ; one cos(table) node ; n -> _to_copy(dtype=fp16)
Views become ``aten.reshape`` (value semantics); a reshape of a reshape becomes one;
``type_as`` (Qwen3.5's norms) is the cast it stands for, or nothing.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import PassResult, aten, emit, is_op, recompile, shape_of, val

_ASSERTS = (
    aten._assert_tensor_metadata,
    aten._assert_scalar,
    aten.sym_constrain_range,
    aten.sym_constrain_range_for_size,
    aten._assert_async,
)
_IDENTITIES = (aten.alias, aten.clone, aten.detach, aten.lift_fresh_copy, aten.contiguous)
_VIEWS = (aten.view, aten._unsafe_view, aten.reshape)


def _same_tensor_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = val(a), val(b)
    return (
        isinstance(va, torch.Tensor)
        and isinstance(vb, torch.Tensor)
        and va.dtype == vb.dtype
        and tuple(va.shape) == tuple(vb.shape)
    )


def _is_scalar(x, value: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) == value


def _noop_source(node: fx.Node) -> fx.Node | None:
    """The input NODE can be replaced by, when NODE computes nothing."""
    if is_op(node, *_IDENTITIES, aten.type_as):
        src = node.args[0]
        return src if _same_tensor_type(node, src) else None
    if is_op(node, aten._to_copy):
        src = node.args[0]
        extra = set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}
        return src if not extra and _same_tensor_type(node, src) else None
    if is_op(
        node,
        *_VIEWS,
        aten.expand,
        aten.permute,
        aten.transpose,
        aten.squeeze,
        aten.unsqueeze,
        aten.slice,
    ):
        src = node.args[0]
        if not _same_tensor_type(node, src):
            return None
        if is_op(node, aten.permute):
            return src if list(node.args[1]) == sorted(node.args[1]) else None
        if is_op(node, aten.transpose):
            d = shape_of(src)
            return src if d is not None and node.args[1] % len(d) == node.args[2] % len(d) else None
        if is_op(node, aten.slice):
            step = node.args[4] if len(node.args) > 4 else 1
            return src if step == 1 else None
        return src
    if is_op(node, aten.mul, aten.div) and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and _is_scalar(b, 1.0) and _same_tensor_type(node, a):
            return a
        if is_op(node, aten.mul) and isinstance(b, fx.Node) and _is_scalar(a, 1.0):
            return b if _same_tensor_type(node, b) else None
    if is_op(node, aten.add, aten.sub) and len(node.args) == 2 and not node.kwargs.get("alpha"):
        a, b = node.args
        if isinstance(a, fx.Node) and _is_scalar(b, 0.0) and _same_tensor_type(node, a):
            return a
    return None


def _cse(gm: fx.GraphModule) -> bool:
    seen: dict[tuple, fx.Node] = {}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            key = ("get_attr", node.target)
        elif node.op == "call_function" and not is_op(node, *_ASSERTS):
            key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        else:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            changed = True
        else:
            seen[key] = node
    return changed


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_freeze(i) for i in x))
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, torch.Tensor):
        return ("tensor", id(x))
    return x


def remove_noop_nodes(gm: fx.GraphModule) -> PassResult:
    """Erase asserts and no-op nodes, canonicalise views, then CSE and DCE."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        if is_op(node, *_ASSERTS):
            g.erase_node(node)
            modified = True
            continue
        if is_op(node, aten.type_as) and not _same_tensor_type(node, node.args[0]):
            # the cast type_as stands for, in the one spelling the later passes read
            with g.inserting_before(node):
                new = emit(
                    g, aten._to_copy.default, (node.args[0],), {"dtype": val(node).dtype}, like=node
                )
            new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
            g.erase_node(node)
            modified = True
            continue
        src = _noop_source(node)
        if src is not None:
            node.replace_all_uses_with(src)
            g.erase_node(node)
            modified = True
            continue
        if is_op(node, aten._unsafe_view, aten.view) or (
            is_op(node, aten.reshape) and is_op(node.args[0], *_VIEWS)
        ):
            # one spelling for reshapes, and a chain of views is one view
            src = node.args[0]
            while is_op(src, *_VIEWS):
                src = src.args[0]
            shape = shape_of(node)
            if shape is None:
                continue
            if src is node.args[0] and is_op(node, aten.reshape):
                continue
            if shape_of(src) == shape and val(src).dtype == val(node).dtype:
                new = src  # the chain comes back to its input's shape: nothing to do
            else:
                with g.inserting_before(node):
                    new = emit(g, aten.reshape.default, (src, list(shape)), like=node)
                new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
            g.erase_node(node)
            modified = True
    modified |= _cse(gm)
    modified |= _dce(gm)
    if modified:
        recompile(gm)
    return PassResult(gm, modified)


def _dce(gm: fx.GraphModule) -> bool:
    changed = False
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users:
            if node.op == "call_function" and not is_op(node, *_ASSERTS) and node.is_impure():
                continue
            gm.graph.erase_node(node)
            changed = True
    return changed


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No asserts, aliases, type_as or dead nodes remain."""
    out = []
    for node in gm.graph.nodes:
        if is_op(
            node,
            *_ASSERTS,
            aten.alias,
            aten.clone,
            aten.detach,
            aten._unsafe_view,
            aten.view,
            aten.type_as,
        ):
            out.append(f"{node.name}: {node.target} left in the graph")
        elif node.op in ("call_function", "get_attr") and not node.users:
            out.append(f"{node.name}: dead node left in the graph")
    return out


register_pass("remove_noop_nodes", lambda: remove_noop_nodes, postcondition)
