"""Named model shapes: the published Qwen2.5, Qwen3 and Qwen3-MoE configs plus tiny ones for tests.

Each preset is a dict of keyword arguments for the transformers config class named by its
"model_type". Values follow the public config.json files of the Qwen/* repositories (the
Qwen2.5 ones are the -Instruct repositories, whose shapes equal the base models'); the RoPE base
is spelled the transformers-5 way (`rope_parameters`), which the config class also derives from
the legacy top-level `rope_theta` found in those files.
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


# Qwen2 has no head_dim field (head_dim = hidden / heads) and its q/k/v projections always
# carry a bias, so neither appears here. `sliding_window` is inert: use_sliding_window is false
# and the config class then sets it to None.
_QWEN25_COMMON: dict[str, Any] = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}


def _qwen25(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    window_layers: int,
    sliding_window: int,
) -> dict[str, Any]:
    # The three small models tie the LM head to the embedding and keep the 151 936-token
    # vocabulary; 7B and up pad it to 152 064 and store a separate head.
    small = hidden <= 2048
    return {
        **copy.deepcopy(_QWEN25_COMMON),
        "vocab_size": 151936 if small else 152064,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "max_window_layers": window_layers,
        "sliding_window": sliding_window,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "tie_word_embeddings": small,
    }


# What the published Qwen3 mixture-of-experts models change in the dense Qwen3 config: 128
# experts, 8 routed per token with renormalised top-k weights, every layer sparse, no shared
# expert, untied head. intermediate_size stays the dense-MLP width, unused while every layer is
# sparse.
_QWEN3_MOE_FIELDS: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "num_key_value_heads": 4,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


def _qwen3_moe(
    hidden: int, layers: int, heads: int, intermediate: int, moe_intermediate: int
) -> dict[str, Any]:
    return {
        **_qwen3(hidden, layers, heads, intermediate, tied=False),
        **copy.deepcopy(_QWEN3_MOE_FIELDS),
        "moe_intermediate_size": moe_intermediate,
    }


def _tiny(model_type: str, **fields: Any) -> dict[str, Any]:
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
        **fields,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _qwen3(hidden=1024, layers=28, heads=16, intermediate=3072, tied=True),
    "qwen3-1.7b": _qwen3(hidden=2048, layers=28, heads=16, intermediate=6144, tied=True),
    "qwen3-4b": _qwen3(hidden=2560, layers=36, heads=32, intermediate=9728, tied=True),
    # Qwen3-4B-Instruct-2507: the qwen3-4b shapes with a 5e6 RoPE base and a 256K context.
    "qwen3-4b-2507": {
        **_qwen3(hidden=2560, layers=36, heads=32, intermediate=9728, tied=True),
        "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0},
    },
    "qwen3-8b": _qwen3(hidden=4096, layers=36, heads=32, intermediate=12288, tied=False),
    "qwen3-14b": _qwen3(hidden=5120, layers=40, heads=40, intermediate=17408, tied=False),
    "qwen3-32b": _qwen3(hidden=5120, layers=64, heads=64, intermediate=25600, tied=False),
    # Qwen2.5-*-Instruct. The base repositories have the same shapes; they differ in eos (151643)
    # and, for 14B/32B, rms_norm_eps 1e-5 and max_position_embeddings 131072.
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, window_layers=21, sliding_window=32768),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, window_layers=21, sliding_window=32768),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 2, 11008, window_layers=70, sliding_window=32768),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944, window_layers=28, sliding_window=131072),
    "qwen2.5-14b": _qwen25(5120, 48, 40, 8, 13824, window_layers=70, sliding_window=131072),
    "qwen2.5-32b": _qwen25(5120, 64, 40, 8, 27648, window_layers=70, sliding_window=131072),
    "qwen3-30b-a3b": _qwen3_moe(
        hidden=2048, layers=48, heads=32, intermediate=6144, moe_intermediate=768
    ),
    "qwen3-235b-a22b": _qwen3_moe(
        hidden=4096, layers=94, heads=64, intermediate=12288, moe_intermediate=1536
    ),
    # Small enough for unit tests, yet keeps Qwen3's quirks: heads * head_dim != hidden,
    # grouped KV heads, tied embeddings.
    "qwen3-tiny": {
        **_tiny("qwen3", head_dim=32, attention_bias=False, tie_word_embeddings=True),
        "architectures": ["Qwen3ForCausalLM"],
    },
    # Qwen2.5's layout: q/k/v bias, no q/k norms, head_dim = hidden / heads (16), tied head.
    "qwen2-tiny": {
        **_tiny("qwen2", tie_word_embeddings=True),
        "architectures": ["Qwen2ForCausalLM"],
    },
    # Qwen3-MoE's layout with both kinds of layer: layer 0 routes each token to 2 of 8 experts,
    # layer 1 (mlp_only_layers) is a dense MLP; untied head as in the published MoE models.
    "qwen3-moe-tiny": {
        **_tiny(
            "qwen3_moe",
            head_dim=32,
            attention_bias=False,
            tie_word_embeddings=False,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        ),
        "architectures": ["Qwen3MoeForCausalLM"],
    },
}


def get_preset(name: str) -> dict[str, Any]:
    """Return a deep copy of preset `name`'s config dict; unknown names raise AnefxInputError."""
    if name not in PRESETS:
        known = ", ".join(PRESETS)
        raise AnefxInputError(f"unknown preset '{name}'; known presets: {known}")
    return copy.deepcopy(PRESETS[name])


def num_experts(config: dict[str, Any]) -> int:
    """Experts per sparse layer of a qwen3_moe config dict (0 for dense families).

    transformers writes the field as `num_local_experts` (its attribute_map alias), published
    config.json files as `num_experts`; both are read.
    """
    if config.get("model_type") != "qwen3_moe":
        return 0
    return config.get("num_experts", config.get("num_local_experts", 128))


def sparse_layers(config: dict[str, Any]) -> list[int]:
    """Indices of the layers holding a routed-experts block, by transformers' own rule."""
    experts = num_experts(config)
    step = config.get("decoder_sparse_step", 1)
    dense = set(config.get("mlp_only_layers") or [])
    return [
        i
        for i in range(config["num_hidden_layers"])
        if experts > 0 and i not in dense and (i + 1) % step == 0
    ]


def _head_dim(config: dict[str, Any]) -> int:
    # Qwen2 has no head_dim field; transformers then uses hidden / heads (as here).
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _expert_params(config: dict[str, Any]) -> int:
    """One expert's weights: gate and up (I, H) and down (H, I)."""
    return 3 * config["hidden_size"] * config.get("moe_intermediate_size", 768)


def count_parameters(config: dict[str, Any]) -> int:
    """Exact parameter count of the *ForCausalLM built from `config`, tied weights counted once.

    Covers the Qwen3 layout (q/k RMSNorm over head_dim, optional bias on all four attention
    projections), Qwen2 (bias on q/k/v only, no q/k norms, head_dim = hidden / heads) and
    Qwen3-MoE (Qwen3 attention; per sparse layer a router (E, H) and the experts' fused
    gate_up (E, 2I, H) and down (E, H, I); a dense MLP on the other layers).
    """
    model_type = config.get("model_type")
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = _head_dim(config)
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    layers = config["num_hidden_layers"]
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if model_type in ("qwen3", "qwen3_moe"):
        if config.get("attention_bias", False):
            attn += q_out + 2 * kv_out + hidden
        attn += 2 * head_dim  # q_norm and k_norm
    elif model_type == "qwen2":
        attn += q_out + 2 * kv_out
    else:
        raise AnefxInputError(f"cannot count parameters for model_type '{model_type}'")
    dense_mlp = 3 * hidden * inter
    sparse = len(sparse_layers(config))
    experts = num_experts(config)
    sparse_mlp = experts * hidden + experts * _expert_params(config)  # router + experts

    total = layers * (attn + 2 * hidden)  # attention and the two RMSNorms
    total += (layers - sparse) * dense_mlp + sparse * sparse_mlp
    total += vocab * hidden + hidden  # embedding and the final norm
    if not config.get("tie_word_embeddings", False):
        total += vocab * hidden
    return total


def active_parameters(config: dict[str, Any]) -> int:
    """Parameters one token uses: all but the experts it is not routed to (= total if dense)."""
    idle = num_experts(config) - config.get("num_experts_per_tok", 8)
    if idle <= 0:
        return count_parameters(config)
    return count_parameters(config) - len(sparse_layers(config)) * idle * _expert_params(config)


def describe_presets() -> list[dict[str, Any]]:
    """One summary row per preset: shapes, parameter counts and fp16 weight bytes.

    `experts` and `experts_per_tok` are 0 for dense models; `active_params` is the count one
    token touches (all of them for dense models).
    """
    rows = []
    for name, cfg in PRESETS.items():
        params = count_parameters(cfg)
        rows.append(
            {
                "name": name,
                "model_type": cfg["model_type"],
                "layers": cfg["num_hidden_layers"],
                "hidden": cfg["hidden_size"],
                "heads": cfg["num_attention_heads"],
                "kv_heads": cfg["num_key_value_heads"],
                "head_dim": _head_dim(cfg),
                "intermediate": cfg["intermediate_size"],
                "experts": num_experts(cfg),
                "experts_per_tok": cfg.get("num_experts_per_tok", 0) if num_experts(cfg) else 0,
                "moe_intermediate": cfg.get("moe_intermediate_size", 0) if num_experts(cfg) else 0,
                "vocab": cfg["vocab_size"],
                "tied": cfg["tie_word_embeddings"],
                "params": params,
                "active_params": active_parameters(cfg),
                "fp16_bytes": 2 * params,
            }
        )
    return rows
