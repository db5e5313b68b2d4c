"""Operators of the lowered graph that ATen has no exact spelling for.

``anefx::layer_norm(x, weight, axis, eps)`` normalises over ONE axis of a rank-4 tensor, which
is what Core ML's ``layer_norm(axes=[axis])`` does on the ANE. ``aten.layer_norm`` only
normalises trailing dimensions, so on the (B, C, 1, S) layout it would need a transpose.
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
