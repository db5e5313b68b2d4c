"""Qwen3 dense (0.6B to 32B, and the 2507 long-context updates): q/k RMSNorm over head_dim,
head_dim a config field (heads * head_dim may differ from hidden), optional attention bias."""

from __future__ import annotations

import copy
from typing import Any

from anefx.models.families.common import (
    KV_PADDING,
    RMS_EPS_DEFAULT,
    ROPE_DEFAULT,
    dense_mlp,
    kv_states,
    never_refused,
    no_experts,
    q_norm_attention,
    q_norm_attention_parameters,
    tiny,
    whole,
)
from anefx.models.family import Default, Family
from anefx.models.kv_cache import RowKVCache
from anefx.models.tensor_shapes import ShapeReader

MAX_POSITIONS_DEFAULT = Default("max_position_embeddings", 40960, "published Qwen3, Qwen3-MoE")

# Shared by every published Qwen3 dense model; only the shapes differ.
_COMMON: dict[str, Any] = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 151936,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}


def published(
    hidden: int, layers: int, heads: int, intermediate: int, tied: bool
) -> dict[str, Any]:
    """A published Qwen3 dense config with these shapes."""
    return {
        **copy.deepcopy(_COMMON),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "tie_word_embeddings": tied,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": published(hidden=1024, layers=28, heads=16, intermediate=3072, tied=True),
    "qwen3-1.7b": published(hidden=2048, layers=28, heads=16, intermediate=6144, tied=True),
    "qwen3-4b": published(hidden=2560, layers=36, heads=32, intermediate=9728, tied=True),
    # Qwen3-4B-Instruct-2507: the qwen3-4b shapes with a 5e6 RoPE base and a 256K context.
    "qwen3-4b-2507": {
        **published(hidden=2560, layers=36, heads=32, intermediate=9728, tied=True),
        "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0},
    },
    "qwen3-8b": published(hidden=4096, layers=36, heads=32, intermediate=12288, tied=False),
    "qwen3-14b": published(hidden=5120, layers=40, heads=40, intermediate=17408, tied=False),
    "qwen3-32b": published(hidden=5120, layers=64, heads=64, intermediate=25600, tied=False),
    # Small enough for unit tests, yet keeps Qwen3's quirks: heads * head_dim != hidden,
    # grouped KV heads, tied embeddings.
    "qwen3-tiny": {
        **tiny("qwen3", head_dim=32, attention_bias=False, tie_word_embeddings=True),
        "architectures": ["Qwen3ForCausalLM"],
    },
}


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Layer 0 has a q_norm (a Qwen3-MoE checkpoint too: its family scores higher)."""
    return 1 if "self_attn.q_norm.weight" in first else 0


def infer(r: ShapeReader) -> None:
    q_norm_attention(r)
    dense_mlp(r, required=True)


FAMILY = Family(
    model_type="qwen3",
    order=0,
    config_class="Qwen3Config",
    model_class="Qwen3ForCausalLM",
    architectures=("Qwen3ForCausalLM",),
    required=(),
    recognise=recognise,
    sign="q_norm (Qwen3)",
    refuse=never_refused,
    infer=infer,
    defaults=(ROPE_DEFAULT, RMS_EPS_DEFAULT, MAX_POSITIONS_DEFAULT),
    presets=PRESETS,
    tiny="qwen3-tiny",
    attention_parameters=q_norm_attention_parameters,
    experts=no_experts,
    stored_parts=whole,
    states=kv_states,
    cache=RowKVCache,
    padding=KV_PADDING,
)
