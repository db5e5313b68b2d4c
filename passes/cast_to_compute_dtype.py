"""Compute in one floating dtype: drop the fp32 islands transformers opens in fp16 models.

    before: x(fp16) -> _to_copy(fp32) -> softmax(-1) -> _to_copy(fp16) ; table(fp32) * x(fp16)
    after:  x(fp16) -> softmax(-1) ; table(fp16) * x(fp16)
The ANE computes in fp16 only, so an fp32 island would be split off to the CPU. Run after the
norm rewrite (whose exact form needs no fp32) and before layout work. For fp32 lowering
(parity runs) the target dtype is fp32 and the pass changes nothing.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import PassResult, aten, const_value, is_op, recompile, val


class CastToComputeDtype:
    """Options: ``dtype``; None means the dtype of the floating graph inputs or weights."""

    name = "cast_to_compute_dtype"

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    def _target(self, gm: fx.GraphModule) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        for n in gm.graph.nodes:
            v = val(n)
            if (
                n.op in ("placeholder", "get_attr")
                and isinstance(v, torch.Tensor)
                and v.is_floating_point()
            ):
                return v.dtype
        return torch.float32

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        dtype = self._target(gm)
        g = gm.graph
        modified = False
        for node in list(g.nodes):
            if node.op == "get_attr":
                t = const_value(gm, node)
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    _set_attr(gm, node.target, t.to(dtype))
                    modified = True
            elif is_op(node, aten._to_copy) and "dtype" in node.kwargs:
                src = node.args[0]
                sv, target = val(src), node.kwargs["dtype"]
                if sv is not None and sv.is_floating_point() and target.is_floating_point:
                    node.replace_all_uses_with(src)
                    g.erase_node(node)
                    modified = True
                elif target.is_floating_point and target != dtype:
                    node.kwargs = {**node.kwargs, "dtype": dtype}
                    modified = True
            elif is_op(node, aten._softmax) and node.args[2]:
                node.args = (node.args[0], node.args[1], False)
                modified = True
            elif is_op(node, aten.softmax) and (
                node.kwargs.get("dtype") is not None or len(node.args) > 2 and node.args[2]
            ):
                node.args = node.args[:2]
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
                modified = True
            elif (
                node.op == "call_function"
                and isinstance(node.kwargs.get("dtype"), torch.dtype)
                and node.kwargs["dtype"].is_floating_point
                and node.kwargs["dtype"] != dtype
            ):
                # a tensor made in the graph in another float dtype (zeros, full, arange of a
                # recurrent state kept in fp32): made in the compute dtype instead
                node.kwargs = {**node.kwargs, "dtype": dtype}
                modified = True
        if modified:
            recompile(gm)
        return PassResult(gm, modified)


def _set_attr(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = gm
    for p in path:
        owner = getattr(owner, p)
    if name in owner._buffers:
        owner._buffers[name] = tensor
    else:
        setattr(owner, name, tensor)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """All floating tensors share one dtype."""
    dtypes = {}
    for n in gm.graph.nodes:
        v = val(n)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            dtypes.setdefault(v.dtype, n.name)
    if len(dtypes) > 1:
        return [f"mixed floating dtypes: {', '.join(f'{d} at {n}' for d, n in dtypes.items())}"]
    return []


register_pass("cast_to_compute_dtype", CastToComputeDtype, postcondition)
