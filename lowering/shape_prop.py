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


def _call(target, args, kwargs):
    """TARGET on meta arguments, memoised by the arguments' shapes, dtypes and scalars."""
    if "device" in kwargs:  # a copy "to cpu" stays on meta here
        kwargs = {**kwargs, "device": torch.device("meta")}
    try:
        key = (target, _key(args), _key(kwargs))
    except TypeError:
        return target(*args, **kwargs)
    hit = _MEMO.get(key)
    if hit is None:
        hit = target(*args, **kwargs)
        if len(_MEMO) > _MEMO_LIMIT:
            _MEMO.clear()
        _MEMO[key] = hit
    return hit


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def propagate_shapes(gm: fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` for every node of GM from its placeholders' values.

    A plain loop over the nodes rather than an fx.Interpreter: the pass manager runs this after
    every pass, and the interpreter's per-node bookkeeping (progress bar, logging, freeing
    values after their last use) cost more than the memoised meta calls themselves."""
    env: dict[fx.Node, object] = {}
    load = env.__getitem__
    with torch.no_grad():
        for n in gm.graph.nodes:
            try:
                if n.op == "placeholder":
                    result = _to_meta(n.meta["val"])
                elif n.op == "get_attr":
                    result = _to_meta(_attr(gm, n.target))
                elif n.op == "output":
                    continue
                else:
                    args = fx.node.map_arg(n.args, load)
                    kwargs = fx.node.map_arg(n.kwargs, load)
                    if n.op == "call_function":
                        result = _call(n.target, args, kwargs)
                    elif n.op == "call_method":
                        result = getattr(args[0], n.target)(*args[1:], **kwargs)
                    else:  # call_module
                        result = gm.get_submodule(n.target)(*args, **kwargs)
            except Exception as exc:  # name the node: this is what the user debugs from
                raise RuntimeError(
                    f"shape propagation failed at node {n.name} ({n.target}): {exc}"
                ) from exc
            env[n] = result
            if isinstance(result, torch.Tensor) or (
                isinstance(result, (tuple, list))
                and all(isinstance(r, torch.Tensor) for r in result)
            ):
                n.meta["val"] = result
