"""What the Qwen families share: default rows, the tiny preset shape, the KV-cache states, and
the inference rules for the attention and dense-MLP tensors."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from anefx.core.signature import State
from anefx.models.family import Default, PadRule, StoredParts
from anefx.models.kv_cache import CACHE_AXES, cache_name, kv_cache_shape
from anefx.models.tensor_shapes import ShapeReader

ROPE_DEFAULT = Default(
    "rope_parameters",
    {"rope_type": "default", "rope_theta": 1000000.0},
    "every published Qwen2.5/Qwen3 model except the 2507 updates (5e6); no rope scaling",
)
RMS_EPS_DEFAULT = Default("rms_norm_eps", 1e-6, "published Qwen2.5-Instruct, Qwen3 and Qwen3-MoE")

# A prefill call writes its S slots of every K and V state from its first position; the
# padding's slots come after the real tokens' (models/family.py: PadRule).
KV_PADDING = PadRule(kinds=("key", "value"))


def tiny(model_type: str, **fields: Any) -> dict[str, Any]:
    """The shared tiny shapes: hidden 64, 2 layers, vocab 512, grouped KV heads."""
    return {
        "model_type": model_type,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "dtype": "bfloat16",
        **copy.deepcopy(fields),
    }


def kv_states(config: Any, context: int, dtype: str) -> tuple[State, ...]:
    """A K and a V state per decoder layer, (1, kv_heads, head_dim, context) each, layer by
    layer (K first)."""
    shape = kv_cache_shape(config, context)
    return tuple(
        State(cache_name(kind, layer), role, (layer,), shape, dtype, CACHE_AXES)
        for layer in range(config.num_hidden_layers)
        for kind, role in (("k", "key"), ("v", "value"))
    )


def whole(name: str, shape: tuple[int, ...]) -> StoredParts:
    """Every parameter is stored whole."""
    return []


def no_experts(config: Mapping[str, Any]) -> int:
    return 0


def shared_expert_parameters(config: Mapping[str, Any]) -> int:
    """A sigmoid-gated shared expert beside the routed ones (Qwen2-MoE, Qwen3-Next,
    Qwen3.5-MoE): a gated MLP of width `shared_expert_intermediate_size` and its (1, hidden)
    gate."""
    hidden = config["hidden_size"]
    return 3 * hidden * config["shared_expert_intermediate_size"] + hidden


def never_refused(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    return None


def attention_rows(r: ShapeReader) -> tuple[str, int, str, int]:
    """(q_proj name, its rows, k_proj name, its rows) of layer 0."""
    q_name = r.layer_tensor(0, "self_attn.q_proj.weight")
    k_name = r.layer_tensor(0, "self_attn.k_proj.weight")
    q_rows, _ = r.get(q_name, 2)
    k_rows, _ = r.get(k_name, 2)
    return q_name, q_rows, k_name, k_rows


def q_norm_attention(r: ShapeReader) -> None:
    """Qwen3 attention: head_dim is the q_norm length, heads and KV heads follow from the rows."""
    q_name, q_rows, k_name, k_rows = attention_rows(r)
    (head_dim,) = r.get(r.layer_tensor(0, "self_attn.q_norm.weight"), 1)
    r.fields["head_dim"] = head_dim
    r.fields["num_attention_heads"] = r.divide(q_name, q_rows, head_dim, "head_dim")
    r.fields["num_key_value_heads"] = r.divide(k_name, k_rows, head_dim, "head_dim")
    r.fields["attention_bias"] = "self_attn.q_proj.bias" in r.layers[0]


def q_norm_attention_parameters(config: Mapping[str, Any], head_dim: int) -> int:
    """Qwen3 attention beside its matrices: optional bias on all four projections, q/k norms."""
    heads = config["num_attention_heads"]
    q_out = heads * head_dim
    kv_out = (config.get("num_key_value_heads") or heads) * head_dim
    bias = q_out + 2 * kv_out + config["hidden_size"] if config.get("attention_bias") else 0
    return bias + 2 * head_dim  # q_norm and k_norm


def dense_mlp(r: ShapeReader, required: bool) -> None:
    """intermediate_size from the gate_proj rows every dense MLP layer agrees on."""
    widths = {
        i: r.shape(i, "mlp.gate_proj.weight", 2)[0]
        for i, per_layer in r.layers.items()
        if "mlp.gate_proj.weight" in per_layer
    }
    width = r.one_value(widths, "intermediate_size")
    if width is not None:
        r.fields["intermediate_size"] = width
    elif required:
        raise r.fail(f"tensor '{r.layer_tensor(0, 'mlp.gate_proj.weight')}' missing")
