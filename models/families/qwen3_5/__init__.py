"""Qwen3.5 hybrids (0.8B to 27B): Gated DeltaNet linear-attention layers, whose state is a conv
window and a fixed-size recurrent matrix, beside gated full-attention layers with a KV cache.

The family is a package, whose machinery the other hybrids (``qwen3_5_moe.py``,
``qwen3_next.py``) share: ``hybrid`` (the rules of every hybrid: layer kinds, config checks,
inference from tensors, parameter counts, the Family fields they share), ``layout`` (Qwen3.5's
presets, recognition and defaults), ``cache`` (the states and the cache object capture hands
to the stock model) and ``delta_rule`` (the loop-free delta rule capture substitutes for
transformers' own).
"""

from __future__ import annotations

from anefx.models.families.common import no_experts, whole
from anefx.models.families.qwen3_5.hybrid import hybrid_family
from anefx.models.families.qwen3_5.layout import (
    DEFAULTS,
    DROPPED,
    HYBRID,
    NESTED,
    PRESETS,
    recognise,
    refuse,
)

FAMILY = hybrid_family(
    HYBRID,
    model_type="qwen3_5_text",
    order=3,
    config_class="Qwen3_5TextConfig",
    model_class="Qwen3_5ForCausalLM",
    architectures=("Qwen3_5ForCausalLM",),
    recognise=recognise,
    sign="linear_attn tensors (Qwen3.5)",
    refuse=refuse,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3.5-tiny",
    experts=no_experts,
    stored_parts=whole,
    # the published vision-language layout, read as its text model; its vision tower and
    # multi-token-prediction tensors are left out
    nested=(NESTED,),
    dropped_tensors=DROPPED,
)
