"""Qwen3.5's published shapes and checkpoint layouts: presets, recognition from tensor names, the
defaults of a config inferred from tensor shapes (the rules every hybrid shares are
``hybrid.py``'s).

A decoder layer is a Gated DeltaNet (``linear_attn.*``) or a gated full attention
(``self_attn.*``: q_proj gives a query and a gate per head), as ``layer_types`` says. Qwen
publishes the vision-language model: a ``qwen3_5`` config nesting the text model's
``text_config``, tensors ``model.language_model.*`` (the text model), ``model.visual.*`` (the
vision tower) and ``mtp.*`` (multi-token prediction). anefx reads the text model of it
(:data:`NESTED`) and leaves the rest (:data:`DROPPED`); a text-only save
(``Qwen3_5ForCausalLM.save_pretrained``) is ``qwen3_5_text`` with ``model.*`` tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from anefx.models.families.common import dense_mlp, mrope_sections, tiny, vl_layout
from anefx.models.families.qwen3_5.hybrid import (
    FULL,
    LINEAR,
    REQUIRED,
    Hybrid,
    every_fourth,
    has_experts,
    has_fused_projections,
    has_linear_attention,
    separate_projections,
)
from anefx.models.family import Default
from anefx.models.tensor_shapes import ShapeReader

# Shared by every published Qwen3.5 text model (the `text_config` of the published config.json
# files); only the shapes differ.
COMMON: dict[str, Any] = {
    "model_type": "qwen3_5_text",
    "architectures": ["Qwen3_5ForCausalLM"],
    "vocab_size": 248320,
    "head_dim": 256,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    # a quarter of each head rotates (64 of 256); the three mrope sections (11 + 11 + 10 = 64/2)
    # are one rotary for text, whose three position streams are equal
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    # The published text_config leaves bos null and names 248044 (<|endoftext|>) as eos; the
    # outer config and generation_config.json end at 248046 (<|im_end|>, after 248045
    # <|im_start|>), where a chat turn ends: the eos here, as the Qwen3 presets' 151645.
    "bos_token_id": None,
    "eos_token_id": 248046,
    "dtype": "bfloat16",
}


def published(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    linear_value_heads: int,
    intermediate: int,
    tied: bool,
) -> dict[str, Any]:
    """A published Qwen3.5 text config with these shapes."""
    return {
        **copy.deepcopy(COMMON),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "layer_types": every_fourth(layers),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "linear_num_value_heads": linear_value_heads,
        "intermediate_size": intermediate,
        "tie_word_embeddings": tied,
    }


def hybrid_tiny(
    model_type: str = "qwen3_5_text", architecture: str = "Qwen3_5ForCausalLM", **fields: Any
) -> dict[str, Any]:
    """The shared tiny shapes with a hybrid's fields (no sliding-window fields: the classes have
    none); Qwen3.5's rotary unless FIELDS give one."""
    rope = {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [1, 1, 2],
        "mrope_interleaved": True,
    }
    fields = {"rope_parameters": rope, **fields}
    cfg = {
        **tiny(model_type, num_hidden_layers=4, head_dim=32, linear_conv_kernel_dim=4, **fields),
        "architectures": [architecture],
    }
    for key in ("max_window_layers", "use_sliding_window", "sliding_window"):
        cfg.pop(key)
    return cfg


def tiny_linear_layers(irregular: bool) -> dict[str, Any]:
    """The tiny hybrids' layer arrangement and linear-attention shapes. IRREGULAR: more value
    heads than key heads, dk != dv, full attention at an irregular place ([L, L, F, L]); else
    the published arrangement in small ([L, L, L, F], Hv == Hk, dk == dv)."""
    if irregular:
        return {
            "layer_types": [LINEAR, LINEAR, FULL, LINEAR],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 24,
        }
    return {
        "layer_types": every_fourth(4),
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    }


# the tiny hybrids' experts: 8 of width 32, 2 routed per token, a shared expert of width 48
# (wider than a routed one, so a swapped width shows)
TINY_EXPERTS: dict[str, Any] = {
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3.5-0.8b": published(1024, 24, 8, 2, 16, intermediate=3584, tied=True),
    # Assumed: heads 8 / 2 and linear 16 / 16 as the 0.8B (hidden, layers and MLP as published).
    "qwen3.5-2b": published(2048, 24, 8, 2, 16, intermediate=6144, tied=True),
    "qwen3.5-4b": published(2560, 32, 16, 4, 32, intermediate=9216, tied=True),
    "qwen3.5-9b": published(4096, 32, 16, 4, 32, intermediate=12288, tied=False),
    "qwen3.5-27b": published(5120, 64, 24, 4, 48, intermediate=17408, tied=False),
    # More value heads than key heads, dk != dv, full attention at an irregular place, a
    # partial rotary of 0.25 with text-mode mrope sections (summing to rotary_dim / 2).
    "qwen3.5-tiny": hybrid_tiny(tie_word_embeddings=True, **tiny_linear_layers(irregular=True)),
    # The published arrangement in small: [L, L, L, F], Hv == Hk, dk == dv, an untied head.
    "qwen3.5-tiny-untied": hybrid_tiny(
        tie_word_embeddings=False, **tiny_linear_layers(irregular=False)
    ),
}

# The published vision-language layout, read as its text model: transformers' composite
# Qwen3_5ForConditionalGeneration ties its head by the outer config's tie_word_embeddings
# (default false), whatever the nested text_config says, and saves lm_head.weight exactly when
# that is false (AutoModelForCausalLM instead reads the text_config's flag, and so builds a
# random head for a checkpoint tied only by the outer flag).
NESTED = vl_layout("qwen3_5", "Qwen3_5Config")
DROPPED: tuple[tuple[str, str], ...] = (
    ("model.visual.", "of the vision tower"),
    ("mtp.", "of multi-token prediction"),
)

# ---------------------------------------------------------------------------------------------
# Recognition and inference from tensor names and shapes


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Linear-attention tensors stored apart, no experts: above dense Qwen3 (whose q_norm a
    full layer also carries) and Qwen3-MoE."""
    dense = not has_experts(suffixes) and not has_fused_projections(suffixes)
    return 3 if has_linear_attention(suffixes) and dense else 0


def refuse(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    """Nothing of its own: the hybrids with experts or fused projections are families of their
    own (qwen3_5_moe_text, qwen3_next)."""
    return None


def dense_hybrid_mlp(r: ShapeReader) -> None:
    """Every layer's MLP is dense: intermediate_size from the gate_proj rows."""
    dense_mlp(r, required=True)


HYBRID = Hybrid("Qwen3_5TextConfig", PRESETS, separate_projections, dense_hybrid_mlp)


def _rope_default(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Published rope parameters; the mrope sections split the rotary's half as published
    (11 + 11 + 10 of 32) whatever head_dim is (for text they are one rotary anyway)."""
    sections = mrope_sections(int(fields.get("head_dim", 256) * 0.25), [11, 11, 10], 64)
    return {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": sections,
        "mrope_interleaved": True,
    }


_UNUSED = "unused: no layer of the checkpoint is a full attention"
# what a hybrid's tensor shapes cannot tell: its rotary, eps, context, the key split, and the
# attention shapes of a checkpoint without a full layer
HYBRID_DEFAULTS: tuple[Default, ...] = (
    Default("rms_norm_eps", 1e-6, "published Qwen3.5 and Qwen3-Next"),
    Default("max_position_embeddings", 262144, "published Qwen3.5 and Qwen3-Next"),
    # the split of the key width (key_split, whose reason infer records)
    Default("linear_num_key_heads", lambda f: f["_key_heads"], "key_split"),
    Default("linear_key_head_dim", lambda f: f["_key_dim"], "key_split"),
    Default("head_dim", 256, f"published Qwen3.5 and Qwen3-Next; {_UNUSED}"),
    Default("num_attention_heads", 8, f"published Qwen3.5-0.8B; {_UNUSED}"),
    Default("num_key_value_heads", 2, f"published Qwen3.5-0.8B; {_UNUSED}"),
)
ROPE_DEFAULT = Default(
    "rope_parameters", _rope_default, "published Qwen3.5: theta 1e7, a quarter rotates"
)
DEFAULTS: tuple[Default, ...] = (ROPE_DEFAULT, *HYBRID_DEFAULTS)


__all__ = [
    "COMMON",
    "DEFAULTS",
    "DROPPED",
    "HYBRID",
    "HYBRID_DEFAULTS",
    "NESTED",
    "PRESETS",
    "REQUIRED",
    "ROPE_DEFAULT",
    "hybrid_tiny",
    "recognise",
    "refuse",
]
