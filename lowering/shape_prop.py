"""Shape propagation on the meta device: every node gets ``meta["val"]`` (a meta tensor).

Running on meta tensors costs no weight memory and no FLOPs, so the pass manager can afford
it after every pass, even for a 32B model captured on the meta device.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import anefx.core.ops  # noqa: F401  (registers anefx:: ops and their fake kernels)


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return x


# (op, argument shapes/dtypes/scalars) -> result. Decoder layers repeat, so after the first
# layer almost every node is a cache hit; this is what makes propagating after every pass cheap.
_MEMO: dict = {}
_MEMO_LIMIT = 200_000


def _key(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, tuple(x.stride()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, *(_key(i) for i in x))
    if isinstance(x, dict):
        return ("D", *((k, _key(v)) for k, v in sorted(x.items())))
    if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return (type(x).__name__, x)
    raise TypeError  # unhashable argument kind: do not memoise


class _MetaProp(fx.Interpreter):
    def placeholder(self, target, args, kwargs):
        node = self._current
        return _to_meta(node.meta["val"])

    def call_function(self, target, args, kwargs):
        if "device" in kwargs:  # a copy "to cpu" stays on meta here
            kwargs = {**kwargs, "device": torch.device("meta")}
        try:
            key = (target, _key(args), _key(kwargs))
        except TypeError:
            return super().call_function(target, args, kwargs)
        hit = _MEMO.get(key)
        if hit is None:
            hit = super().call_function(target, args, kwargs)
            if len(_MEMO) > _MEMO_LIMIT:
                _MEMO.clear()
            _MEMO[key] = hit
        return hit

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
