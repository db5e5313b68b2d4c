"""Small graph helpers shared by the passes (not a pass)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from anefx.core.annotations import PROVENANCE, mark_unlowered, unlowered
from anefx.core.recompile import deferred_recompile, recompile

__all__ = [
    "PassResult",
    "emit",
    "is_op",
    "const_value",
    "add_const",
    "val",
    "shape_of",
    "aten",
    "recompile",
    "deferred_recompile",
    "mark_unlowered",
    "unlowered",
    "keep_unlowered",
]

aten = torch.ops.aten


def is_op(node: object, *targets) -> bool:
    """True when NODE is a call_function of one of TARGETS (OpOverloads or packets)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    # one attribute read and two C-level scans: the checker and every postcondition ask this
    # of every node (16 M calls for a 4-layer Qwen3.5-397B-A17B)
    return t in targets or getattr(t, "overloadpacket", t) in targets


def left_unreported(gm: fx.GraphModule, *targets) -> list[str]:
    """A postcondition's findings: every node of one of TARGETS still in GM that no pass
    reported as left unlowered (core/annotations.py)."""
    return [
        f"{n.name}: {n.target} left"
        for n in gm.graph.nodes
        if is_op(n, *targets) and not unlowered(n)
    ]


def val(node: object):
    """The propagated example value (a meta tensor) of a node, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: object) -> tuple[int, ...] | None:
    v = val(node)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def emit(
    graph: fx.Graph, target, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None
) -> fx.Node:
    """Create a call_function node that inherits LIKE's source module (for the report)."""
    node = graph.call_function(target, args, kwargs or {})
    if like is not None:
        for key in PROVENANCE:
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def const_value(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor behind a get_attr node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def add_const(
    gm: fx.GraphModule, tensor: torch.Tensor, hint: str, like: fx.Node | None = None
) -> fx.Node:
    """Register TENSOR as a new attribute and return a get_attr node for it."""
    base = "".join(c if c.isalnum() else "_" for c in hint)
    # numbered per graph, not per process: the same conversion names (and so emits) the same
    # constants however many graphs this process lowered before
    count = gm.meta.get("anefx_consts", 0)
    name = f"_anefx_{base}_{count}"
    while hasattr(gm, name):
        count += 1
        name = f"_anefx_{base}_{count}"
    gm.meta["anefx_consts"] = count + 1
    gm.register_buffer(name, tensor.detach(), persistent=False)
    node = gm.graph.get_attr(name)
    node.meta["val"] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if like is not None:
        for key in PROVENANCE:
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def replace(node: fx.Node, new: fx.Node) -> None:
    """NEW computes what NODE computed: it takes NODE's example value (a later match in the
    same sweep reads its shape) and its users, and NODE is erased."""
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def keep_unlowered(old: fx.Node, new: fx.Node) -> None:
    """NEW replaces OLD: if a pass reported OLD as not lowered, NEW carries the report (the
    pass's postcondition keeps skipping it, the checker keeps saying why)."""
    why = unlowered(old)
    if why:
        pass_name, _, reason = why.partition(": ")
        mark_unlowered(new, pass_name, reason)


def tensor_args(node: fx.Node) -> Iterable[fx.Node]:
    """All node inputs, flattening lists."""
    return node.all_input_nodes
