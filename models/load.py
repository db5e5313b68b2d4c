"""Build a stock transformers *ForCausalLM from a checkpoint folder or a named preset.

The model always comes from transformers' own classes; this module only decides where its
weights come from (safetensors shards, seeded random values, or nothing at all on the meta
device) and turns every malformed input into a one-line AnefxInputError.

`preflight` does everything that needs neither the model nor the weights (the files located,
confined and validated, the config validated and bounded, the sizes counted); `load_model`
goes through it, or takes its result.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from anefx.models import limits
from anefx.models.checkpoint_files import (
    CONFIG_NAME,
    TensorEntry,
    check_folder,
    confined,
    confinement_root,
    input_error,
    locate_tensors,
    read_json,
)
from anefx.models.families import FAMILIES, family_of
from anefx.models.family import Family, Nested
from anefx.models.hub import resolve_model
from anefx.models.infer_config import (
    ConfigDefaultsWarning,
    InferredConfig,
    infer_from_tensors,
    text_tensors,
)
from anefx.models.messages import shown
from anefx.models.presets import count_parameters, get_preset
from anefx.models.random_weights import random_init_
from anefx.models.weights import (
    ST_FLOAT_DTYPES,
    Copy,
    checkpoint_names,
    copy_weights_,
    map_converted_,
    map_weights_,
    mappable,
    materialize_meta_,
    release_mapped_pages,
    tied_targets,
    validate_tensors,
)

__all__ = [
    "LoadedModel",
    "Preflight",
    "build_config",
    "build_meta_model",
    "check_folder",
    "checkpoint_names",
    "load_model",
    "preflight",
    "release_mapped_pages",
    "tied_targets",
]

PRESET_PREFIX = "preset:"

# what loading says once, beside its result: the tensors of a checkpoint it leaves out
_log = logging.getLogger(__name__)

# The config classes silently default these (e.g. hidden_size=4096), which would turn a broken
# config.json into a wrongly-shaped model, so they must be present.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_POSITIVE_INT_FIELDS = (
    *REQUIRED_FIELDS,
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "sliding_window",
)
# ... of which these may be null (the class then derives them: KV heads = heads, no window)
_NULLABLE_INT_FIELDS = ("num_key_value_heads", "sliding_window")
# ... of which these may be 0: Qwen2MoeConfig sets sliding_window to 0 for "no window" when
# use_sliding_window is false, and save_pretrained writes that 0
_ZERO_ALLOWED_INT_FIELDS = ("sliding_window",)
# The strict config classes check these are bools, but only after building per-layer lists;
# checked first for a message naming the field.
_BOOL_FIELDS = (
    "tie_word_embeddings",
    "attention_bias",
    "qkv_bias",
    "use_sliding_window",
    "use_cache",
    "norm_topk_prob",
    "is_encoder_decoder",
)
# field -> (lowest allowed, whether the lowest is excluded, highest allowed); None: no bound
_FLOAT_FIELDS: dict[str, tuple[float | None, bool, float | None]] = {
    "rms_norm_eps": (0.0, True, None),  # divides nothing but 0 or NaN turns RMSNorm into NaN
    "initializer_range": (0.0, False, None),
    "attention_dropout": (0.0, False, 1.0),
    "router_aux_loss_coef": (None, False, None),
}
# Keys anefx decides itself: the attention (eager) and experts implementation it lowers; a
# config.json asking for another (or a bogus one) must not reach the model class.
_DROPPED_KEYS = frozenset(
    {
        "attn_implementation",
        "_attn_implementation",
        "experts_implementation",
        "_experts_implementation",
    }
)
# How the model returns its outputs: switches for its caller, and anefx is the caller (the
# capture needs a dict of logits, no router logits, no extra outputs). A config.json saved
# during training may hold others (or anything at all): replaced, not refused.
_RUNTIME_SWITCHES = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "output_router_logits": False,
}
# Rope types transformers can compute (the Qwen rotary embedding looks its type up there).
KNOWN_ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)
# ... and those of them anefx cannot capture, with the reason
_UNLOWERED_ROPE_TYPES = {
    "longrope": "its rotary table switches between two sets of factors with the sequence "
    "length at run time, which torch.export cannot capture",
}
# rope parameter -> (lowest allowed, lowest excluded); every one must be a finite number
_ROPE_NUMBERS: dict[str, tuple[float | None, bool]] = {
    "rope_theta": (0.0, True),
    "factor": (0.0, True),
    "attention_factor": (0.0, True),
    "beta_fast": (0.0, True),  # yarn takes log(max_positions / beta): 0 or less fails
    "beta_slow": (0.0, True),
    "mscale": (0.0, True),
    "mscale_all_dim": (0.0, True),
    "low_freq_factor": (0.0, True),
    "high_freq_factor": (0.0, True),
}

LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_RAM_FRACTION = 0.8


@dataclass
class LoadedModel:
    """A transformers causal LM ready for export, plus where it came from."""

    model: PreTrainedModel
    config: PreTrainedConfig
    source: str
    random_weights: bool
    dtype: torch.dtype
    meta: bool
    plan: Preflight | None = None  # what preflight() found before the model was built


# ---------------------------------------------------------------------------------------------
# Config validation and model construction


def model_class_for(config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The transformers *ForCausalLM class for `config.model_type`."""
    return family_of(config).model_cls()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: object) -> float | None:
    """VALUE as a float if it is a JSON number (never a bool), else None. An int too large for
    a float becomes an infinity (so it fails the finiteness checks, not float())."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) < 1 << 1000 else math.copysign(math.inf, value)
    return value


def _wanted(low: float | None, open_low: bool, high: float | None) -> str:
    if low is None and high is None:
        return "a finite number"
    if low == 0 and high is None:
        return "a finite positive number" if open_low else "a finite non-negative number"
    start = "(-inf" if low is None else f"{'(' if open_low else '['}{low:g}"
    end = "inf)" if high is None else f"{high:g}]"
    return f"a finite number in {start}, {end}"


def _check_number(
    where: str, name: str, value: object, low: float | None, open_low: bool, high: float | None
) -> None:
    """Raise unless VALUE is a finite number (not a bool) above LOW (excluded if OPEN_LOW) and
    at most HIGH."""
    number = _as_float(value)
    ok = number is not None and math.isfinite(number)
    ok = ok and (low is None or (number > low if open_low else number >= low))
    ok = ok and (high is None or number <= high)
    if not ok:
        raise input_error(
            f"{where}: field '{name}' must be {_wanted(low, open_low, high)}, got {shown(value)}"
        )


def _check_quantized(raw: dict[str, Any], where: str) -> None:
    if "quantization_config" in raw:
        raise input_error(
            f"{where}: field 'quantization_config': quantized checkpoints are not supported; "
            "anefx reads float16, bfloat16 or float32 weights"
        )


def _nested_layout(model_type: object) -> tuple[Family, Nested] | None:
    """The family whose text model a config of MODEL_TYPE nests, and how (None: none)."""
    for family in FAMILIES.values():
        for layout in family.nested:
            if layout.model_type == model_type:
                return family, layout
    return None


def _class_default(class_name: str, field: str) -> Any:
    import transformers

    fields = dataclasses.fields(getattr(transformers, class_name))
    return next(f.default for f in fields if f.name == field)


def unnest_config(raw: Any, where: str) -> tuple[Any, str, tuple[str, ...]]:
    """RAW as the text model's config dict: a config nesting a family's text model (a published
    vision-language one, `Family.nested`) gives its text config, with the fields its outer
    config decides (`tie_word_embeddings`: its value, else its class default) and the family's
    model_type (a flat layout, `Nested.flat`, holds the text fields at its top level: those
    of the family's config class are taken); any other RAW is returned as it is. Also returns
    WHERE for messages about the result and the fields the config declares."""
    found = _nested_layout(raw.get("model_type")) if isinstance(raw, dict) else None
    if found is None:
        return raw, where, tuple(raw) if isinstance(raw, dict) else ()
    family, layout = found
    _check_quantized(raw, where)  # a quantization block sits in the outer config
    key = layout.text_key
    text = raw.get(key)
    if text is None and layout.flat:
        # the text model's fields at the top level, as the outer class reads them
        out = _flat_text_config(raw, family, layout)
        return out, where, tuple(k for k in out if k in raw)
    if text is None:
        raise input_error(
            f"{where}: field '{key}' missing (a '{layout.model_type}' config nests its text "
            f"model's config, '{family.model_type}', there)"
        )
    if not isinstance(text, dict):
        raise input_error(
            f"{where}: field '{key}' must be an object (the text model's config), got {shown(text)}"
        )
    inner = text.get("model_type", family.model_type)
    if inner != family.model_type:
        raise input_error(
            f"{where}: field '{key}.model_type' is {shown(inner)}; a '{layout.model_type}' "
            f"config nests a '{family.model_type}' one"
        )
    out = {**text, "model_type": family.model_type}
    for field in layout.outer_fields:
        if field in raw and field in _BOOL_FIELDS and not isinstance(raw[field], bool):
            raise input_error(
                f"{where}: field '{field}' must be true or false, got {shown(raw[field])}"
            )
        out[field] = raw[field] if field in raw else _class_default(layout.config_class, field)
        if field in layout.either and text.get(field) is True:
            out[field] = True  # the outer class forwards the text config's (pre-v5 saves)
    declared = tuple(k for k in out if k in text or k in raw)
    out.setdefault("architectures", list(family.architectures))
    return out, f"{where} ({key})", declared


def _flat_text_config(raw: dict[str, Any], family: Family, layout: Nested) -> dict[str, Any]:
    """The text config of a flat outer config: its fields of the family's config class (and
    the rope spellings and dtype), as transformers' outer class picks them; the outer fields
    as given, else the outer class's defaults."""
    fields = {f.name for f in dataclasses.fields(family.config_cls())}
    fields |= {"rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype"}
    out = {k: v for k, v in raw.items() if k in fields and k != "model_type"}
    for field in layout.outer_fields:
        out[field] = raw[field] if field in raw else _class_default(layout.config_class, field)
    out["model_type"] = family.model_type
    out["architectures"] = list(family.architectures)
    return out


def _check_keys(raw: dict[str, Any], config_cls: type, where: str) -> None:
    """Refuse keys that would overwrite a method or class setting of the config object rather
    than set a field (config.json keys become attributes), and inputs anefx cannot load."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in raw:
        if not isinstance(key, str):
            raise input_error(f"{where}: field name {shown(key)} is not a string")
        if key in fields or key == "model_type":
            continue
        static = inspect.getattr_static(config_cls, key, None)
        settable = isinstance(static, property) and static.fset is not None
        if key.startswith("__") or (static is not None and not settable):
            raise input_error(
                f"{where}: field '{key}' is not a config field (it names "
                f"{'a method' if callable(static) else 'a setting'} of {config_cls.__name__})"
            )
    _check_quantized(raw, where)
    if "per_layer_config" in raw:
        raise input_error(
            f"{where}: field 'per_layer_config': per-layer configs are not supported (Qwen "
            "layers share one config)"
        )


def _check_ints(raw: dict[str, Any], where: str) -> None:
    """Positive integers, each below its bound (limits.CONFIG_BOUNDS) before the config class
    builds anything per layer."""
    for field in _POSITIVE_INT_FIELDS:
        if field not in raw or (raw[field] is None and field in _NULLABLE_INT_FIELDS):
            continue
        value = raw[field]
        zero = field in _ZERO_ALLOWED_INT_FIELDS
        if not _is_int(value) or value < (0 if zero else 1):
            what = "a non-negative" if zero else "a positive"
            raise input_error(
                f"{where}: field '{field}' must be {what} integer, got {shown(value)}"
            )
    for field, (bound, name) in limits.CONFIG_BOUNDS.items():
        value = raw.get(field)
        if _is_int(value) and value > bound:
            raise input_error(
                f"{where}: field '{field}' is {shown(value)}, above the bound {bound} "
                f"(anefx.models.limits.{name})"
            )
    labels = raw.get("num_labels")
    if labels is not None and (not _is_int(labels) or not 0 <= labels <= limits.MAX_LABELS):
        # transformers builds an id2label entry per label
        raise input_error(
            f"{where}: field 'num_labels' must be an integer in [0, {limits.MAX_LABELS}] "
            f"(anefx.models.limits.MAX_LABELS), got {shown(labels)}"
        )
    if "max_window_layers" in raw and not _is_int(raw["max_window_layers"]):
        raise input_error(
            f"{where}: field 'max_window_layers' must be an integer, got "
            f"{shown(raw['max_window_layers'])}"
        )


def _check_fields(raw: dict[str, Any], where: str) -> None:
    """Bools, numbers, the activation, the dtype and the per-layer lists."""
    pad = raw.get("pad_token_id")
    if pad is not None and (not _is_int(pad) or not 0 <= pad < raw["vocab_size"]):
        # the embedding takes it as its padding row
        raise input_error(
            f"{where}: field 'pad_token_id' must be a token id below vocab_size "
            f"({raw['vocab_size']}) or null, got {shown(pad)}"
        )
    for field in _BOOL_FIELDS:
        if field in raw and not isinstance(raw[field], bool):
            raise input_error(
                f"{where}: field '{field}' must be true or false, got {shown(raw[field])}"
            )
    for field, (low, open_low, high) in _FLOAT_FIELDS.items():
        if field in raw:
            _check_number(where, field, raw[field], low, open_low, high)
    act = raw.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise input_error(
            f"{where}: field 'hidden_act' is {shown(act)}, not an activation transformers "
            "knows (e.g. 'silu', 'gelu')"
        )
    for field in ("dtype", "torch_dtype"):
        value = raw.get(field)
        if value is None or isinstance(value, torch.dtype):  # the latter from Python callers
            continue
        # transformers turns the string into getattr(torch, value): only a dtype's name may pass
        if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
            raise input_error(
                f"{where}: field '{field}' is {shown(value)}, not a torch dtype name "
                "(e.g. 'bfloat16')"
            )
    layers = raw["num_hidden_layers"]
    kinds = raw.get("layer_types")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != layers):
        got = f"{len(kinds)} entries" if isinstance(kinds, list) else shown(kinds)
        raise input_error(
            f"{where}: field 'layer_types' must list one entry per layer ({layers}), got {got}"
        )
    dense = raw.get("mlp_only_layers")
    if dense is not None:
        if not isinstance(dense, list):
            raise input_error(
                f"{where}: field 'mlp_only_layers' must be a list of layer indices, got "
                f"{shown(dense)}"
            )
        bad = [i for i in dense if not _is_int(i) or not 0 <= i < layers]
        if bad:
            raise input_error(
                f"{where}: field 'mlp_only_layers' holds {shown(bad[0])}, not a layer index "
                f"(0..{layers - 1})"
            )


def _head_dim(raw: dict[str, Any], config_cls: type) -> tuple[int, str]:
    """The head_dim the model will use and the field it comes from."""
    if raw.get("head_dim") is not None:
        return raw["head_dim"], "head_dim"
    fields = dataclasses.fields(config_cls)
    default = next((f.default for f in fields if f.name == "head_dim"), None)
    if _is_int(default):
        return default, "head_dim"  # Qwen3Config defaults it to 128
    return raw["hidden_size"] // raw["num_attention_heads"], "hidden_size / num_attention_heads"


def _check_rope(raw: dict[str, Any], where: str, head_dim: int, partial_rotary: bool) -> None:
    """The rope parameters in either spelling, as transformers will read them.

    transformers takes `rope_scaling` (legacy) if set, else `rope_parameters`; the theta from
    there, else the top-level `rope_theta`; the type from `rope_type`, else `type`. An unknown
    type or a bad number would fail (or silently give NaN tables) when the model is built. A
    partial rotary factor is refused unless the family rotates part of each head
    (`Family.partial_rotary`), whose factor must lie in (0, 1].
    """
    spelled = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(spelled)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise input_error(
            f"{where}: field '{spelled}' must be an object (rope_type, rope_theta, ...), got "
            f"{shown(params)}"
        )
    nested = [k for k, v in params.items() if isinstance(v, dict)]
    if nested:
        raise input_error(
            f"{where}: field '{spelled}.{nested[0]}': per-layer-type rope parameters are not "
            "supported (Qwen layers share one rotary embedding)"
        )
    if "rope_theta" in raw:
        _check_number(where, "rope_theta", raw["rope_theta"], 0.0, True, limits.MAX_ROPE_THETA)
    for key, (low, open_low) in _ROPE_NUMBERS.items():
        if params.get(key) is not None or (key == "rope_theta" and key in params):
            high = limits.MAX_ROPE_THETA if key == "rope_theta" else limits.MAX_ROPE_SCALE
            _check_number(where, f"{spelled}.{key}", params[key], low, open_low, high)
    kind_key = "rope_type" if "rope_type" in params else "type"
    kind = params.get(kind_key, "default")
    if not isinstance(kind, str) or kind not in KNOWN_ROPE_TYPES:
        raise input_error(
            f"{where}: field '{spelled}.{kind_key}' is {shown(kind)}, not a rope type "
            f"transformers knows ({', '.join(KNOWN_ROPE_TYPES)})"
        )
    if kind in _UNLOWERED_ROPE_TYPES:
        raise input_error(
            f"{where}: field '{spelled}.{kind_key}' is '{kind}', which anefx does not lower: "
            f"{_UNLOWERED_ROPE_TYPES[kind]}"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial is not None and partial_rotary:
        _check_number(where, "partial_rotary_factor", partial, 0.0, True, 1.0)
    elif partial is not None and partial != 1:
        # Qwen attention rotates the whole head; a partial rotary table would not fit it
        raise input_error(
            f"{where}: field 'partial_rotary_factor' is {shown(partial)}; Qwen models rotate "
            "the whole head (1.0)"
        )
    if head_dim % 2 or (kind == "dynamic" and head_dim <= 2):
        # the tables hold head_dim / 2 frequencies (dynamic rope divides by head_dim - 2)
        raise input_error(
            f"{where}: head_dim {head_dim} does not suit rope type '{kind}' (it must be even"
            + (" and above 2)" if kind == "dynamic" else ")")
        )
    original = params.get("original_max_position_embeddings")
    if original is not None and (not _is_int(original) or not 0 < original <= limits.MAX_POSITIONS):
        raise input_error(
            f"{where}: field '{spelled}.original_max_position_embeddings' must be a positive "
            f"integer up to {limits.MAX_POSITIONS}, got {shown(original)}"
        )
    low, high = params.get("low_freq_factor"), params.get("high_freq_factor")
    if kind == "llama3" and low is not None and high is not None and not high > low:
        raise input_error(
            f"{where}: field '{spelled}.high_freq_factor' ({shown(high)}) must exceed "
            f"'low_freq_factor' ({shown(low)})"
        )
    if "truncate" in params and not isinstance(params["truncate"], bool):
        raise input_error(
            f"{where}: field '{spelled}.truncate' must be true or false, got "
            f"{shown(params['truncate'])}"
        )


def _check_rotary_width(config: PreTrainedConfig, where: str, head_dim: int) -> None:
    """The rotated part of each head (head_dim x the factor the config class settled on, its
    default when none is given) holds pairs: an even width of at least 2."""
    factor = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    width = int(head_dim * factor)
    if width < 2 or width % 2:
        raise input_error(
            f"{where}: field 'partial_rotary_factor' ({factor:g}) rotates {width} of the "
            f"{head_dim} dimensions of each head; the rotated width must be even and at least 2"
        )


def build_config(raw: dict[str, Any], where: str = "config") -> PreTrainedConfig:
    """Validate a config dict and build its transformers config class, set to eager attention.

    Every field the model reads is checked (types, finite and positive numbers, known rope
    type and activation, the bounds in models/limits.py, the family's own checks) before the
    config class runs, so a malformed or hostile config ends in one AnefxInputError naming the
    field, and nothing is allocated from it. `where` names the source (a config.json path or
    "preset:NAME"). A config nesting a family's text model (a published vision-language one)
    gives that text model's config (`unnest_config`).
    """
    if not isinstance(raw, dict):
        raise input_error(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw, where, _ = unnest_config(raw, where)
    family = family_of(raw, where)
    raw = family.legacy_config(raw)
    config_cls = family.config_cls()
    _check_keys(raw, config_cls, where)
    # a field the family's class does not have is not required (Qwen3.5-MoE has no dense MLP
    # width)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    required = [(f,) for f in REQUIRED_FIELDS if f in fields] + list(family.required)
    for spellings in required:
        if not any(f in raw for f in spellings):
            raise input_error(
                f"{where}: field '{spellings[0]}' missing (needed by {config_cls.__name__})"
            )
    _check_ints(raw, where)
    _check_fields(raw, where)
    problem = family.check_config(raw)
    if problem:
        raise input_error(f"{where}: {problem}")
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or 0
    if kv_heads and heads % kv_heads:
        raise input_error(
            f"{where}: field 'num_attention_heads' ({heads}) must be a multiple of "
            f"'num_key_value_heads' ({kv_heads})"
        )
    head_dim, head_from = _head_dim(raw, config_cls)
    if head_dim < 1:
        raise input_error(
            f"{where}: {head_from} is {head_dim}: num_attention_heads ({heads}) exceeds "
            f"hidden_size ({raw['hidden_size']})"
        )
    _check_rope(raw, where, head_dim, family.partial_rotary)

    experts = raw.get("num_experts", raw.get("num_local_experts"))
    top_k = raw.get("num_experts_per_tok")
    if experts is not None and top_k is not None and top_k > experts:
        raise input_error(
            f"{where}: field 'num_experts_per_tok' ({top_k}) exceeds 'num_experts' ({experts})"
        )

    kwargs = {k: v for k, v in raw.items() if k != "model_type" and k not in _DROPPED_KEYS}
    kwargs.update({k: v for k, v in _RUNTIME_SWITCHES.items() if k in kwargs})
    for field in ("rms_norm_eps", "initializer_range", "router_aux_loss_coef"):
        if _is_int(kwargs.get(field)):  # JSON may write 0.0 as 0; the strict class wants a float
            kwargs[field] = float(kwargs[field])
    try:
        config = config_cls(**kwargs)
    except Exception as exc:  # the strict config dataclasses raise several error types
        raise input_error(f"{where}: invalid config: {exc}") from exc
    # Eager attention is plain matmul/softmax with an additive mask, the form we lower; it
    # takes a prepared (B, 1, S, S) float mask as is.
    config._attn_implementation = "eager"
    if family.partial_rotary:
        _check_rotary_width(config, where, head_dim)
    # Sliding-window attention limits each query to the last `sliding_window` keys through the
    # mask transformers builds; the capture passes its own causal mask, so the lowered graph
    # would attend to every key: a silently different model. Refused until a pass lowers it.
    kinds = getattr(config, "layer_types", None)
    if kinds is None and getattr(config, "use_sliding_window", False):
        # Qwen3-MoE has no per-layer list: the window (if set) applies to every layer
        window = "sliding_attention" if config.sliding_window else "full_attention"
        kinds = [window] * config.num_hidden_layers
    sliding = [i for i, kind in enumerate(kinds or []) if kind == "sliding_attention"]
    if sliding:
        raise input_error(
            f"{where}: field 'use_sliding_window' is true and layers {sliding[0]}.."
            f"{sliding[-1]} use sliding-window attention (window {config.sliding_window}), which "
            "anefx does not lower (its causal mask would see every earlier token); published "
            "Qwen2/Qwen2.5 configs set it false"
        )
    params = count_config_parameters(config)
    if params > limits.MAX_PARAMETERS:
        raise input_error(
            f"{where}: the config describes {params:,} parameters, above the bound "
            f"{limits.MAX_PARAMETERS:,} (anefx.models.limits.MAX_PARAMETERS)"
        )
    return config


def count_config_parameters(config: PreTrainedConfig) -> int:
    """The parameter count of the model CONFIG builds (tied weights once), from the config alone
    (presets.count_parameters over the fields the model class reads)."""
    fields = {
        "model_type": config.model_type,
        "head_dim": getattr(config, "head_dim", None),
        "num_experts": getattr(config, "num_experts", 0),
    }
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "num_hidden_layers",
        "attention_bias",
        "tie_word_embeddings",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "qkv_bias",
        "decoder_sparse_step",
        "mlp_only_layers",
        # a hybrid's linear-attention layers (Family.linear_attention)
        "layer_types",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_conv_kernel_dim",
        # what the family's other_parameters reads
        *family_of(config).parameter_fields,
    ):
        if getattr(config, key, None) is not None:
            fields[key] = getattr(config, key)
    return count_parameters(fields)


def build_meta_model(config: PreTrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """Construct the family's *ForCausalLM on the meta device with parameters in `dtype`.

    Mirrors transformers' own loading: the default dtype is switched rather than casting the
    model afterwards, so the RoPE buffers (created with an explicit float32 dtype) stay float32.
    """
    model_cls = model_class_for(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(config)
    except (ValueError, TypeError, KeyError, ArithmeticError, RuntimeError) as exc:
        # the config passed build_config; whatever the model class still refuses is the
        # config's fault too, and must not surface as a traceback
        raise input_error(f"config: transformers cannot build the model: {exc}") from exc
    finally:
        torch.set_default_dtype(previous)
    return model


def materialize_(model: PreTrainedModel) -> PreTrainedModel:
    """Give a meta model real (uninitialised) CPU storage and restore its weight ties."""
    model.to_empty(device="cpu")
    # to_empty replaces each module's parameter separately, which silently unties lm_head
    # from embed_tokens.
    model.tie_weights()
    return model


def reset_rotary_(model: PreTrainedModel) -> None:
    """Recompute RoPE buffers (garbage after to_empty) and integer tables derived from the
    config (no checkpoint's to load: weights.checkpoint_names) with transformers' own
    initialisation.

    This is the same `_init_weights` path `from_pretrained` uses for non-persistent buffers.
    """
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "inv_freq"):
            model._init_weights(module)
        elif any(
            not b.is_floating_point() and not b.is_complex() for b in module.buffers(recurse=False)
        ):
            # integer tables derived from the config (Qwen4-Exp's n-gram hashing), no weights:
            # transformers' own initialisation computes them, as from_pretrained does
            model._init_weights(module)


# ---------------------------------------------------------------------------------------------
# Preflight: everything that needs neither the model nor the weights


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in LOADABLE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in LOADABLE_DTYPES)
        raise input_error(f"dtype {dtype} not supported; use one of {names}")


def _config_dtype(config: PreTrainedConfig) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    return dtype if dtype in LOADABLE_DTYPES else None


def _resolve_dtype(
    dtype: torch.dtype | None,
    config: PreTrainedConfig,
    tensors: dict[str, TensorEntry] | None,
) -> torch.dtype:
    """DTYPE, else the config's, else (a folder) the first stored float tensor's, else bf16 for
    a preset (as published) or fp32."""
    if dtype is not None:
        return dtype
    dtype = _config_dtype(config)
    if dtype is not None:
        return dtype
    if tensors is None:
        return torch.bfloat16
    found = (ST_FLOAT_DTYPES.get(e.dtype) for e in tensors.values())
    return next((d for d in found if d is not None), torch.float32)


@dataclass(frozen=True, eq=False)
class Preflight:
    """What `preflight` found: everything known about a model before it is built.

    No weight is read or allocated for it. `load_model(plan)` builds the model from it
    without reading the config or any header again.
    """

    source: str  # the folder as given (a hub id: its snapshot folder), or "preset:NAME"
    config: PreTrainedConfig  # validated and bounded, eager attention
    dtype: torch.dtype  # the dtype load_model(plan) builds in
    parameters: int  # of the model, tied weights counted once
    origin: str  # "config.json", "preset" or "inferred" (from tensor shapes)
    declared: tuple[str, ...] = ()  # the fields config.json or the preset sets
    folder: Path | None = None  # the resolved checkpoint folder; None for a preset
    root: Path | None = None  # where its files may resolve: the folder, or an HF cache repo
    tensors: dict[str, TensorEntry] | None = None  # stored tensor -> where; None for a preset
    inferred: InferredConfig | None = None  # origin "inferred": the fields and defaults
    # what loading leaves out (a vision tower's tensors ...), said once when the model is loaded
    notes: tuple[str, ...] = ()

    @property
    def random_weights(self) -> bool:
        """A preset: seeded random weights, no files."""
        return self.folder is None

    @property
    def protected(self) -> tuple[Path, ...]:
        """The folders anefx must never write into: the checkpoint folder and the folder its
        files resolve into (the repository of a Hugging Face cache snapshot); () for a preset."""
        return tuple(dict.fromkeys(p for p in (self.folder, self.root) if p is not None))

    def bytes_at(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the model's weights in DTYPE (default: the plan's)."""
        return self.parameters * (dtype or self.dtype).itemsize

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as load_model(plan) holds them (in `dtype`)."""
        return self.bytes_at(self.dtype)

    @property
    def stored_bytes(self) -> int | None:
        """Bytes of the tensors stored in the checkpoint files; None for a preset."""
        return None if self.tensors is None else sum(e.nbytes for e in self.tensors.values())

    def with_dtype(self, dtype: torch.dtype | None) -> Preflight:
        """This plan for loading in DTYPE (None: the checkpoint's own); nothing is re-read."""
        _check_dtype(dtype)
        return dataclasses.replace(self, dtype=_resolve_dtype(dtype, self.config, self.tensors))


def _layer_span(named: set[int], layers_path: str) -> str:
    if not named:
        return f"no '{layers_path}.<i>.*' tensor"
    low, high = min(named), max(named)
    if len(named) == high - low + 1:
        return f"tensors for layers {low}..{high} only"
    return f"tensors for {len(named)} layers between {low} and {high}"


def _check_layers(
    config: PreTrainedConfig, tensors: dict[str, TensorEntry], where: str, folder: Path
) -> None:
    """The stored tensors name every layer the config declares: checked on names alone, before
    a model of that many layers is built."""
    layers = config.num_hidden_layers
    family = family_of(config)
    named = {i for name in tensors if (i := family.layer_index(name)) is not None}
    missing = next((i for i in range(layers) if i not in named), None)
    if missing is not None:
        span = _layer_span(named, family.layers_path)
        raise input_error(
            f"{where}: num_hidden_layers is {layers} but {folder} holds {span} "
            f"(no tensor '{family.layers_path}.{missing}.*')"
        )


def preflight(spec: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Preflight:
    """Validate checkpoint folder, "preset:NAME" or hub id ("ORG/NAME[@REVISION]", its snapshot
    in the local Hugging Face cache: `models.hub.resolve_model`, never downloaded) SPEC without
    building the model or reading a weight: raise AnefxInputError (one line naming the file,
    field or tensor) if anything is wrong, else return what `load_model` needs.

    For a folder: every file it opens is confined to the folder (a Hugging Face cache snapshot:
    to its repository), config.json is validated and bounded before any safetensors header is
    read, every safetensors file is validated by the safetensors library, and the tensors must
    name every declared layer. DTYPE is the dtype to load in (None: the config's, else the
    stored tensors'); `plan.weight_bytes` is the weights' size in it, `plan.bytes_at(d)` in
    any other. Use:

        plan = preflight(path, dtype=torch.float16)  # cheap: headers and config only
        ...  # check the output path against plan.protected, the disk against plan.weight_bytes
        loaded = load_model(plan)  # builds in plan.dtype; nothing is read twice
    """
    _check_dtype(dtype)
    # a hub id becomes its cached snapshot folder (the source from here on); paths and presets
    # come back as given
    spec_str = resolve_model(spec)
    if spec_str.startswith(PRESET_PREFIX):
        raw = get_preset(spec_str[len(PRESET_PREFIX) :])
        config = build_config(raw, spec_str)
        return Preflight(
            spec_str,
            config,
            _resolve_dtype(dtype, config, None),
            count_config_parameters(config),
            "preset",
            tuple(raw),
        )

    folder = Path(spec_str)
    check_folder(folder)
    root = confinement_root(folder)
    config_path = folder / CONFIG_NAME
    inferred = None
    if os.path.lexists(config_path):
        raw = read_json(confined(folder, CONFIG_NAME, str(config_path), root), config_path)
        # the config first: a bad one is refused before any header is read (a nested one, as
        # its text model's)
        raw, where, declared = unnest_config(raw, str(config_path))
        config = build_config(raw, where)
        located = locate_tensors(folder, root)
        origin = "config.json"
    else:
        # Without config.json the tensor shapes give the config; what they cannot tell comes
        # from the defaults table (load_model names those fields in one warning).
        located = locate_tensors(folder, root)
        inferred = infer_from_tensors(located, str(folder))
        where = f"{folder} (config inferred from tensor shapes)"
        config = build_config(inferred.config, where)
        origin, declared = "inferred", ()
    tensors, note = _text_tensors(config, located, folder)
    _check_layers(config, tensors, where, folder)
    return Preflight(
        str(folder),
        config,
        _resolve_dtype(dtype, config, tensors),
        count_config_parameters(config),
        origin,
        declared,
        Path(os.path.realpath(folder)),
        root,
        tensors,
        inferred,
        (note,) if note else (),
    )


def _text_tensors(
    config: PreTrainedConfig, located: dict[str, TensorEntry], folder: Path
) -> tuple[dict[str, TensorEntry], str | None]:
    """The located tensors as the family's text model names them (a nested layout's renamed,
    each entry keeping its name in the file), and the note on those left out."""
    text = text_tensors(family_of(config), located, str(folder))
    tensors = {
        name: dataclasses.replace(entry, stored=text.stored[name]) if name in text.stored else entry
        for name, entry in text.tensors.items()
    }
    return tensors, text.note(str(folder))


def check_tensors(plan: Preflight, model: PreTrainedModel) -> list[Copy]:
    """Check every tensor MODEL (built from PLAN's config) needs is stored with its shape and a
    float dtype; returns the copy plan. No tensor data is read."""
    assert plan.tensors is not None, "a preset has no stored tensors"
    return validate_tensors(
        Path(plan.source),
        plan.tensors,
        model.state_dict(),
        checkpoint_names(model),
        family_of(model.config).stored_parts,
    )


# ---------------------------------------------------------------------------------------------
# Loading


def _total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _human_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _check_fits(plan: Preflight, what: str) -> None:
    need = plan.weight_bytes
    ram = _total_ram_bytes()
    if ram is not None and need > _RAM_FRACTION * ram:
        name = str(plan.dtype).removeprefix("torch.")
        raise input_error(
            f"{plan.source}: {what} {name} weights need {_human_bytes(need)} but this machine "
            f"has {_human_bytes(ram)} of RAM; use --meta to build the structure only"
        )


def _finish(model: PreTrainedModel, plan: Preflight, meta: bool) -> LoadedModel:
    model.config.dtype = plan.dtype
    model.eval()
    return LoadedModel(
        model, model.config, plan.source, plan.random_weights, plan.dtype, meta, plan
    )


def _load_preset(plan: Preflight, meta: bool, seed: int) -> LoadedModel:
    if not meta:
        _check_fits(plan, "random")  # from the config: before anything is built
    # a copy: the model owns its config (and _finish sets its dtype), the plan stays as found
    model = build_meta_model(copy.deepcopy(plan.config), plan.dtype)
    if not meta:
        materialize_(model)
        random_init_(model, seed)
        reset_rotary_(model)
    return _finish(model, plan, meta)


def _load_folder(plan: Preflight, meta: bool) -> LoadedModel:
    located, dtype = plan.tensors, plan.dtype
    assert located is not None
    if plan.inferred is not None:
        warnings.warn(plan.inferred.warning_text(plan.source), ConfigDefaultsWarning, stacklevel=3)
    for note in plan.notes:
        _log.warning(note)
    model = build_meta_model(copy.deepcopy(plan.config), dtype)
    copies = check_tensors(plan, model)
    if not meta:
        in_place = [c for c in copies if mappable(located[c[2]], c[1], dtype)]
        map_weights_(model, located, in_place)
        # another dtype, or experts stored apart: cast / assembled into a scratch file, mapped
        rest = map_converted_(model, located, [c for c in copies if c not in in_place], dtype)
        if rest:
            _check_fits(plan, "the")
        materialize_meta_(model)  # storage for what is left and for the rotary buffers
        model.tie_weights()
        copy_weights_(model, located, rest)
        reset_rotary_(model)
    return _finish(model, plan, meta)


def load_model(
    spec: str | os.PathLike[str] | Preflight,
    dtype: torch.dtype | None | EllipsisType = ...,
    meta: bool = False,
    seed: int = 0,
) -> LoadedModel:
    """Load a checkpoint folder or "preset:NAME" into the stock transformers causal LM.

    SPEC is a folder, "preset:NAME", or the Preflight that `preflight(spec, dtype)` returned:
    then its validated config and located tensors are used as they are (nothing is read
    twice) and the model is built in the plan's dtype:

        plan = preflight(path, dtype=torch.float16)
        loaded = load_model(plan, meta=False)

    DTYPE defaults to float16 for a spec and to the plan's dtype for a Preflight; None keeps
    the checkpoint's own dtype. A folder without config.json gets the config its tensor shapes
    give (models/infer_config.py), with one ConfigDefaultsWarning naming the fields set to
    defaults. Experts stored per expert (as published) or fused (E, ...) both load. meta=True
    builds the structure only, on the meta device. Presets get seeded random weights
    (`seed`). Bad input raises AnefxInputError.
    """
    if isinstance(spec, Preflight):
        plan = spec if dtype is ... or dtype == spec.dtype else spec.with_dtype(dtype)
    else:
        plan = preflight(spec, torch.float16 if dtype is ... else dtype)
    if plan.random_weights:
        return _load_preset(plan, meta, seed)
    return _load_folder(plan, meta)
