"""Qwen3.5 hybrids (0.8B to 27B): Gated DeltaNet linear-attention layers, whose state is a conv
window and a fixed-size recurrent matrix, beside gated full-attention layers with a KV cache.

The family is a package: ``layout`` (presets, recognition, config inference from tensors),
``cache`` (the states and the cache object capture hands to the stock model) and
``delta_rule`` (the loop-free delta rule capture substitutes for transformers' own).
"""

from __future__ import annotations

from anefx.models.families.common import no_experts, whole
from anefx.models.families.qwen3_5.cache import (
    HYBRID_PADDING,
    HybridCache,
    hybrid_states,
    layer_kinds,
    loop_free_delta_rule,
)
from anefx.models.families.qwen3_5.delta_rule import SUBSTITUTIONS
from anefx.models.families.qwen3_5.layout import (
    DEFAULTS,
    DROPPED,
    NESTED,
    PRESETS,
    REQUIRED,
    attention_parameters,
    check_config,
    describe,
    infer,
    linear_attention,
    recognise,
    refuse,
)
from anefx.models.family import Family

FAMILY = Family(
    model_type="qwen3_5_text",
    order=3,
    config_class="Qwen3_5TextConfig",
    model_class="Qwen3_5ForCausalLM",
    architectures=("Qwen3_5ForCausalLM",),
    required=REQUIRED,
    recognise=recognise,
    sign="linear_attn tensors (Qwen3.5)",
    refuse=refuse,
    infer=infer,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3.5-tiny",
    attention_parameters=attention_parameters,
    experts=no_experts,
    stored_parts=whole,
    states=hybrid_states,
    cache=HybridCache,
    padding=HYBRID_PADDING,
    capture_context=loop_free_delta_rule,
    substitutions=SUBSTITUTIONS,
    layer_kinds=layer_kinds,
    # the depthwise conv's kernels and the decay and write-strength projections stay dense:
    # small, and every token's state update goes through them
    dense_in_layer=("linear_attn.conv1d", "linear_attn.in_proj_a", "linear_attn.in_proj_b"),
    # a quarter of each full-attention head rotates (rope_parameters.partial_rotary_factor)
    partial_rotary=True,
    check_config=check_config,
    # the published vision-language layout, read as its text model; its vision tower and
    # multi-token-prediction tensors are left out
    nested=(NESTED,),
    dropped_tensors=DROPPED,
    linear_attention=linear_attention,
    describe=describe,
)
