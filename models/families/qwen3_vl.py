"""The language model of Qwen3-VL (2B to 32B): Qwen3's decoder (q/k RMSNorm, head_dim 128) with
interleaved multimodal rotary (mrope), read from a vision-language checkpoint without its vision
tower.

For text the three position streams are equal, so mrope is Qwen3's 1-D rotary (capture swaps
the recomposition for its equal-streams value: common.equal_mrope_streams). The text model adds
the vision tower's "deepstack" features to the hidden states of its first layers where image
tokens sit; with no image there are none, the branch is not taken, and the captured graph holds
nothing of it (tests/test_vl_towers.py: the same ops as Qwen3's). Published checkpoints store
``model.language_model.*`` beside ``model.visual.*`` with a ``text_config``, as transformers'
save_pretrained does; a text-only save (``qwen3_vl_text``, ``model.*``) reads too.
"""

from __future__ import annotations

import copy
from typing import Any

from anefx.models.families import qwen3
from anefx.models.families.common import (
    RMS_EPS_DEFAULT,
    mrope_sections,
    q_norm_attention_parameters,
    tiny,
    vl_layout,
    vl_text_family,
)
from anefx.models.family import Default

MODEL_CLASS = "Qwen3VLTextForCausalLM"
# every published Qwen3-VL: 24 + 20 + 20 of the 64 frequencies of a 128-wide head, interleaved
SECTIONS = [24, 20, 20]
ROPE_THETA = 5000000.0


def rope(head_dim: int = 128) -> dict[str, Any]:
    """Published Qwen3-VL rope parameters (sections as published for a 128-wide head)."""
    return {
        "rope_type": "default",
        "rope_theta": ROPE_THETA,
        "mrope_section": mrope_sections(head_dim, SECTIONS, 128),
        "mrope_interleaved": True,
    }


# Shared by every published Qwen3-VL text_config; only the shapes differ. (Qwen3VLTextConfig
# has no bos/eos fields: the published files' 151643 / 151645 live in generation_config.json.)
_COMMON: dict[str, Any] = {
    "model_type": "qwen3_vl_text",
    "architectures": [MODEL_CLASS],
    "vocab_size": 151936,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_parameters": rope(),
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "dtype": "bfloat16",
}


def published(
    hidden: int, layers: int, heads: int, intermediate: int, tied: bool
) -> dict[str, Any]:
    """A published Qwen3-VL text config with these shapes."""
    return {
        **copy.deepcopy(_COMMON),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "tie_word_embeddings": tied,
    }


# Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct config.json (text_config; tie_word_embeddings from the
# outer config). The text models have the shapes of Qwen3-1.7B, -4B, -8B and -32B (equal counts:
# tests/test_vl_towers.py); the published totals add a vision tower of 0.4 to 0.6B.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-vl-2b": published(hidden=2048, layers=28, heads=16, intermediate=6144, tied=True),
    "qwen3-vl-4b": published(hidden=2560, layers=36, heads=32, intermediate=9728, tied=True),
    "qwen3-vl-8b": published(hidden=4096, layers=36, heads=32, intermediate=12288, tied=False),
    "qwen3-vl-32b": published(hidden=5120, layers=64, heads=64, intermediate=25600, tied=False),
    # heads * head_dim != hidden, grouped KV heads, interleaved sections of a 32-wide head
    "qwen3-vl-tiny": {
        **tiny("qwen3_vl_text", head_dim=32, attention_bias=False, tie_word_embeddings=True),
        "rope_parameters": rope(32),
        "architectures": [MODEL_CLASS],
    },
    "qwen3-vl-tiny-untied": {
        **tiny("qwen3_vl_text", head_dim=32, attention_bias=False, tie_word_embeddings=False),
        "rope_parameters": rope(32),
        "architectures": [MODEL_CLASS],
    },
}
for _cfg in PRESETS.values():  # no sliding-window fields: Qwen3VLTextConfig has none
    for _key in ("max_window_layers", "use_sliding_window", "sliding_window"):
        _cfg.pop(_key, None)


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Qwen3's attention without experts or linear attention, in a Qwen3-VL layout: above
    Qwen3 (the tensors are a candidate only in that layout: Family.text_twin)."""
    if any(s.startswith(("mlp.experts.", "mlp.gate.", "linear_attn.")) for s in suffixes):
        return 0
    return 2 * qwen3.recognise(suffixes, first)


DEFAULTS: tuple[Default, ...] = (
    Default(
        "rope_parameters",
        lambda f: rope(f.get("head_dim", 128)),
        "published Qwen3-VL: theta 5e6, interleaved mrope sections",
    ),
    RMS_EPS_DEFAULT,
    Default("max_position_embeddings", 262144, "published Qwen3-VL"),
)


FAMILY = vl_text_family(
    "Qwen3VLTextModel",
    "Qwen3VLPreTrainedModel",
    model_type="qwen3_vl_text",
    order=8,
    config_class="Qwen3VLTextConfig",
    model_class=MODEL_CLASS,
    recognise=recognise,
    infer=qwen3.infer,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3-vl-tiny",
    attention_parameters=q_norm_attention_parameters,
    nested=(vl_layout("qwen3_vl", "Qwen3VLConfig"),),
    text_twin="qwen3",
)
