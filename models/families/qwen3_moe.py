"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3 attention, routed experts (a router `mlp.gate` and
`num_experts` experts) in the sparse layers, a dense MLP in the others, no shared expert."""

from __future__ import annotations

import copy
from typing import Any

from anefx.models.families.common import (
    KV_PADDING,
    RMS_EPS_DEFAULT,
    ROPE_DEFAULT,
    expert_parts,
    experts,
    has_router,
    infer_experts,
    kv_states,
    q_norm_attention,
    q_norm_attention_parameters,
    tiny,
)
from anefx.models.families.qwen3 import MAX_POSITIONS_DEFAULT
from anefx.models.families.qwen3 import published as published_dense
from anefx.models.family import Default, Family
from anefx.models.kv_cache import RowKVCache
from anefx.models.tensor_shapes import ShapeReader

# What the published Qwen3 mixture-of-experts models change in the dense Qwen3 config: 128
# experts, 8 routed per token with renormalised top-k weights, every layer sparse, no shared
# expert, untied head. intermediate_size stays the dense-MLP width, unused while every layer is
# sparse.
_MOE_FIELDS: dict[str, Any] = {
    "num_key_value_heads": 4,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
# the tiny presets' experts (Qwen3-MoE's and Qwen3-VL-MoE's): layer 0 routes each token to 2 of
# 8 experts, layer 1 (mlp_only_layers) is a dense MLP
TINY_MOE_FIELDS: dict[str, Any] = {
    "head_dim": 32,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
# The published shapes (Qwen/Qwen3-30B-A3B, -235B-A22B config.json); Qwen3-VL-MoE's language
# models have the same (models/families/qwen3_vl_moe.py)
SHAPES: dict[str, dict[str, int]] = {
    "30b-a3b": {
        "hidden": 2048,
        "layers": 48,
        "heads": 32,
        "intermediate": 6144,
        "moe_intermediate": 768,
    },
    "235b-a22b": {
        "hidden": 4096,
        "layers": 94,
        "heads": 64,
        "intermediate": 12288,
        "moe_intermediate": 1536,
    },
}


def moe_fields(moe_intermediate: int) -> dict[str, Any]:
    """The fields the published MoE models add to their dense config, experts of this width."""
    return {**copy.deepcopy(_MOE_FIELDS), "moe_intermediate_size": moe_intermediate}


def published(
    hidden: int, layers: int, heads: int, intermediate: int, moe_intermediate: int
) -> dict[str, Any]:
    """A published Qwen3-MoE config with these shapes."""
    return {
        **published_dense(hidden, layers, heads, intermediate, tied=False),
        **moe_fields(moe_intermediate),
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
    }


PRESETS: dict[str, dict[str, Any]] = {
    **{f"qwen3-{size}": published(**shape) for size, shape in SHAPES.items()},
    # Qwen3-MoE's layout with both kinds of layer; untied head as in the published MoE models
    "qwen3-moe-tiny": {
        **tiny("qwen3_moe", **TINY_MOE_FIELDS, moe_intermediate_size=32),
        "architectures": ["Qwen3MoeForCausalLM"],
    },
}

# what a config without them gets, Qwen3-MoE's and Qwen3-VL-MoE's alike
EXPERT_DEFAULTS: tuple[Default, ...] = (
    Default(
        "num_experts_per_tok",
        lambda f: min(8, f["num_experts"]),
        "8 as in the published 30B-A3B and 235B-A22B (at most num_experts)",
    ),
    Default(
        "intermediate_size",
        lambda f: 3 * f["hidden_size"],
        "3 x hidden_size as published; only when every layer is sparse, so it is unused",
    ),
)
DEFAULTS = (
    ROPE_DEFAULT,
    RMS_EPS_DEFAULT,
    MAX_POSITIONS_DEFAULT,
    *EXPERT_DEFAULTS,
    Default(
        "norm_topk_prob",
        True,
        "published Qwen3-MoE (the config class would default to false)",
    ),
)


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Expert (or router) tensors and Qwen3's q_norm: above dense Qwen3's score."""
    return 2 if has_router(suffixes) and "self_attn.q_norm.weight" in first else 0


def refuse(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    """Other mixture-of-experts layouts than Qwen3-MoE's, Qwen2-MoE's (a shared expert
    without q_norm, models/families/qwen2_moe.py) and the hybrids'."""
    if any(s.startswith("linear_attn.") for s in suffixes):
        return None  # a hybrid with experts: Qwen3.5-MoE or Qwen3-Next
    q_norm = "self_attn.q_norm.weight" in first
    shared = any(s.startswith("mlp.shared_expert") for s in suffixes)
    if shared and q_norm:
        return "shared-expert tensors beside q_norm are not a supported family"
    if has_router(suffixes) and not q_norm and not shared:
        return "expert tensors without q_norm or a shared expert: not a supported MoE layout"
    return None


def infer(r: ShapeReader) -> None:
    """Qwen3 attention; the experts' count and width, and which layers are sparse."""
    q_norm_attention(r)
    infer_experts(r)


# what the model holds fused, published checkpoints store per expert
stored_parts = expert_parts


FAMILY = Family(
    model_type="qwen3_moe",
    order=2,
    config_class="Qwen3MoeConfig",
    model_class="Qwen3MoeForCausalLM",
    architectures=("Qwen3MoeForCausalLM",),
    # Qwen3MoeConfig would default to 128 experts of width 768; transformers itself writes
    # num_experts as num_local_experts (its attribute_map alias)
    required=(("num_experts", "num_local_experts"), ("moe_intermediate_size",)),
    recognise=recognise,
    sign=None,
    refuse=refuse,
    infer=infer,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3-moe-tiny",
    attention_parameters=q_norm_attention_parameters,
    experts=experts,
    stored_parts=stored_parts,
    states=kv_states,
    cache=RowKVCache,
    padding=KV_PADDING,
    # the router: its scores are compared to pick the experts, where a small error changes
    # which experts run
    dense_in_layer=("mlp.gate",),
)
