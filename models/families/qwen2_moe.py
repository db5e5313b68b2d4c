"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 attention (q/k/v bias, no q/k norms,
head_dim = hidden / heads), routed experts and a shared expert with its own sigmoid gate in
the sparse layers (`mlp.gate`, `mlp.experts`, `mlp.shared_expert`, `mlp.shared_expert_gate`),
a dense MLP in the others; top-k weights not renormalised (`norm_topk_prob` false)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from anefx.models.families import qwen2
from anefx.models.families.common import (
    KV_PADDING,
    RMS_EPS_DEFAULT,
    ROPE_DEFAULT,
    attention_rows,
    expert_parts,
    experts,
    infer_experts,
    infer_shared_expert,
    kv_states,
    never_refused,
    shared_expert_parameters,
    tiny,
)
from anefx.models.family import Default, Family
from anefx.models.kv_cache import RowKVCache
from anefx.models.tensor_shapes import ShapeReader

# What both published Qwen2-MoE models share (config.json of Qwen/Qwen1.5-MoE-A2.7B-Chat and
# Qwen/Qwen2-57B-A14B-Instruct; the base repositories have the same shapes): every layer sparse
# (decoder_sparse_step 1, no mlp_only_layers), top-k weights used as the softmax gives them,
# untied head, the 151 936-token vocabulary, rope base 1e6. The files predate `qkv_bias` (the
# class default, true, is their layout). `sliding_window` / `max_window_layers` are left out:
# use_sliding_window is false and the config class then sets the window to 0.
_COMMON: dict[str, Any] = {
    "model_type": "qwen2_moe",
    "architectures": ["Qwen2MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}


def published(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    experts: int,
    top_k: int,
    moe_intermediate: int,
    shared: int,
    positions: int,
) -> dict[str, Any]:
    """A published Qwen2-MoE config with these shapes."""
    return {
        **copy.deepcopy(_COMMON),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,  # the dense-MLP width: unused, every layer is sparse
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": moe_intermediate,
        "shared_expert_intermediate_size": shared,
        "max_position_embeddings": positions,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # Qwen1.5-MoE-A2.7B(-Chat): 60 experts of width 1408, 4 routed per token, a shared expert of
    # width 5632 (four experts' worth); 16 heads of 128, no grouped KV; 14.32 B parameters
    # (14.3B published), 2.69 B active
    "qwen1.5-moe-a2.7b": published(
        hidden=2048,
        layers=24,
        heads=16,
        kv_heads=16,
        intermediate=5632,
        experts=60,
        top_k=4,
        moe_intermediate=1408,
        shared=5632,
        positions=8192,
    ),
    # Qwen2-57B-A14B(-Instruct): 64 experts of width 2560, 8 routed, a shared expert of width
    # 20480; 28 heads of 128, 4 KV heads; 57.41 B parameters, 14.24 B active
    "qwen2-57b-a14b": published(
        hidden=3584,
        layers=28,
        heads=28,
        kv_heads=4,
        intermediate=18944,
        experts=64,
        top_k=8,
        moe_intermediate=2560,
        shared=20480,
        positions=32768,
    ),
    # Qwen2-MoE's layout with both kinds of layer: layer 0 routes each token to 2 of 8 experts
    # beside a shared expert of its own width, layer 1 (mlp_only_layers) is a dense MLP; q/k/v
    # bias, head_dim 16 = hidden / heads, untied head as published.
    "qwen2-moe-tiny": {
        **tiny(
            "qwen2_moe",
            tie_word_embeddings=False,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        ),
        "architectures": ["Qwen2MoeForCausalLM"],
    },
}

# what tensor shapes cannot tell, read off a preset of the same experts when there is one
_SAME_EXPERTS = ("hidden_size", "num_experts", "moe_intermediate_size")


def _like(fields: Mapping[str, Any], key: str, otherwise: Any) -> Any:
    """KEY of the first preset whose experts' shapes are FIELDS' (else OTHERWISE)."""
    for preset in PRESETS.values():
        if all(preset[k] == fields[k] for k in _SAME_EXPERTS):
            return preset[key]
    return otherwise


DEFAULTS = (
    ROPE_DEFAULT,
    RMS_EPS_DEFAULT,
    Default(
        "max_position_embeddings",
        lambda f: _like(f, "max_position_embeddings", 32768),
        "a preset's with the same experts (8192 Qwen1.5-MoE, 32768 Qwen2-57B-A14B), else "
        "32768 (the config class's)",
    ),
    Default(
        "num_attention_heads",
        lambda f: f["hidden_size"] // f["_head_dim"],
        "hidden_size / head_dim; head_dim from a preset with the same shapes, else the first "
        f"of {', '.join(map(str, qwen2.HEAD_DIMS))} dividing the q and k rows",
    ),
    Default("num_key_value_heads", lambda f: f["_k_rows"] // f["_head_dim"], "k_proj rows / that"),
    Default(
        "num_experts_per_tok",
        lambda f: min(_like(f, "num_experts_per_tok", 4), f["num_experts"]),
        "a preset's with the same experts (4 of 60 in Qwen1.5-MoE, 8 of 64 in Qwen2-57B-A14B), "
        "else 4 (the config class's), at most num_experts",
    ),
    Default("norm_topk_prob", False, "published Qwen2-MoE and the config class"),
    Default(
        "intermediate_size",
        lambda f: _like(f, "intermediate_size", f["shared_expert_intermediate_size"]),
        "a preset's with the same experts, else the shared expert's width (as in "
        "Qwen1.5-MoE); only when every layer is sparse, so it is unused",
    ),
)

# the shapes that decide head_dim when a preset has them (Qwen2's attention has no head_dim
# field); intermediate_size is compared only when a dense layer gave it
_SAME_SHAPES = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


def _has_shared_expert(suffixes: frozenset[str]) -> bool:
    return any(s.startswith(("mlp.shared_expert.", "mlp.shared_expert_gate.")) for s in suffixes)


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """A shared expert and Qwen2's attention (no q_norm, no linear attention): above dense
    Qwen2, whose q_proj bias these layers carry too."""
    qwen3_like = any(s.startswith(("self_attn.q_norm", "linear_attn.")) for s in suffixes)
    attends = "self_attn.q_proj.weight" in first
    return 2 if _has_shared_expert(suffixes) and attends and not qwen3_like else 0


def infer(r: ShapeReader) -> None:
    """Qwen2's attention (q rows = hidden, bias optional), the routed experts as Qwen3-MoE
    reads them, the shared expert's width; head_dim from a preset with these shapes, else the
    rule, for the heads (the defaults)."""
    q_name, q_rows, _, k_rows = attention_rows(r)
    hidden = r.fields["hidden_size"]
    if q_rows != hidden:
        raise r.fail(f"tensor '{q_name}' has {q_rows} rows; Qwen2-MoE needs hidden_size ({hidden})")
    r.fields["qkv_bias"] = "self_attn.q_proj.bias" in r.layers[0]
    infer_shared_expert(r, infer_experts(r))
    r.fields["_k_rows"] = k_rows
    r.fields["_head_dim"], why = qwen2.head_dim(r.fields, PRESETS, _SAME_SHAPES)
    r.reasons["num_attention_heads"] = r.reasons["num_key_value_heads"] = why


def attention_parameters(config: Mapping[str, Any], dim: int) -> int:
    """The q/k/v biases (`qkv_bias`, true unless said); no q/k norms."""
    if not config.get("qkv_bias", True):
        return 0
    return qwen2.attention_parameters(config, dim)


FAMILY = Family(
    model_type="qwen2_moe",
    order=3,
    config_class="Qwen2MoeConfig",
    model_class="Qwen2MoeForCausalLM",
    architectures=("Qwen2MoeForCausalLM",),
    # the config class would default to Qwen1.5-MoE-A2.7B's experts
    required=(
        ("num_experts",),
        ("moe_intermediate_size",),
        ("shared_expert_intermediate_size",),
    ),
    recognise=recognise,
    sign=None,  # its layer 0 carries Qwen2's q_proj bias (said by dense Qwen2)
    refuse=never_refused,
    infer=infer,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen2-moe-tiny",
    attention_parameters=attention_parameters,
    experts=experts,
    stored_parts=expert_parts,
    states=kv_states,
    cache=RowKVCache,
    padding=KV_PADDING,
    # the router and the shared expert's gate: scores compared to pick the experts, and a
    # one-row scale of the shared expert's output
    dense_in_layer=("mlp.gate", "mlp.shared_expert_gate"),
    shared_expert=shared_expert_parameters,
)
