"""Qwen2 / Qwen2.5: bias on the q/k/v projections, no q/k norms, and no head_dim field
(head_dim = hidden / heads), so a checkpoint's head count is not written in its shapes."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from anefx.models.families.common import (
    KV_PADDING,
    RMS_EPS_DEFAULT,
    ROPE_DEFAULT,
    attention_rows,
    dense_mlp,
    kv_states,
    never_refused,
    no_experts,
    tiny,
    whole,
)
from anefx.models.family import Default, Family
from anefx.models.kv_cache import RowKVCache
from anefx.models.tensor_shapes import ShapeReader

# Qwen2 has no head_dim field (head_dim = hidden / heads), so its heads cannot be read off the
# shapes: a preset with the same shapes decides, else the first of these dividing both the q
# and the k rows (every published Qwen2/2.5 model uses 128 or 64).
HEAD_DIMS = (128, 64, 32, 16, 8)

# Qwen2 has no head_dim field (head_dim = hidden / heads) and its q/k/v projections always
# carry a bias, so neither appears here. `sliding_window` is inert: use_sliding_window is false
# and the config class then sets it to None.
_COMMON: dict[str, Any] = {
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


def published(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    window_layers: int,
    sliding_window: int,
) -> dict[str, Any]:
    """A published Qwen2.5-*-Instruct config with these shapes."""
    # The three small models tie the LM head to the embedding and keep the 151 936-token
    # vocabulary; 7B and up pad it to 152 064 and store a separate head.
    small = hidden <= 2048
    return {
        **copy.deepcopy(_COMMON),
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


# Qwen2.5-*-Instruct. The base repositories have the same shapes; they differ in eos (151643)
# and, for 14B/32B, rms_norm_eps 1e-5 and max_position_embeddings 131072.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": published(896, 24, 14, 2, 4864, window_layers=21, sliding_window=32768),
    "qwen2.5-1.5b": published(1536, 28, 12, 2, 8960, window_layers=21, sliding_window=32768),
    "qwen2.5-3b": published(2048, 36, 16, 2, 11008, window_layers=70, sliding_window=32768),
    "qwen2.5-7b": published(3584, 28, 28, 4, 18944, window_layers=28, sliding_window=131072),
    "qwen2.5-14b": published(5120, 48, 40, 8, 13824, window_layers=70, sliding_window=131072),
    "qwen2.5-32b": published(5120, 64, 40, 8, 27648, window_layers=70, sliding_window=131072),
    # Qwen2.5's layout: q/k/v bias, no q/k norms, head_dim = hidden / heads (16), tied head.
    "qwen2-tiny": {
        **tiny("qwen2", tie_word_embeddings=True),
        "architectures": ["Qwen2ForCausalLM"],
    },
}


def _heads(fields: dict[str, Any]) -> int:
    return fields["hidden_size"] // fields["_head_dim"]


def _kv_heads(fields: dict[str, Any]) -> int:
    return fields["_k_rows"] // fields["_head_dim"]


DEFAULTS = (
    ROPE_DEFAULT,
    RMS_EPS_DEFAULT,
    Default("max_position_embeddings", 32768, "published Qwen2.5-Instruct"),
    Default(
        "num_attention_heads",
        _heads,
        "hidden_size / head_dim; head_dim from a preset with the same shapes, else the first "
        f"of {', '.join(map(str, HEAD_DIMS))} dividing the q and k rows",
    ),
    Default("num_key_value_heads", _kv_heads, "k_proj rows / that head_dim"),
)


def head_dim(
    fields: Mapping[str, Any],
    presets: Mapping[str, Mapping[str, Any]] = PRESETS,
    same_shapes: tuple[str, ...] = (
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "intermediate_size",
        "tie_word_embeddings",
    ),
) -> tuple[int, str]:
    """head_dim for a checkpoint of Qwen2's attention (not a config field), and where it came
    from: a preset of PRESETS whose SAME_SHAPES fields equal those read (a field not read is
    not compared), else the rule."""
    hidden, k_rows = fields["hidden_size"], fields["_k_rows"]
    for name, preset in presets.items():
        dim = preset.get("head_dim") or preset["hidden_size"] // preset["num_attention_heads"]
        same = all(preset.get(k) == fields[k] for k in same_shapes if k in fields)
        if same and preset["num_key_value_heads"] * dim == k_rows:
            return dim, f"head_dim {dim} of preset:{name}, whose shapes these are"
    for dim in HEAD_DIMS:
        if hidden % dim == 0 and k_rows % dim == 0:
            return dim, f"assumes head_dim {dim}"
    dim = math.gcd(hidden, k_rows)
    return dim, f"assumes head_dim {dim} (gcd of the q and k rows)"


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """A q_proj bias and no q_norm in layer 0."""
    return int("self_attn.q_proj.bias" in first and "self_attn.q_norm.weight" not in first)


def infer(r: ShapeReader) -> None:
    """The q rows must be hidden_size; the head count comes from `head_dim` (the defaults)."""
    q_name, q_rows, _, k_rows = attention_rows(r)
    hidden = r.fields["hidden_size"]
    if q_rows != hidden:
        raise r.fail(f"tensor '{q_name}' has {q_rows} rows; Qwen2 needs hidden_size ({hidden})")
    r.fields["_k_rows"] = k_rows
    dense_mlp(r, required=True)
    r.fields["_head_dim"], why = head_dim(r.fields)
    r.reasons["num_attention_heads"] = r.reasons["num_key_value_heads"] = why


def attention_parameters(config: Mapping[str, Any], dim: int) -> int:
    """The q/k/v biases (always there); no q/k norms."""
    heads = config["num_attention_heads"]
    return heads * dim + 2 * (config.get("num_key_value_heads") or heads) * dim


FAMILY = Family(
    model_type="qwen2",
    order=1,
    config_class="Qwen2Config",
    model_class="Qwen2ForCausalLM",
    architectures=("Qwen2ForCausalLM",),
    required=(),
    recognise=recognise,
    sign="a q_proj bias (Qwen2)",
    refuse=never_refused,
    infer=infer,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen2-tiny",
    attention_parameters=attention_parameters,
    experts=no_experts,
    stored_parts=whole,
    states=kv_states,
    cache=RowKVCache,
    padding=KV_PADDING,
)
