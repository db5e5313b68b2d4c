"""Qwen3.5's published shapes and checkpoint layouts: presets, the checks of a hybrid config,
recognition from tensor names, config inference from tensor shapes, parameter counts.

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
import dataclasses
from collections.abc import Mapping
from typing import Any

from anefx.models.families.common import dense_mlp, mrope_sections, tiny
from anefx.models.family import Default, Nested
from anefx.models.limits import MAX_HEAD_DIM, MAX_HEADS
from anefx.models.messages import shown
from anefx.models.tensor_shapes import ShapeReader

LINEAR = "linear_attention"
FULL = "full_attention"
KINDS = (LINEAR, FULL)

# Shared by every published Qwen3.5 text model (the `text_config` of the published config.json
# files); only the shapes differ.
_COMMON: dict[str, Any] = {
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


def every_fourth(layers: int) -> list[str]:
    """[linear, linear, linear, full] repeated: transformers' default (full_attention_interval 4)
    and every published Qwen3.5."""
    return [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(layers)]


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
        **copy.deepcopy(_COMMON),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "layer_types": every_fourth(layers),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "linear_num_value_heads": linear_value_heads,
        "intermediate_size": intermediate,
        "tie_word_embeddings": tied,
    }


def _tiny(**fields: Any) -> dict[str, Any]:
    """The shared tiny shapes with Qwen3.5's fields (no sliding-window fields: the class has
    none)."""
    cfg = {
        **tiny(
            "qwen3_5_text",
            num_hidden_layers=4,
            head_dim=32,
            linear_conv_kernel_dim=4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
            },
            **fields,
        ),
        "architectures": ["Qwen3_5ForCausalLM"],
    }
    for key in ("max_window_layers", "use_sliding_window", "sliding_window"):
        cfg.pop(key)
    return cfg


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3.5-0.8b": published(1024, 24, 8, 2, 16, intermediate=3584, tied=True),
    # Assumed: heads 8 / 2 and linear 16 / 16 as the 0.8B (hidden, layers and MLP as published).
    "qwen3.5-2b": published(2048, 24, 8, 2, 16, intermediate=6144, tied=True),
    "qwen3.5-4b": published(2560, 32, 16, 4, 32, intermediate=9216, tied=True),
    "qwen3.5-9b": published(4096, 32, 16, 4, 32, intermediate=12288, tied=False),
    "qwen3.5-27b": published(5120, 64, 24, 4, 48, intermediate=17408, tied=False),
    # More value heads than key heads, dk != dv, full attention at an irregular place, a
    # partial rotary of 0.25 with text-mode mrope sections (summing to rotary_dim / 2).
    "qwen3.5-tiny": _tiny(
        tie_word_embeddings=True,
        layer_types=[LINEAR, LINEAR, FULL, LINEAR],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
    ),
    # The published arrangement in small: [L, L, L, F], Hv == Hk, dk == dv, an untied head.
    "qwen3.5-tiny-untied": _tiny(
        tie_word_embeddings=False,
        layer_types=every_fourth(4),
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
}

# The published vision-language layout, read as its text model: transformers' composite
# Qwen3_5ForConditionalGeneration ties its head by the outer config's tie_word_embeddings
# (default false), whatever the nested text_config says, and saves lm_head.weight exactly when
# that is false (AutoModelForCausalLM instead reads the text_config's flag, and so builds a
# random head for a checkpoint tied only by the outer flag).
NESTED = Nested(
    model_type="qwen3_5",
    config_class="Qwen3_5Config",
    text_key="text_config",
    outer_fields=("tie_word_embeddings",),
    stored_prefix="model.language_model.",
    model_prefix="model.",
)
DROPPED: tuple[tuple[str, str], ...] = (
    ("model.visual.", "of the vision tower"),
    ("mtp.", "of multi-token prediction"),
)

# Qwen3_5TextConfig would give the linear-attention heads the 9B's shapes (16 x 128 keys, 32 x
# 128 values) when a config leaves them out; every published config states them. (Its other
# defaults, head_dim 256 and conv kernel 4, are every published model's.)
REQUIRED: tuple[tuple[str, ...], ...] = (
    ("linear_num_key_heads",),
    ("linear_num_value_heads",),
    ("linear_key_head_dim",),
    ("linear_value_head_dim",),
)

# the linear-attention fields: (field, upper bound, the bound's name in models/limits.py)
_LINEAR_INTS = (
    ("linear_num_key_heads", MAX_HEADS, "MAX_HEADS"),
    ("linear_num_value_heads", MAX_HEADS, "MAX_HEADS"),
    ("linear_key_head_dim", MAX_HEAD_DIM, "MAX_HEAD_DIM"),
    ("linear_value_head_dim", MAX_HEAD_DIM, "MAX_HEAD_DIM"),
    ("linear_conv_kernel_dim", None, ""),
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def class_default(field: str) -> Any:
    """Qwen3_5TextConfig's default for FIELD (what a config dict without it gets)."""
    import transformers

    fields = dataclasses.fields(transformers.Qwen3_5TextConfig)
    return next(f.default for f in fields if f.name == field)


def _field(config: Mapping[str, Any], field: str) -> Any:
    value = config.get(field)
    return class_default(field) if value is None else value


def kinds_of(config: Mapping[str, Any]) -> list[str]:
    """Each layer's kind: `layer_types`, else transformers' rule (every
    `full_attention_interval`-th layer full, 4 by default)."""
    kinds = config.get("layer_types")
    if kinds is not None:
        return list(kinds)
    interval = config.get("full_attention_interval") or 4
    return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(config["num_hidden_layers"])]


def check_config(raw: Mapping[str, Any]) -> str | None:
    """What a Qwen3.5 config needs beyond the shared checks (which already hold the list
    lengths and the shared integers): linear-attention sizes the layer can be built with, known
    layer kinds, a readable mrope section. Returns why it is refused, or None."""
    for field, bound, name in _LINEAR_INTS:
        if field not in raw:
            continue
        value = raw[field]
        if not _is_int(value) or value <= 0:
            return f"field '{field}' must be a positive integer, got {shown(value)}"
        if bound is not None and value > bound:
            return (
                f"field '{field}' is {value}, above the bound {bound} (anefx.models.limits.{name})"
            )
    kernel = _field(raw, "linear_conv_kernel_dim")
    if kernel < 2:
        return (
            f"field 'linear_conv_kernel_dim' is {kernel}: the conv window a linear-attention "
            "layer carries from call to call holds kernel - 1 inputs, so the kernel must be at "
            "least 2 (published: 4)"
        )
    key_heads = _field(raw, "linear_num_key_heads")
    value_heads = _field(raw, "linear_num_value_heads")
    if value_heads % key_heads:
        return (
            f"field 'linear_num_value_heads' ({value_heads}) must be a multiple of "
            f"'linear_num_key_heads' ({key_heads}): each key head serves a whole number of "
            "value heads"
        )
    kinds = raw.get("layer_types")
    if kinds is not None:
        for i, kind in enumerate(kinds):
            if kind not in KINDS:
                return (
                    f"field 'layer_types' holds {shown(kind)} for layer {i}; a Qwen3.5 layer is "
                    f"'{LINEAR}' or '{FULL}'"
                )
    elif "full_attention_interval" in raw:
        interval = raw["full_attention_interval"]
        if not _is_int(interval) or interval <= 0:
            return (
                f"field 'full_attention_interval' must be a positive integer, got {shown(interval)}"
            )
    spelled = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(spelled)
    if isinstance(params, Mapping):
        # the text rotary indexes the sections (transformers' recomposition_frequencies)
        section = params.get("mrope_section")
        if section is not None and not (
            isinstance(section, list)
            and len(section) == 3
            and all(_is_int(s) and 0 <= s <= MAX_HEAD_DIM for s in section)
        ):
            return (
                f"field '{spelled}.mrope_section' must list three non-negative integers, got "
                f"{shown(section)}"
            )
        interleaved = params.get("mrope_interleaved")
        if interleaved is not None and not isinstance(interleaved, bool):
            return (
                f"field '{spelled}.mrope_interleaved' must be true or false, got "
                f"{shown(interleaved)}"
            )
    return None


# ---------------------------------------------------------------------------------------------
# Recognition and inference from tensor names and shapes


def _has(suffixes: frozenset[str], prefix: str) -> bool:
    return any(s.startswith(prefix) for s in suffixes)


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Linear-attention tensors in some layer: above dense Qwen3 (whose q_norm a full layer
    also carries) and Qwen3-MoE."""
    return 3 if _has(suffixes, "linear_attn.") else 0


def refuse(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    """Other hybrids with linear attention: Qwen3-Next's fused projections, expert blocks."""
    if not _has(suffixes, "linear_attn."):
        return None
    if _has(suffixes, "linear_attn.in_proj_qkvz") or _has(suffixes, "linear_attn.in_proj_ba"):
        return (
            "fused linear_attn.in_proj_qkvz / in_proj_ba tensors (Qwen3-Next) are not a "
            "supported family; Qwen3.5 stores in_proj_qkv, in_proj_z, in_proj_b, in_proj_a"
        )
    if (
        _has(suffixes, "mlp.experts.")
        or _has(suffixes, "mlp.gate.")
        or _has(suffixes, "mlp.shared")
    ):
        return (
            "linear attention with expert tensors (Qwen3.5-MoE, Qwen3-Next) is not a supported "
            "family; only the dense Qwen3.5 hybrids are"
        )
    return None


def _kinds(r: ShapeReader) -> list[str]:
    """Each layer's kind, from which tensors it holds."""
    kinds = []
    for i in range(len(r.layers)):
        linear = _has(frozenset(r.layers[i]), "linear_attn.")
        full = _has(frozenset(r.layers[i]), "self_attn.")
        if linear == full:
            both = "both linear_attn.* and" if linear else "neither linear_attn.* nor"
            raise r.fail(
                f"layer {i} ('{r.layer_tensor(i, '*')}') has {both} self_attn.* tensors; a "
                "Qwen3.5 layer holds one of them"
            )
        kinds.append(LINEAR if linear else FULL)
    return kinds


def _expect(r: ShapeReader, name: str, shape: tuple[int, ...], want: tuple[int, ...], why: str):
    if shape != want:
        raise r.fail(f"tensor '{name}' has shape {list(shape)}, expected {list(want)} ({why})")


def _linear(r: ShapeReader, layer: int) -> None:
    """The linear-attention fields from LAYER's tensors: value heads from A_log, the value head
    dim from the gated norm, the conv kernel from conv1d, and the width q and k take in
    in_proj_qkv (2 Hk dk rows beside Hv dv)."""
    hidden = r.fields["hidden_size"]

    def tensor(suffix: str, rank: int) -> tuple[str, tuple[int, ...]]:
        name = r.layer_tensor(layer, f"linear_attn.{suffix}")
        return name, r.get(name, rank)

    _, (value_heads,) = tensor("A_log", 1)
    _, (value_dim,) = tensor("norm.weight", 1)
    values = value_heads * value_dim
    name, shape = tensor("dt_bias", 1)
    _expect(r, name, shape, (value_heads,), "value heads, as A_log")
    name, shape = tensor("in_proj_z.weight", 2)
    _expect(r, name, shape, (values, hidden), "value heads x value head dim, hidden_size")
    for gate in ("in_proj_b.weight", "in_proj_a.weight"):
        name, shape = tensor(gate, 2)
        _expect(r, name, shape, (value_heads, hidden), "value heads, as A_log; hidden_size")
    name, shape = tensor("out_proj.weight", 2)
    _expect(r, name, shape, (hidden, values), "hidden_size, value heads x value head dim")
    qkv_name, (rows, cols) = tensor("in_proj_qkv.weight", 2)
    keys = rows - values
    if cols != hidden or keys <= 0 or keys % 2:
        raise r.fail(
            f"tensor '{qkv_name}' has shape {[rows, cols]}: it holds q | k | v, 2 x key heads x "
            f"key head dim + {values} rows (value heads x value head dim), by hidden_size "
            f"({hidden})"
        )
    name, (channels, per_group, kernel) = tensor("conv1d.weight", 3)
    if channels != rows or per_group != 1 or kernel < 2:
        raise r.fail(
            f"tensor '{name}' has shape {[channels, per_group, kernel]}, expected [{rows}, 1, "
            "kernel >= 2] (a depthwise conv over q | k | v)"
        )
    r.fields["linear_conv_kernel_dim"] = kernel
    r.fields["linear_num_value_heads"] = value_heads
    r.fields["linear_value_head_dim"] = value_dim
    r.fields["_key_width"] = keys // 2  # key heads x key head dim: the split is not stored
    r.fields["_key_heads"], r.fields["_key_dim"], why = key_split(r.fields)
    r.reasons["linear_num_key_heads"] = r.reasons["linear_key_head_dim"] = why


# head dims tried for the keys, after a preset of the same shapes and dk = dv
KEY_HEAD_DIMS = (128, 64, 32, 16, 8)


def key_split(fields: Mapping[str, Any]) -> tuple[int, int, str]:
    """(key heads, key head dim, why) for a key width Hk x dk no tensor splits: the queries
    and keys are L2-normalised per head and carry no weight of their own. A preset with the
    same shapes decides, else dk = dv (every published Qwen3.5), else the first of
    KEY_HEAD_DIMS dividing the width with Hv a multiple of Hk, else one key head."""
    width, value_heads = fields["_key_width"], fields["linear_num_value_heads"]
    same = (
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "linear_num_value_heads",
        "linear_value_head_dim",
    )
    for name, preset in PRESETS.items():
        if all(preset.get(k) == fields.get(k) for k in same):
            heads, dim = preset["linear_num_key_heads"], preset["linear_key_head_dim"]
            if heads * dim == width:
                return heads, dim, f"{heads} x {dim} of preset:{name}, whose shapes these are"
    candidates = [(fields["linear_value_head_dim"], "the value head dim, as published")]
    candidates += [(dim, "assumed") for dim in KEY_HEAD_DIMS]
    for dim, how in candidates:
        if width % dim == 0 and value_heads % (width // dim) == 0:
            return width // dim, dim, f"key head dim {dim} ({how}) of the key width {width}"
    return 1, width, f"one key head of the key width {width} (assumed)"


def _full(r: ShapeReader, layer: int) -> None:
    """Gated full attention: head_dim the q_norm length, q_proj a query and a gate per head."""
    q_name = r.layer_tensor(layer, "self_attn.q_proj.weight")
    k_name = r.layer_tensor(layer, "self_attn.k_proj.weight")
    (head_dim,) = r.get(r.layer_tensor(layer, "self_attn.q_norm.weight"), 1)
    q_rows, _ = r.get(q_name, 2)
    k_rows, _ = r.get(k_name, 2)
    r.fields["head_dim"] = head_dim
    r.fields["num_attention_heads"] = r.divide(
        q_name, q_rows, 2 * head_dim, "2 x head_dim: a query and a gate per head"
    )
    r.fields["num_key_value_heads"] = r.divide(k_name, k_rows, head_dim, "head_dim")
    r.fields["attention_bias"] = "self_attn.q_proj.bias" in r.layers[layer]


def infer(r: ShapeReader) -> None:
    """Layer kinds from the tensors each layer holds; the linear fields from the first linear
    layer, the attention fields from the first full one, the MLP from every layer (a layer
    that disagrees fails the tensor check when loading)."""
    kinds = _kinds(r)
    r.fields["layer_types"] = kinds
    _linear(r, kinds.index(LINEAR))
    if FULL in kinds:
        _full(r, kinds.index(FULL))
    dense_mlp(r, required=True)


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
DEFAULTS: tuple[Default, ...] = (
    Default("rope_parameters", _rope_default, "published Qwen3.5: theta 1e7, a quarter rotates"),
    Default("rms_norm_eps", 1e-6, "published Qwen3.5"),
    Default("max_position_embeddings", 262144, "published Qwen3.5"),
    # the split of the key width (key_split, whose reason infer records)
    Default("linear_num_key_heads", lambda f: f["_key_heads"], "key_split"),
    Default("linear_key_head_dim", lambda f: f["_key_dim"], "key_split"),
    Default("head_dim", 256, f"published Qwen3.5; {_UNUSED}"),
    Default("num_attention_heads", 8, f"published Qwen3.5-0.8B; {_UNUSED}"),
    Default("num_key_value_heads", 2, f"published Qwen3.5-0.8B; {_UNUSED}"),
)


# ---------------------------------------------------------------------------------------------
# Parameter counts and the inspect rows


def attention_parameters(config: Mapping[str, Any], head_dim: int) -> int:
    """A full-attention block beside its four projection matrices: the gate half of q_proj
    (H x head_dim rows), the optional biases (q_proj's over query and gate), q/k norms."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    gate = heads * head_dim * hidden
    bias = 2 * heads * head_dim + 2 * kv_heads * head_dim + hidden
    return gate + (bias if config.get("attention_bias") else 0) + 2 * head_dim


def linear_attention(config: Mapping[str, Any]) -> tuple[int, int]:
    """(linear layers, their Gated DeltaNet parameters): in_proj_qkv, in_proj_z, in_proj_b,
    in_proj_a and out_proj, the depthwise conv (no bias), A_log, dt_bias and the gated norm."""
    hidden = config["hidden_size"]
    key_heads, value_heads = (
        _field(config, f) for f in ("linear_num_key_heads", "linear_num_value_heads")
    )
    key_dim, value_dim = (
        _field(config, f) for f in ("linear_key_head_dim", "linear_value_head_dim")
    )
    kernel = _field(config, "linear_conv_kernel_dim")
    values = value_heads * value_dim
    conv = 2 * key_heads * key_dim + values  # q | k | v
    per_layer = (
        hidden * conv  # in_proj_qkv
        + hidden * values  # in_proj_z
        + 2 * hidden * value_heads  # in_proj_b, in_proj_a
        + values * hidden  # out_proj
        + conv * kernel  # conv1d
        + 2 * value_heads  # A_log, dt_bias
        + value_dim  # the gated norm
    )
    layers = kinds_of(config).count(LINEAR)
    return layers, layers * per_layer


def _pattern(kinds: list[str]) -> str:
    """Layer kinds as letters, a repeating period shown once: [L,L,L,F] x 6."""
    letters = ["L" if k == LINEAR else "F" for k in kinds]
    for period in range(1, len(letters)):
        if len(letters) % period == 0 and letters == letters[:period] * (len(letters) // period):
            return f"[{','.join(letters[:period])}] x {len(letters) // period}"
    return ",".join(letters)


def describe(config: Any) -> dict[str, str]:
    """`anefx inspect` rows: the layer kinds, the linear-attention and full-attention shapes."""
    kinds = list(config.layer_types[: config.num_hidden_layers])
    factor = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    linear, full = kinds.count(LINEAR), kinds.count(FULL)
    return {
        "layer_kinds": f"{linear} linear, {full} full: {_pattern(kinds)}",
        "linear_attention": (
            f"{config.linear_num_key_heads} key x {config.linear_key_head_dim}, "
            f"{config.linear_num_value_heads} value x {config.linear_value_head_dim}, "
            f"conv {config.linear_conv_kernel_dim}"
        ),
        "full_attention": (
            f"{config.num_attention_heads} heads, {config.num_key_value_heads} KV x "
            f"{config.head_dim}, gated, rotary {int(config.head_dim * factor)}"
        ),
    }


__all__ = [
    "DEFAULTS",
    "DROPPED",
    "NESTED",
    "PRESETS",
    "REQUIRED",
    "attention_parameters",
    "check_config",
    "describe",
    "infer",
    "kinds_of",
    "linear_attention",
    "recognise",
    "refuse",
]
