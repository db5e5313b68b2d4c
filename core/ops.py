"""Operators of the lowered graph that ATen has no exact spelling for.

``anefx::layer_norm(x, weight, axis, eps)`` normalises over ONE axis of a rank-4 tensor, which
is what Core ML's ``layer_norm(axes=[axis])`` does on the ANE. ``aten.layer_norm`` only
normalises trailing dimensions, so on the (B, C, 1, S) layout it would need a transpose.

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
