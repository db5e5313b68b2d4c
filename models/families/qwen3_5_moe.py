"""Qwen3.5-MoE hybrids (35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5's Gated DeltaNet and gated
attention layers (models/families/qwen3_5/) with a routed mixture of experts and a
sigmoid-gated shared expert in place of every MLP.

transformers `model_type` `qwen3_5_moe_text` (class `Qwen3_5MoeForCausalLM`); Qwen publishes the
vision-language layout `qwen3_5_moe` (`Qwen3_5MoeForConditionalGeneration`, a nested
`text_config`, tensors `model.language_model.*`, `model.visual.*`, `mtp.*`), read as its text
model as for Qwen3.5. Checkpoints store the experts per expert (`mlp.experts.<e>.gate_proj.weight`
...), as transformers saves them and reads published ones (its qwen2_moe conversion); the model's
fused tensors (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)) load
too.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from anefx.models.families.common import (
    infer_shared_expert,
    routed_experts,
    vl_layout,
)
from anefx.models.families.qwen3_5.hybrid import (
    Hybrid,
    every_fourth,
    has_experts,
    has_fused_projections,
    has_linear_attention,
    hybrid_family,
    separate_projections,
)
from anefx.models.families.qwen3_5.layout import (
    COMMON,
    DROPPED,
    HYBRID_DEFAULTS,
    ROPE_DEFAULT,
    TINY_EXPERTS,
    hybrid_tiny,
    tiny_linear_layers,
)
from anefx.models.family import Default
from anefx.models.tensor_shapes import ShapeReader

MODEL_TYPE = "qwen3_5_moe_text"
ARCHITECTURE = "Qwen3_5MoeForCausalLM"

# What the published Qwen3.5-MoE text configs share beyond Qwen3.5's (vocabulary, head_dim
# 256, rotary 1e7 on a quarter of each head with the text-mode mrope sections, linear key heads
# 16 x 128, value head dim 128, conv 4, eos 248046): every layer sparse, the top-k weights
# renormalised (the class has no switch: Qwen3VLMoe's router always divides by their sum), a
# shared expert with a sigmoid gate, an untied head (the outer config's tie_word_embeddings,
# false). The class has no intermediate_size (no dense MLP).
_MOE: dict[str, Any] = {
    "model_type": MODEL_TYPE,
    "architectures": [ARCHITECTURE],
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
}


def published(
    hidden: int,
    layers: int,
    heads: int,
    linear_value_heads: int,
    experts_: int,
    top_k: int,
    moe_intermediate: int,
    shared_intermediate: int,
) -> dict[str, Any]:
    """A published Qwen3.5-MoE text config with these shapes."""
    return {
        **copy.deepcopy(COMMON),
        **copy.deepcopy(_MOE),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "layer_types": every_fourth(layers),
        "num_attention_heads": heads,
        "linear_num_value_heads": linear_value_heads,
        "num_experts": experts_,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": moe_intermediate,
        "shared_expert_intermediate_size": shared_intermediate,
    }


def _tiny(**fields: Any) -> dict[str, Any]:
    """Qwen3.5's tiny hybrid with 8 experts of width 32, 2 routed per token, a shared expert of
    width 48 (wider than a routed one, so a swapped width shows) and no dense MLP width."""
    cfg = hybrid_tiny(MODEL_TYPE, ARCHITECTURE, **TINY_EXPERTS, **fields)
    cfg.pop("intermediate_size")
    return cfg


PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3.5-35B-A3B (text_config; transformers' Qwen3_5MoeTextConfig defaults are this
    # checkpoint's): 40 layers of 2048, 16 heads / 2 KV, linear 16 key / 32 value heads, 256
    # experts of 512, 8 routed, shared expert 512. Qwen3.6-35B-A3B has the same shapes.
    "qwen3.5-35b-a3b": published(2048, 40, 16, 32, 256, 8, 512, 512),
    # Qwen/Qwen3.5-122B-A10B: 48 layers of 3072, 32 heads, 256 experts, 8 routed and a shared
    # one (the model card). Assumed, not read from its config.json: 2 KV heads, linear 16 key /
    # 64 value heads, expert and shared widths 1024; with them the count is 122.1 B total and
    # 10.0 B active, as the name says.
    "qwen3.5-122b-a10b": published(3072, 48, 32, 64, 256, 8, 1024, 1024),
    # Qwen/Qwen3.5-397B-A17B: 60 layers of 4096, 32 heads / 2 KV, linear 16 key / 64 value
    # heads, 512 experts of 1024, 10 routed, shared expert 1024 (the text_config as Megatron's
    # and slime's Qwen3.5-397B-A17B configurations restate it).
    "qwen3.5-397b-a17b": published(4096, 60, 32, 64, 512, 10, 1024, 1024),
    # More value heads than key heads, dk != dv, full attention at an irregular place, an
    # untied head as published.
    "qwen3.5-moe-tiny": _tiny(tie_word_embeddings=False, **tiny_linear_layers(irregular=True)),
    # The published arrangement in small, with a tied head.
    "qwen3.5-moe-tiny-tied": _tiny(tie_word_embeddings=True, **tiny_linear_layers(irregular=False)),
}

# The published vision-language layout, read as its text model (as Qwen3.5's: the composite
# class ties its head by the outer tie_word_embeddings, default false).
NESTED = vl_layout("qwen3_5_moe", "Qwen3_5MoeConfig")


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Linear-attention tensors stored apart beside experts: above Qwen3.5 and Qwen3-MoE."""
    if not has_linear_attention(suffixes) or has_fused_projections(suffixes):
        return 0
    return 4 if has_experts(suffixes) else 0


def refuse(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    return None


def mlp(r: ShapeReader) -> None:
    """Every layer routes its tokens: the experts' count and width, the shared expert's width
    (a layer without experts cannot be a Qwen3.5-MoE layer)."""
    sparse = routed_experts(r)
    dense = sorted(set(r.layers) - sparse)
    if dense:
        raise r.fail(
            f"layer {dense[0]} ('{r.layer_tensor(dense[0], 'mlp.*')}') has no experts; every "
            "Qwen3.5-MoE layer routes its tokens"
        )
    infer_shared_expert(r, sparse)


HYBRID = Hybrid("Qwen3_5MoeTextConfig", PRESETS, separate_projections, mlp)


def _top_k(fields: Mapping[str, Any]) -> int:
    """A preset's top-k when its shapes are the checkpoint's, else 8 (35B-A3B, 122B-A10B)."""
    for preset in PRESETS.values():
        same = ("hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size")
        if all(preset.get(k) == fields.get(k) for k in same):
            return preset["num_experts_per_tok"]
    return min(8, fields["num_experts"])


DEFAULTS: tuple[Default, ...] = (
    ROPE_DEFAULT,
    *HYBRID_DEFAULTS,
    Default(
        "num_experts_per_tok",
        _top_k,
        "a preset's of the same shapes, else 8 as Qwen3.5-35B-A3B and 122B-A10B (397B-A17B: 10)",
    ),
)

FAMILY = hybrid_family(
    HYBRID,
    with_experts=True,
    model_type=MODEL_TYPE,
    order=5,
    config_class="Qwen3_5MoeTextConfig",
    model_class=ARCHITECTURE,
    architectures=(ARCHITECTURE,),
    recognise=recognise,
    sign=None,
    refuse=refuse,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3.5-moe-tiny",
    nested=(NESTED,),
    dropped_tensors=DROPPED,
)
