"""The language model of Qwen2.5-VL (3B to 72B): Qwen2.5's decoder (q/k/v bias, no q/k norms,
head_dim = hidden / heads) with multimodal rotary (mrope: three position streams, each owning a
section of the frequencies), read from a vision-language checkpoint without its vision tower.

For text the three position streams are equal, so mrope is the 1-D rotary of Qwen2.5 (capture
swaps the recomposition for its equal-streams value: common.equal_mrope_streams). Published
checkpoints store the text model as ``model.*`` beside ``visual.*`` (transformers'
save_pretrained writes that layout too) or, re-saved, as ``model.language_model.*`` beside
``model.visual.*``; their config.json holds the text fields at its top level (``rope_scaling``
of type "mrope"), a transformers-5 save nests them as ``text_config``. Every layout reads as
the text model under its head; a text-only save (``qwen2_5_vl_text``, ``model.*``) too.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from anefx.models.families import qwen2
from anefx.models.families.common import (
    RMS_EPS_DEFAULT,
    VISION_TOWER,
    mrope_sections,
    tiny,
    vl_layout,
    vl_text_family,
)
from anefx.models.family import Default

MODEL_CLASS = "Qwen2_5_VLTextForCausalLM"
SECTIONS = [16, 24, 24]  # of the 64 frequencies of a 128-wide head: every published size

# Shared by every published Qwen2.5-VL-*-Instruct config.json (its top-level text fields); only
# the shapes differ. use_sliding_window is false, so the window fields are inert (the config
# class sets sliding_window to None).
_COMMON: dict[str, Any] = {
    "model_type": "qwen2_5_vl_text",
    "architectures": [MODEL_CLASS],
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": SECTIONS},
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "dtype": "bfloat16",
}


def published(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, window_layers: int
) -> dict[str, Any]:
    """A published Qwen2.5-VL text config with these shapes: the 3B ties its head and keeps the
    151 936-token vocabulary; 7B and up pad it to 152 064 and store a separate head."""
    small = hidden <= 2048
    return {
        **copy.deepcopy(_COMMON),
        "vocab_size": 151936 if small else 152064,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "max_window_layers": window_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "tie_word_embeddings": small,
    }


# Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct config.json. The text models have the shapes of
# Qwen2.5-3B, -7B and -32B (their presets' counts, tests/test_vl_towers.py) and of Qwen2.5-72B;
# the published totals (3.75B, 8.29B, 33.5B, 73.4B) add a vision tower of about 0.67B.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": published(2048, 36, 16, 2, 11008, window_layers=70),
    "qwen2.5-vl-7b": published(3584, 28, 28, 4, 18944, window_layers=28),
    "qwen2.5-vl-32b": published(5120, 64, 40, 8, 27648, window_layers=64),
    "qwen2.5-vl-72b": published(8192, 80, 64, 8, 29568, window_layers=80),
    # q/k/v bias, head_dim 16 (hidden / heads) whose 8 frequencies the three sections split
    # unevenly, tied head (the 3B)
    "qwen2.5-vl-tiny": {
        **tiny(
            "qwen2_5_vl_text",
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=None,  # the class defaults (151643 / 151645) lie outside a tiny vocab
            eos_token_id=None,
        ),
        "architectures": [MODEL_CLASS],
    },
    # ... and untied, as the 7B and up
    "qwen2.5-vl-tiny-untied": {
        **tiny(
            "qwen2_5_vl_text",
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=None,  # the class defaults (151643 / 151645) lie outside a tiny vocab
            eos_token_id=None,
        ),
        "architectures": [MODEL_CLASS],
    },
}


def legacy_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Qwen2_5_VLTextConfig's own rewrite: rope type "mrope" (published config.json files) is
    its "default" rotary, whose sections the rotary module reads."""
    out = dict(raw)
    for key in ("rope_scaling", "rope_parameters"):
        params = out.get(key)
        if isinstance(params, dict) and params.get("rope_type", params.get("type")) == "mrope":
            out[key] = {k: v for k, v in params.items() if k != "type"} | {"rope_type": "default"}
    return out


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Qwen2's attention (a q_proj bias, no q_norm) in a Qwen2.5-VL layout: above Qwen2 (the
    tensors are a candidate only in that layout: Family.text_twin)."""
    return 2 * qwen2.recognise(suffixes, first)


def _rope_default(fields: dict[str, Any]) -> dict[str, Any]:
    """Published rope parameters; sections as published for a 128-wide head, else thirds."""
    return {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": mrope_sections(fields["_head_dim"], SECTIONS, 128),
    }


DEFAULTS: tuple[Default, ...] = (
    Default("rope_parameters", _rope_default, "published Qwen2.5-VL: theta 1e6, mrope sections"),
    RMS_EPS_DEFAULT,
    Default("max_position_embeddings", 128000, "published Qwen2.5-VL"),
    *(row for row in qwen2.DEFAULTS if row.field in ("num_attention_heads", "num_key_value_heads")),
)


FAMILY = vl_text_family(
    "Qwen2_5_VLTextModel",
    "Qwen2_5_VLPreTrainedModel",
    model_type="qwen2_5_vl_text",
    order=7,
    config_class="Qwen2_5_VLTextConfig",
    model_class=MODEL_CLASS,
    recognise=recognise,
    infer=functools.partial(qwen2.infer, presets=PRESETS),
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen2.5-vl-tiny",
    attention_parameters=qwen2.attention_parameters,
    # the published layouts: config.json flat (or text_config, as transformers 5 saves it),
    # whose tie_word_embeddings Qwen2_5_VLConfig also takes from a pre-v5 text_config
    nested=(
        vl_layout("qwen2_5_vl", "Qwen2_5_VLConfig", flat=True, either=("tie_word_embeddings",)),
    ),
    dropped_tensors=(("model.visual.", VISION_TOWER), ("visual.", VISION_TOWER)),
    text_twin="qwen2",
    legacy_config=legacy_config,
)
