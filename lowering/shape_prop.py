"""Shape propagation on the meta device: every node gets ``meta["val"]`` (a meta tensor).

Running on meta tensors costs no weight memory and no FLOPs, so the pass manager can afford
it after every pass, even for a 32B model captured on the meta device.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import anefx.lowering.ops  # noqa: F401  (registers anefx:: ops and their fake kernels)


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return x


class _MetaProp(fx.Interpreter):
    def placeholder(self, target, args, kwargs):
        node = self._current
        return _to_meta(node.meta["val"])

    def call_function(self, target, args, kwargs):
        if "device" in kwargs:  # a copy "to cpu" stays on meta here
            kwargs = {**kwargs, "device": torch.device("meta")}
        return super().call_function(target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        return _to_meta(super().get_attr(target, args, kwargs))

    def run_node(self, n: fx.Node):
        self._current = n
        try:
            result = super().run_node(n)
        except Exception as exc:  # name the node: this is what the user debugs from
            raise RuntimeError(
                f"shape propagation failed at node {n.name} ({n.target}): {exc}"
            ) from exc
        if isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result)
        ):
            n.meta["val"] = result
        return result


def propagate_shapes(gm: fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` for every node of GM from its placeholders' values."""
    with torch.no_grad():
        _MetaProp(gm).run(*[None for n in gm.graph.nodes if n.op == "placeholder"])
