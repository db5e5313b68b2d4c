"""Qwen3-Next (80B-A3B): the Gated DeltaNet hybrid Qwen3.5 took over (models/families/qwen3_5/),
with the linear layers' projections fused and a routed mixture of experts beside a
sigmoid-gated shared expert in the sparse layers.

transformers `model_type` `qwen3_next` (class `Qwen3NextForCausalLM`). Its linear layer projects
q | k | v | z with one `in_proj_qkvz` and b | a with one `in_proj_ba`, their rows interleaved
per key head: for key head h, [q_h (dk) | k_h (dk) | v (r dv) | z (r dv)] and [b (r) | a (r)],
r = Hv / Hk value heads per key head. transformers' `fix_query_key_value_ordering` takes them
apart with a view to (S, Hk, per-head) and a split of its last axis, then joins q, k and v for
the conv; `split_sliced_linears` gives each part a linear of its own (the rows gathered in the
weight) and `merge_concatenated_linears` joins q, k and v again, so the graph reaching the delta
rule is Qwen3.5's and nothing is substituted for it (docs/qwen3_next.md).

Published checkpoints store the experts per expert (`mlp.experts.<e>.gate_proj.weight` ...), as
transformers saves them; fused (`mlp.experts.gate_up_proj`) loads too. The multi-token
prediction tensors (`mtp.*`) are left out and said.
"""

from __future__ import annotations

import copy
from typing import Any

from anefx.models.families.common import (
    dense_mlp,
    has_router,
    infer_experts,
    infer_shared_expert,
)
from anefx.models.families.qwen3_5.hybrid import (
    Hybrid,
    every_fourth,
    fused_projections,
    has_fused_projections,
    has_linear_attention,
    hybrid_family,
)
from anefx.models.families.qwen3_5.layout import (
    HYBRID_DEFAULTS,
    TINY_EXPERTS,
    hybrid_tiny,
    tiny_linear_layers,
)
from anefx.models.family import Default
from anefx.models.tensor_shapes import ShapeReader

MODEL_TYPE = "qwen3_next"
ARCHITECTURE = "Qwen3NextForCausalLM"

# Qwen/Qwen3-Next-80B-A3B-Instruct (and -Thinking), config.json: 48 layers of 2048, [linear x
# 3, full] x 12, gated attention 16 heads / 2 KV x 256 with a quarter rotating (theta 1e7),
# linear 16 key / 32 value heads x 128, conv 4; every layer sparse: 512 experts of 512, 10
# routed with renormalised weights, a shared expert of 512 with its sigmoid gate;
# intermediate_size 5120 (unused: no dense layer), vocabulary 151 936 (Qwen3's), untied head,
# context 262 144. The published file spells the rotary as top-level rope_theta and
# partial_rotary_factor; here the transformers-5 spelling, which the class derives from those.
_PUBLISHED: dict[str, Any] = {
    "model_type": MODEL_TYPE,
    "architectures": [ARCHITECTURE],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 48,
    "layer_types": every_fourth(48),
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "tie_word_embeddings": False,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}


def _tiny(**fields: Any) -> dict[str, Any]:
    """The shared tiny shapes with Qwen3-Next's fields: 8 experts of 32, 2 routed, a shared
    expert of 48, a quarter of each 32-wide head rotating."""
    return hybrid_tiny(
        MODEL_TYPE,
        ARCHITECTURE,
        rope_parameters=copy.deepcopy(_PUBLISHED["rope_parameters"]),
        **TINY_EXPERTS,
        decoder_sparse_step=1,
        **fields,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-next-80b-a3b": copy.deepcopy(_PUBLISHED),
    # Two value heads per key head and dk != dv (the interleaved rows of in_proj_qkvz differ
    # from a plain q | k | v | z order), full attention at an irregular place, layer 3 a dense
    # MLP (mlp_only_layers), renormalised top-k, an untied head as published.
    "qwen3-next-tiny": _tiny(
        tie_word_embeddings=False,
        **tiny_linear_layers(irregular=True),
        mlp_only_layers=[3],
        norm_topk_prob=True,
    ),
    # The published arrangement in small, every layer sparse (the unused dense width 5/2 x
    # hidden, as published), a tied head, the top-k weights not renormalised.
    "qwen3-next-tiny-tied": _tiny(
        tie_word_embeddings=True,
        intermediate_size=160,
        **tiny_linear_layers(irregular=False),
        mlp_only_layers=[],
        norm_topk_prob=False,
    ),
}


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Fused in_proj_qkvz / in_proj_ba: above every other hybrid."""
    return 5 if has_linear_attention(suffixes) and has_fused_projections(suffixes) else 0


def refuse(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    return None


def mlp(r: ShapeReader) -> None:
    """The experts' count and widths and which layers route (the others a dense MLP of
    intermediate_size); no router anywhere: every MLP dense (num_experts 0)."""
    has_experts = any(has_router(frozenset(per_layer)) for per_layer in r.layers.values())
    if not has_experts:
        dense_mlp(r, required=True)
        r.fields["num_experts"] = 0
        return
    infer_shared_expert(r, infer_experts(r))


HYBRID = Hybrid("Qwen3NextConfig", PRESETS, fused_projections, mlp)

DEFAULTS: tuple[Default, ...] = (
    Default(
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "published Qwen3-Next: theta 1e7, a quarter of each head rotates",
    ),
    *HYBRID_DEFAULTS,
    Default(
        "num_experts_per_tok",
        lambda f: min(10, f["num_experts"]),
        "10 as in Qwen3-Next-80B-A3B (at most num_experts)",
    ),
    Default(
        "norm_topk_prob",
        True,
        "published Qwen3-Next (renormalised top-k weights)",
    ),
    Default(
        "intermediate_size",
        lambda f: 5 * f["hidden_size"] // 2,
        "5/2 x hidden_size as published; only when every layer is sparse, so it is unused",
    ),
)

FAMILY = hybrid_family(
    HYBRID,
    with_experts=True,
    model_type=MODEL_TYPE,
    order=6,
    config_class="Qwen3NextConfig",
    model_class=ARCHITECTURE,
    architectures=(ARCHITECTURE,),
    recognise=recognise,
    sign="linear_attn.in_proj_qkvz tensors (Qwen3-Next)",
    refuse=refuse,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3-next-tiny",
    dropped_tensors=(("mtp.", "of multi-token prediction"),),
)
