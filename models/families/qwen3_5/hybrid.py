"""What every Gated DeltaNet hybrid shares (Qwen3.5, Qwen3.5-MoE, Qwen3-Next): the layer kinds,
the checks of a hybrid config, the inference of its fields from tensor shapes, its parameter
counts and inspect rows, and the Family fields a hybrid gets from this package.

A hybrid family differs from the others in three things only, which :class:`Hybrid` takes:
its config class (the defaults of the fields a config leaves out), its presets (which settle
the key split no tensor stores), how its linear-attention projections are stored (separate
``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a``, or Qwen3-Next's fused
``in_proj_qkvz`` / ``in_proj_ba``) and what its MLP is (dense, or routed experts beside a shared
one). :func:`hybrid_family` builds the :class:`~anefx.models.family.Family` from them with the
states, cache, capture substitution and layer labels of ``cache.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from anefx.models.families.common import expert_parts, experts, shared_expert_parameters
from anefx.models.families.qwen3_5.cache import (
    HYBRID_PADDING,
    HybridCache,
    hybrid_states,
    layer_kinds,
    loop_free_delta_rule,
)
from anefx.models.families.qwen3_5.delta_rule import SUBSTITUTIONS
from anefx.models.family import Family
from anefx.models.limits import MAX_HEAD_DIM, MAX_HEADS
from anefx.models.messages import shown
from anefx.models.tensor_shapes import ShapeReader

LINEAR = "linear_attention"
FULL = "full_attention"
KINDS = (LINEAR, FULL)

# the linear-attention fields: (field, upper bound, the bound's name in models/limits.py)
_LINEAR_INTS = (
    ("linear_num_key_heads", MAX_HEADS, "MAX_HEADS"),
    ("linear_num_value_heads", MAX_HEADS, "MAX_HEADS"),
    ("linear_key_head_dim", MAX_HEAD_DIM, "MAX_HEAD_DIM"),
    ("linear_value_head_dim", MAX_HEAD_DIM, "MAX_HEAD_DIM"),
    ("linear_conv_kernel_dim", None, ""),
)
# transformers' config classes would give the linear-attention heads the 9B's shapes (16 x 128
# keys, 32 x 128 values) when a config leaves them out; every published config states them
REQUIRED: tuple[tuple[str, ...], ...] = (
    ("linear_num_key_heads",),
    ("linear_num_value_heads",),
    ("linear_key_head_dim",),
    ("linear_value_head_dim",),
)
# head dims tried for the keys, after a preset of the same shapes and dk = dv
KEY_HEAD_DIMS = (128, 64, 32, 16, 8)
# the fields a preset must share with a checkpoint to settle its key split
_SAME_SHAPES = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "linear_num_value_heads",
    "linear_value_head_dim",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def every_fourth(layers: int) -> list[str]:
    """[linear, linear, linear, full] repeated: transformers' default (full_attention_interval 4)
    and every published hybrid."""
    return [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(layers)]


def kinds_of(config: Mapping[str, Any]) -> list[str]:
    """Each layer's kind: `layer_types`, else transformers' rule (every
    `full_attention_interval`-th layer full, 4 by default)."""
    kinds = config.get("layer_types")
    if kinds is not None:
        return list(kinds)
    interval = config.get("full_attention_interval") or 4
    return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(config["num_hidden_layers"])]


def _has(suffixes: frozenset[str], prefix: str) -> bool:
    return any(s.startswith(prefix) for s in suffixes)


def has_linear_attention(suffixes: frozenset[str]) -> bool:
    return _has(suffixes, "linear_attn.")


def has_fused_projections(suffixes: frozenset[str]) -> bool:
    """Qwen3-Next's in_proj_qkvz / in_proj_ba (Qwen3.5 stores them apart)."""
    return _has(suffixes, "linear_attn.in_proj_qkvz") or _has(suffixes, "linear_attn.in_proj_ba")


def has_experts(suffixes: frozenset[str]) -> bool:
    """A router, routed or shared experts in some layer."""
    return any(_has(suffixes, p) for p in ("mlp.experts.", "mlp.gate.", "mlp.shared_expert"))


# ---------------------------------------------------------------------------------------------
# Inference from tensor shapes


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
                "hybrid layer holds one of them"
            )
        kinds.append(LINEAR if linear else FULL)
    return kinds


def expect(r: ShapeReader, name: str, shape: tuple[int, ...], want: tuple[int, ...], why: str):
    if shape != want:
        raise r.fail(f"tensor '{name}' has shape {list(shape)}, expected {list(want)} ({why})")


def _tensor(r: ShapeReader, layer: int, suffix: str, rank: int) -> tuple[str, tuple[int, ...]]:
    name = r.layer_tensor(layer, f"linear_attn.{suffix}")
    return name, r.get(name, rank)


def _value_heads(r: ShapeReader, layer: int) -> tuple[int, int]:
    """(value heads, value head dim) from A_log and the gated norm; dt_bias, out_proj and the
    conv checked against them by the callers."""
    _, (value_heads,) = _tensor(r, layer, "A_log", 1)
    _, (value_dim,) = _tensor(r, layer, "norm.weight", 1)
    name, shape = _tensor(r, layer, "dt_bias", 1)
    expect(r, name, shape, (value_heads,), "value heads, as A_log")
    values, hidden = value_heads * value_dim, r.fields["hidden_size"]
    name, shape = _tensor(r, layer, "out_proj.weight", 2)
    expect(r, name, shape, (hidden, values), "hidden_size, value heads x value head dim")
    return value_heads, value_dim


def _conv_and_keys(
    r: ShapeReader, layer: int, keys: int, value_heads: int, value_dim: int, presets
) -> None:
    """The conv kernel (a depthwise conv over q | k | v, 2 KEYS + values channels) and the
    fields every linear layer gives."""
    channels = 2 * keys + value_heads * value_dim
    name, (rows, per_group, kernel) = _tensor(r, layer, "conv1d.weight", 3)
    if rows != channels or per_group != 1 or kernel < 2:
        raise r.fail(
            f"tensor '{name}' has shape {[rows, per_group, kernel]}, expected [{channels}, 1, "
            "kernel >= 2] (a depthwise conv over q | k | v)"
        )
    r.fields["linear_conv_kernel_dim"] = kernel
    r.fields["linear_num_value_heads"] = value_heads
    r.fields["linear_value_head_dim"] = value_dim
    r.fields["_key_width"] = keys  # key heads x key head dim: the split is not stored
    r.fields["_key_heads"], r.fields["_key_dim"], why = key_split(r.fields, presets)
    r.reasons["linear_num_key_heads"] = r.reasons["linear_key_head_dim"] = why


def separate_projections(r: ShapeReader, layer: int, presets) -> None:
    """Qwen3.5's projections: in_proj_qkv (2 Hk dk + Hv dv rows: the key width beside the
    values), in_proj_z (Hv dv), in_proj_b and in_proj_a (Hv each)."""
    hidden = r.fields["hidden_size"]
    value_heads, value_dim = _value_heads(r, layer)
    values = value_heads * value_dim
    name, shape = _tensor(r, layer, "in_proj_z.weight", 2)
    expect(r, name, shape, (values, hidden), "value heads x value head dim, hidden_size")
    for gate in ("in_proj_b.weight", "in_proj_a.weight"):
        name, shape = _tensor(r, layer, gate, 2)
        expect(r, name, shape, (value_heads, hidden), "value heads, as A_log; hidden_size")
    qkv_name, (rows, cols) = _tensor(r, layer, "in_proj_qkv.weight", 2)
    keys = rows - values
    if cols != hidden or keys <= 0 or keys % 2:
        raise r.fail(
            f"tensor '{qkv_name}' has shape {[rows, cols]}: it holds q | k | v, 2 x key heads x "
            f"key head dim + {values} rows (value heads x value head dim), by hidden_size "
            f"({hidden})"
        )
    _conv_and_keys(r, layer, keys // 2, value_heads, value_dim, presets)


def fused_projections(r: ShapeReader, layer: int, presets) -> None:
    """Qwen3-Next's projections: in_proj_qkvz (2 Hk dk + 2 Hv dv rows, interleaved per key
    head) and in_proj_ba (2 Hv rows)."""
    hidden = r.fields["hidden_size"]
    value_heads, value_dim = _value_heads(r, layer)
    values = value_heads * value_dim
    name, shape = _tensor(r, layer, "in_proj_ba.weight", 2)
    expect(r, name, shape, (2 * value_heads, hidden), "2 x value heads (b, a), hidden_size")
    qkvz_name, (rows, cols) = _tensor(r, layer, "in_proj_qkvz.weight", 2)
    keys = rows - 2 * values
    if cols != hidden or keys <= 0 or keys % 2:
        raise r.fail(
            f"tensor '{qkvz_name}' has shape {[rows, cols]}: it holds q | k | v | z per key "
            f"head, 2 x key heads x key head dim + {2 * values} rows (2 x value heads x value "
            f"head dim), by hidden_size ({hidden})"
        )
    _conv_and_keys(r, layer, keys // 2, value_heads, value_dim, presets)


def key_split(fields: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]]) -> tuple:
    """(key heads, key head dim, why) for a key width Hk x dk no tensor splits: the queries
    and keys are L2-normalised per head and carry no weight of their own. A preset with the
    same shapes decides, else dk = dv (every published hybrid), else the first of KEY_HEAD_DIMS
    dividing the width with Hv a multiple of Hk, else one key head."""
    width, value_heads = fields["_key_width"], fields["linear_num_value_heads"]
    for name, preset in presets.items():
        if all(preset.get(k) == fields.get(k) for k in _SAME_SHAPES):
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


# ---------------------------------------------------------------------------------------------
# One hybrid family's rules


@dataclasses.dataclass(frozen=True)
class Hybrid:
    """What differs between the hybrid families' rules: the config class (defaults), the
    presets (the key split), the linear-attention tensors and the MLP."""

    config_class: str  # transformers' config class, for the defaults of absent fields
    presets: Mapping[str, Mapping[str, Any]]
    # the linear-attention fields from a layer's tensors: (reader, layer, presets)
    projections: Callable[[ShapeReader, int, Any], None]
    # the MLP's fields (dense width, experts) from every layer
    mlp: Callable[[ShapeReader], None]

    def class_default(self, field: str) -> Any:
        """The config class's default for FIELD (what a config dict without it gets)."""
        import transformers

        fields = dataclasses.fields(getattr(transformers, self.config_class))
        return next(f.default for f in fields if f.name == field)

    def field(self, config: Mapping[str, Any], field: str) -> Any:
        value = config.get(field)
        return self.class_default(field) if value is None else value

    def infer(self, r: ShapeReader) -> None:
        """Layer kinds from the tensors each layer holds; the linear fields from the first
        linear layer, the attention fields from the first full one, the MLP from every layer (a
        layer that disagrees fails the tensor check when loading)."""
        kinds = _kinds(r)
        r.fields["layer_types"] = kinds
        self.projections(r, kinds.index(LINEAR), self.presets)
        if FULL in kinds:
            _full(r, kinds.index(FULL))
        self.mlp(r)

    def check_config(self, raw: Mapping[str, Any]) -> str | None:
        """What a hybrid config needs beyond the shared checks (which already hold the list
        lengths and the shared integers): linear-attention sizes the layer can be built with,
        known layer kinds, a readable mrope section. Returns why it is refused, or None."""
        for field, bound, name in _LINEAR_INTS:
            if field not in raw:
                continue
            value = raw[field]
            if not _is_int(value) or value <= 0:
                return f"field '{field}' must be a positive integer, got {shown(value)}"
            if bound is not None and value > bound:
                return (
                    f"field '{field}' is {value}, above the bound {bound} "
                    f"(anefx.models.limits.{name})"
                )
        kernel = self.field(raw, "linear_conv_kernel_dim")
        if kernel < 2:
            return (
                f"field 'linear_conv_kernel_dim' is {kernel}: the conv window a linear-attention "
                "layer carries from call to call holds kernel - 1 inputs, so the kernel must be "
                "at least 2 (published: 4)"
            )
        key_heads = self.field(raw, "linear_num_key_heads")
        value_heads = self.field(raw, "linear_num_value_heads")
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
                        f"field 'layer_types' holds {shown(kind)} for layer {i}; a hybrid layer "
                        f"is '{LINEAR}' or '{FULL}'"
                    )
        elif "full_attention_interval" in raw:
            interval = raw["full_attention_interval"]
            if not _is_int(interval) or interval <= 0:
                return (
                    "field 'full_attention_interval' must be a positive integer, got "
                    f"{shown(interval)}"
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
                    f"field '{spelled}.mrope_section' must list three non-negative integers, "
                    f"got {shown(section)}"
                )
            interleaved = params.get("mrope_interleaved")
            if interleaved is not None and not isinstance(interleaved, bool):
                return (
                    f"field '{spelled}.mrope_interleaved' must be true or false, got "
                    f"{shown(interleaved)}"
                )
        return None

    def linear_attention(self, config: Mapping[str, Any]) -> tuple[int, int]:
        """(linear layers, their Gated DeltaNet parameters): the q | k | v and z projections
        (apart or fused: the same rows), b and a, out_proj, the depthwise conv (no bias),
        A_log, dt_bias and the gated norm."""
        hidden = config["hidden_size"]
        key_heads, value_heads, key_dim, value_dim, kernel = (
            self.field(config, f)
            for f in (
                "linear_num_key_heads",
                "linear_num_value_heads",
                "linear_key_head_dim",
                "linear_value_head_dim",
                "linear_conv_kernel_dim",
            )
        )
        values = value_heads * value_dim
        conv = 2 * key_heads * key_dim + values  # q | k | v
        per_layer = (
            hidden * conv  # in_proj_qkv (or the q | k | v rows of in_proj_qkvz)
            + hidden * values  # in_proj_z (or its z rows)
            + 2 * hidden * value_heads  # in_proj_b, in_proj_a (or in_proj_ba)
            + values * hidden  # out_proj
            + conv * kernel  # conv1d
            + 2 * value_heads  # A_log, dt_bias
            + value_dim  # the gated norm
        )
        layers = kinds_of(config).count(LINEAR)
        return layers, layers * per_layer


def attention_parameters(config: Mapping[str, Any], head_dim: int) -> int:
    """A gated full-attention block beside its four projection matrices: the gate half of
    q_proj (H x head_dim rows), the optional biases (q_proj's over query and gate), q/k norms."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    gate = heads * head_dim * hidden
    bias = 2 * heads * head_dim + 2 * kv_heads * head_dim + hidden
    return gate + (bias if config.get("attention_bias") else 0) + 2 * head_dim


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


# the depthwise conv's kernels and the decay and write-strength projections stay dense when
# palettizing: small, and every token's state update goes through them
DENSE_LINEAR = (
    "linear_attn.conv1d",
    "linear_attn.in_proj_a",
    "linear_attn.in_proj_b",
    "linear_attn.in_proj_ba",
)


# What a hybrid whose MLPs are routed experts beside a sigmoid-gated shared expert adds
# (Qwen3.5-MoE, Qwen3-Next, Qwen4-Exp)
SHARED_EXPERT_MOE: dict[str, Any] = {
    # each config class would default to one published model's experts; transformers itself
    # writes num_experts as num_local_experts
    "required": (
        *REQUIRED,
        ("num_experts", "num_local_experts"),
        ("moe_intermediate_size",),
        ("shared_expert_intermediate_size",),
    ),
    "experts": experts,
    "stored_parts": expert_parts,
    "shared_expert": shared_expert_parameters,
    # the router and the shared expert's gate: their outputs choose and weigh the experts
    "dense_in_layer": (*DENSE_LINEAR, "mlp.gate", "mlp.shared_expert_gate"),
}


def hybrid_family(hybrid: Hybrid, with_experts: bool = False, **fields: Any) -> Family:
    """A hybrid's Family: FIELDS (recognition, classes, presets, defaults, layouts) and what
    every hybrid shares: the rules of HYBRID, the states and cache of ``cache.py``, the
    loop-free delta rule substituted at capture, the layer labels, a partial rotary; WITH_EXPERTS:
    and SHARED_EXPERT_MOE."""
    shared: dict[str, Any] = {
        "required": REQUIRED,
        "infer": hybrid.infer,
        "check_config": hybrid.check_config,
        "linear_attention": hybrid.linear_attention,
        "attention_parameters": attention_parameters,
        "states": hybrid_states,
        "cache": HybridCache,
        "padding": HYBRID_PADDING,
        "capture_context": loop_free_delta_rule,
        "substitutions": SUBSTITUTIONS,
        "layer_kinds": layer_kinds,
        "dense_in_layer": DENSE_LINEAR,
        # a quarter of each full-attention head rotates (partial_rotary_factor)
        "partial_rotary": True,
        "describe": describe,
    }
    return Family(**{**shared, **(SHARED_EXPERT_MOE if with_experts else {}), **fields})


__all__ = [
    "FULL",
    "KINDS",
    "LINEAR",
    "REQUIRED",
    "SHARED_EXPERT_MOE",
    "Hybrid",
    "attention_parameters",
    "describe",
    "every_fourth",
    "expect",
    "fused_projections",
    "has_experts",
    "has_fused_projections",
    "has_linear_attention",
    "hybrid_family",
    "key_split",
    "kinds_of",
    "separate_projections",
]
