"""Named model shapes: the published Qwen3 configs plus a tiny one for tests.

Each preset is a dict of keyword arguments for the transformers config class named by its
"model_type". Values follow the public config.json files of the Qwen/Qwen3-* repositories;
the RoPE base is spelled the transformers-5 way (`rope_parameters`), which the config class
also derives from the legacy top-level `rope_theta` found in those files.
"""

from __future__ import annotations

import copy
from typing import Any

from anefx.errors import AnefxInputError

# Shared by every published Qwen3 dense model; only the shapes differ.
_QWEN3_COMMON: dict[str, Any] = {
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


def _qwen3(hidden: int, layers: int, heads: int, intermediate: int, tied: bool) -> dict[str, Any]:
    return {
        **copy.deepcopy(_QWEN3_COMMON),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "tie_word_embeddings": tied,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _qwen3(hidden=1024, layers=28, heads=16, intermediate=3072, tied=True),
    "qwen3-1.7b": _qwen3(hidden=2048, layers=28, heads=16, intermediate=6144, tied=True),
    "qwen3-4b": _qwen3(hidden=2560, layers=36, heads=32, intermediate=9728, tied=True),
    "qwen3-8b": _qwen3(hidden=4096, layers=36, heads=32, intermediate=12288, tied=False),
    "qwen3-14b": _qwen3(hidden=5120, layers=40, heads=40, intermediate=17408, tied=False),
    "qwen3-32b": _qwen3(hidden=5120, layers=64, heads=64, intermediate=25600, tied=False),
    # Small enough for unit tests, yet keeps Qwen3's quirks: heads * head_dim != hidden,
    # grouped KV heads, tied embeddings.
    "qwen3-tiny": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
}


def get_preset(name: str) -> dict[str, Any]:
    """Return a deep copy of preset `name`'s config dict; unknown names raise AnefxInputError."""
    if name not in PRESETS:
        known = ", ".join(PRESETS)
        raise AnefxInputError(f"unknown preset '{name}'; known presets: {known}")
    return copy.deepcopy(PRESETS[name])


def count_parameters(config: dict[str, Any]) -> int:
    """Exact parameter count of the *ForCausalLM built from `config`, tied weights counted once.

    Covers the Qwen3 layout (q/k RMSNorm over head_dim, optional bias on all four attention
    projections) and Qwen2 (bias on q/k/v only, no q/k norms).
    """
    model_type = config.get("model_type")
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if model_type == "qwen3":
        if config.get("attention_bias", False):
            attn += q_out + 2 * kv_out + hidden
        attn += 2 * head_dim  # q_norm and k_norm
    elif model_type == "qwen2":
        attn += q_out + 2 * kv_out
    else:
        raise AnefxInputError(f"cannot count parameters for model_type '{model_type}'")
    layer = attn + 3 * hidden * inter + 2 * hidden  # MLP and the two RMSNorms

    total = vocab * hidden + config["num_hidden_layers"] * layer + hidden
    if not config.get("tie_word_embeddings", False):
        total += vocab * hidden
    return total


def describe_presets() -> list[dict[str, Any]]:
    """One summary row per preset: shapes, parameter count and fp16 weight bytes."""
    rows = []
    for name, cfg in PRESETS.items():
        params = count_parameters(cfg)
        rows.append(
            {
                "name": name,
                "layers": cfg["num_hidden_layers"],
                "hidden": cfg["hidden_size"],
                "heads": cfg["num_attention_heads"],
                "kv_heads": cfg["num_key_value_heads"],
                "head_dim": cfg["head_dim"],
                "intermediate": cfg["intermediate_size"],
                "vocab": cfg["vocab_size"],
                "tied": cfg["tie_word_embeddings"],
                "params": params,
                "fp16_bytes": 2 * params,
            }
        )
    return rows
