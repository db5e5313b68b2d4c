"""Operators of the lowered graph that ATen has no exact spelling for.

``anefx::layer_norm(x, weight, axis, eps)`` normalises over ONE axis of a rank-4 tensor, which
is what Core ML's ``layer_norm(axes=[axis])`` does on the ANE. ``aten.layer_norm`` only
normalises trailing dimensions, so on the (B, C, 1, S) layout it would need a transpose.

``anefx::kv_write(cache, rows, positions)`` writes a call's new K (or V) rows into a cache laid
out (1, kv_heads, head_dim, context), starting at the first token's position: what Core ML's
``slice_update`` of a state does in place (the devices' own path, device-facts.md). ATen has
no functional write at a runtime offset that export keeps as one op.

``EMITTABLE`` is the lowered graph's whole op vocabulary: the ops the Core ML emitter translates.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("anefx::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, axis: int, eps: float) -> torch.Tensor:
    """LayerNorm over ``axis`` (no bias): (x - mean) / sqrt(var + eps) * weight."""
    axis = axis % x.dim()
    xt = x.movedim(axis, -1)
    y = torch.nn.functional.layer_norm(xt, (xt.shape[-1],), weight, None, eps)
    return y.movedim(-1, axis).contiguous()


@layer_norm.register_fake
def _(x, weight, axis, eps):
    return torch.empty_like(x)


LAYER_NORM = torch.ops.anefx.layer_norm.default


@torch.library.custom_op("anefx::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """CACHE (.., T) with ROWS (.., S) written at [p, p + S) of its last axis, p the first
    position of POSITIONS (1, S). A call whose slots would pass the end is an error: nothing is
    written out of bounds (the runtime starts a late chunk earlier instead)."""
    start, width, slots = int(positions.reshape(-1)[0]), rows.shape[-1], cache.shape[-1]
    if not 0 <= start <= slots - width:
        raise IndexError(
            f"kv_write: rows [{start}, {start + width}) are outside the cache's {slots} slots"
        )
    out = cache.clone()
    out[..., start : start + width] = rows.to(cache.dtype)
    return out


@kv_write.register_fake
def _(cache, rows, positions):
    return torch.empty_like(cache)


KV_WRITE = torch.ops.anefx.kv_write.default


EMITTABLE: frozenset[str] = frozenset(
    {
        "aten.reshape.default",
        "aten.view.default",
        "aten._unsafe_view.default",
        "aten.permute.default",
        "aten.transpose.int",
        "aten.cat.default",
        "aten.slice.Tensor",
        "aten.expand.default",
        "aten.embedding.default",
        "aten._to_copy.default",
        "aten.matmul.default",
        "aten.conv2d.default",
        "anefx.layer_norm.default",
        "anefx.kv_write.default",
        "aten.add.Tensor",
        "aten.sub.Tensor",
        "aten.mul.Tensor",
        "aten.div.Tensor",
        "aten.eq.Tensor",
        "aten.gt.Tensor",
        "aten.gt.Scalar",
        "aten.lt.Tensor",
        "aten.lt.Scalar",
        "aten.ge.Scalar",
        "aten.le.Scalar",
        "aten.rsub.Scalar",
        "aten.neg.default",
        "aten.silu.default",
        "aten.sigmoid.default",
        "aten.relu.default",
        "aten.tanh.default",
        "aten.exp.default",
        "aten.softplus.default",
        "aten.gelu.default",
        "aten.softmax.int",
        "aten._softmax.default",
        "aten.sum.dim_IntList",
        "aten.amax.default",
        "aten.argmax.default",
    }
)
"""The op vocabulary of a lowered graph: the fx ops (``str`` of the overload) the Core ML emitter
translates (targets/op_registry.py ``TRANSLATORS``, which tests hold equal to this). The checker
reads it here because lowering/ never imports targets/: a lowered graph holding any other op is
an ``unsupported_op`` error before conversion starts."""
