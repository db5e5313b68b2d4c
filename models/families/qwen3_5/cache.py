"""Qwen3.5's states, the cache object capture hands to the stock model, and what capture swaps.

States, layer by layer (batch 1):

* a linear-attention layer: its conv window ``conv_state_<l>`` (1, conv_dim, K-1), the last K-1
  inputs of its depthwise conv (conv_dim = 2 Hk dk + Hv dv), and its delta-rule state
  ``rec_state_<l>`` (1, Hv, dk, dv). Both are **carried**: inputs and outputs of the program
  (core/signature.py State.carried), as CoreML-LLM ships them; a program holds one Core ML
  state on the device (a Qwen3.5 build with three failed there, device-facts.md), and these
  are rewritten whole at every call, so a state in place would save no bytes (docs/qwen3_5.md).
* a full-attention layer: ``k_cache_<l>`` and ``v_cache_<l>`` (1, Hkv, head_dim, context),
  written with ``anefx::kv_write`` as every family's (models/kv_cache.py), packed by the
  emitter into the program's one state.

What the stock layer calls on its cache (transformers 5.23 modeling_qwen3_5): a full layer
``update(k, v, layer)``; a linear layer ``get_conv_state``, ``get_recurrent_state``,
``is_recording_past``, then for S == 1 ``causal_conv1d_update`` (which writes the window it
got in place), else ``update_conv_state`` (which must return the conv input cat[window, x]),
and ``update_recurrent_state``.

A padded prefill slot (position >= context, generation.py) leaves every state as it was: the
KV slots it writes are past every real position (models/family.py PadRule); the delta rule
gets beta = 0 and g = 0 for it (``anefx_valid``, a model kwarg the stock forward passes down
to the delta-rule function); the new conv window is the K-1 inputs before the first pad,
selected by a one-hot matmul (no data-dependent slice).
"""

from __future__ import annotations

import contextlib
import sys
from functools import partial
from typing import Any

import numpy as np
import torch

from anefx.core.signature import State
from anefx.models.families.common import equal_mrope_streams
from anefx.models.families.qwen3_5.delta_rule import (
    OUTPUT_SCALE,
    chunk_delta_rule,
    recurrent_step,
)
from anefx.models.family import PadRule
from anefx.models.kv_cache import CACHE_AXES, RowKVCache, cache_name, kv_cache_shape

LINEAR = "linear_attention"
CONV_AXES = ("B", "C", "W")  # batch, conv channels, the window's last K-1 inputs
RECURRENT_AXES = ("B", "H", "K", "V")  # batch, value heads, key dim, value dim

# The KV slots a padded call writes lie past every real position; the conv and recurrent
# states are not touched by padding at all (their rule is the test of tests/test_qwen3_5.py).
HYBRID_PADDING = PadRule(kinds=("key", "value"))


def conv_name(layer: int) -> str:
    return f"conv_state_{layer}"


def recurrent_name(layer: int) -> str:
    return f"rec_state_{layer}"


def conv_dim(config: Any) -> int:
    """The channels of the depthwise conv: q | k | v."""
    return (
        2 * config.linear_num_key_heads * config.linear_key_head_dim
        + config.linear_num_value_heads * config.linear_value_head_dim
    )


def layer_kinds(config: Any) -> list[str]:
    """Each layer's kind, for reports: "linear" (Gated DeltaNet) or "full" (attention)."""
    return [
        "linear" if kind == LINEAR else "full"
        for kind in config.layer_types[: config.num_hidden_layers]
    ]


def hybrid_states(config: Any, context: int, dtype: str) -> tuple[State, ...]:
    """Per linear layer its conv window and delta-rule state (carried), per full layer its K
    and V cache; layer by layer, in the order the stock model calls them."""
    window = config.linear_conv_kernel_dim - 1
    recurrent = (
        1,
        config.linear_num_value_heads,
        config.linear_key_head_dim,
        config.linear_value_head_dim,
    )
    out: list[State] = []
    for layer, kind in enumerate(config.layer_types[: config.num_hidden_layers]):
        if kind == LINEAR:
            out.append(
                State(
                    conv_name(layer),
                    "conv",
                    (layer,),
                    (1, conv_dim(config), window),
                    dtype,
                    CONV_AXES,
                    carried=True,
                )
            )
            out.append(
                State(
                    recurrent_name(layer),
                    "recurrent",
                    (layer,),
                    recurrent,
                    dtype,
                    RECURRENT_AXES,
                    carried=True,
                )
            )
        else:
            shape = kv_cache_shape(config, context)
            for kind_, role in (("k", "key"), ("v", "value")):
                out.append(
                    State(cache_name(kind_, layer), role, (layer,), shape, dtype, CACHE_AXES)
                )
    return tuple(out)


class HybridCache(RowKVCache):
    """The cache a hybrid's stateful capture hands to the stock model: K/V as RowKVCache; the
    conv and recurrent states are OWNER's buffers (see the module docstring)."""

    def __init__(self, owner: torch.nn.Module, positions: torch.Tensor):
        super().__init__(owner, positions)
        self.context = owner.context

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """What the model call passes down to the delta rule: which slots are real tokens."""
        return {"anefx_valid": self.valid()}

    def valid(self) -> torch.Tensor:
        """(1, S): 1 for a real token, 0 for a padded slot (its position is the context)."""
        return (self.positions < self.context).to(torch.float32)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return getattr(self.owner, conv_name(layer_idx))

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return getattr(self.owner, recurrent_name(layer_idx))

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None):
        return True

    def update_conv_state(self, conv_states, layer_idx, state_idx=0, conv_kernel_size=None, **kw):
        """The conv input cat[window, x] (1, C, K-1+S); the new window is its K-1 columns
        before the first padded slot, taken by a one-hot selection matmul."""
        buf = getattr(self.owner, conv_name(layer_idx))
        full = torch.cat([buf.to(conv_states.dtype), conv_states], dim=-1)
        keep, width = buf.shape[-1], full.shape[-1]
        # column n + j of FULL -> column j of the window, n = the real tokens of this call
        offsets = torch.tensor(
            (np.arange(width)[:, None] - np.arange(keep)[None, :]).astype(np.float32),
            device=full.device,
        )
        real = self.valid().sum(-1, keepdim=True)  # (1, 1): the real tokens of the call
        select = (offsets == real).to(full.dtype)  # (K-1+S, K-1) one-hot
        buf.copy_((full @ select).to(buf.dtype))
        return full

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kw):
        buf = getattr(self.owner, recurrent_name(layer_idx))
        buf.copy_(recurrent_states.to(buf.dtype))
        return buf


def _modules_of(model: torch.nn.Module) -> list[Any]:
    """The python modules of MODEL's submodule classes (where the stock functions live)."""
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if n in sys.modules]


@contextlib.contextmanager
def loop_free_delta_rule(model: torch.nn.Module):
    """While capturing: transformers' delta-rule functions -> delta_rule.py's (the names in
    ``delta_rule.SUBSTITUTIONS``), and the text rotary's mrope recomposition -> its value for
    equal position streams (common.equal_mrope_streams); restored afterwards."""
    saved: list[tuple[Any, str, Any]] = []
    swaps = {
        "torch_chunk_gated_delta_rule": partial(chunk_delta_rule, output_scale=OUTPUT_SCALE),
        "torch_recurrent_gated_delta_rule": partial(recurrent_step, output_scale=OUTPUT_SCALE),
    }
    for module in _modules_of(model):
        for name, new in swaps.items():
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, new)
    for sub in model.modules():
        # a Gated DeltaNet (it has the decay parameter A_log): its gated norm gets the eps of
        # the scaled output (delta_rule.OUTPUT_SCALE)
        norm = getattr(sub, "norm", None)
        if hasattr(sub, "A_log") and isinstance(getattr(norm, "variance_epsilon", None), float):
            saved.append((norm, "variance_epsilon", norm.variance_epsilon))
            norm.variance_epsilon = norm.variance_epsilon * OUTPUT_SCALE**2
    try:
        with equal_mrope_streams(model):  # common.py: shared with the VL text decoders
            yield
    finally:
        for owner, name, old in reversed(saved):
            setattr(owner, name, old)
