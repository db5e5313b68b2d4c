"""What the Qwen families share: default rows, the tiny preset shape, the KV-cache states, the
inference rules for the attention, dense-MLP and expert tensors, and how experts are stored."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from anefx.core.signature import State
from anefx.models.family import Default, PadRule, StoredParts
from anefx.models.kv_cache import CACHE_AXES, cache_name, kv_cache_shape
from anefx.models.tensor_shapes import ShapeReader

ROPE_DEFAULT = Default(
    "rope_parameters",
    {"rope_type": "default", "rope_theta": 1000000.0},
    "every published Qwen2.5/Qwen3 model except the 2507 updates (5e6); no rope scaling",
)
RMS_EPS_DEFAULT = Default("rms_norm_eps", 1e-6, "published Qwen2.5-Instruct, Qwen3 and Qwen3-MoE")

# A prefill call writes its S slots of every K and V state from its first position; the
# padding's slots come after the real tokens' (models/family.py: PadRule).
KV_PADDING = PadRule(kinds=("key", "value"))


def tiny(model_type: str, **fields: Any) -> dict[str, Any]:
    """The shared tiny shapes: hidden 64, 2 layers, vocab 512, grouped KV heads."""
    return {
        "model_type": model_type,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "dtype": "bfloat16",
        **copy.deepcopy(fields),
    }


def kv_states(config: Any, context: int, dtype: str) -> tuple[State, ...]:
    """A K and a V state per decoder layer, (1, kv_heads, head_dim, context) each, layer by
    layer (K first)."""
    shape = kv_cache_shape(config, context)
    return tuple(
        State(cache_name(kind, layer), role, (layer,), shape, dtype, CACHE_AXES)
        for layer in range(config.num_hidden_layers)
        for kind, role in (("k", "key"), ("v", "value"))
    )


def whole(name: str, shape: tuple[int, ...]) -> StoredParts:
    """Every parameter is stored whole."""
    return []


def no_experts(config: Mapping[str, Any]) -> int:
    return 0


def shared_expert_parameters(config: Mapping[str, Any]) -> int:
    """A sigmoid-gated shared expert beside the routed ones (Qwen2-MoE, Qwen3-Next,
    Qwen3.5-MoE): a gated MLP of width `shared_expert_intermediate_size` and its (1, hidden)
    gate."""
    hidden = config["hidden_size"]
    return 3 * hidden * config["shared_expert_intermediate_size"] + hidden


def never_refused(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    return None


def attention_rows(r: ShapeReader) -> tuple[str, int, str, int]:
    """(q_proj name, its rows, k_proj name, its rows) of layer 0."""
    q_name = r.layer_tensor(0, "self_attn.q_proj.weight")
    k_name = r.layer_tensor(0, "self_attn.k_proj.weight")
    q_rows, _ = r.get(q_name, 2)
    k_rows, _ = r.get(k_name, 2)
    return q_name, q_rows, k_name, k_rows


def q_norm_attention(r: ShapeReader) -> None:
    """Qwen3 attention: head_dim is the q_norm length, heads and KV heads follow from the rows."""
    q_name, q_rows, k_name, k_rows = attention_rows(r)
    (head_dim,) = r.get(r.layer_tensor(0, "self_attn.q_norm.weight"), 1)
    r.fields["head_dim"] = head_dim
    r.fields["num_attention_heads"] = r.divide(q_name, q_rows, head_dim, "head_dim")
    r.fields["num_key_value_heads"] = r.divide(k_name, k_rows, head_dim, "head_dim")
    r.fields["attention_bias"] = "self_attn.q_proj.bias" in r.layers[0]


def q_norm_attention_parameters(config: Mapping[str, Any], head_dim: int) -> int:
    """Qwen3 attention beside its matrices: optional bias on all four projections, q/k norms."""
    heads = config["num_attention_heads"]
    q_out = heads * head_dim
    kv_out = (config.get("num_key_value_heads") or heads) * head_dim
    bias = q_out + 2 * kv_out + config["hidden_size"] if config.get("attention_bias") else 0
    return bias + 2 * head_dim  # q_norm and k_norm


def dense_mlp(r: ShapeReader, required: bool) -> None:
    """intermediate_size from the gate_proj rows every dense MLP layer agrees on."""
    widths = {
        i: r.shape(i, "mlp.gate_proj.weight", 2)[0]
        for i, per_layer in r.layers.items()
        if "mlp.gate_proj.weight" in per_layer
    }
    width = r.one_value(widths, "intermediate_size")
    if width is not None:
        r.fields["intermediate_size"] = width
    elif required:
        raise r.fail(f"tensor '{r.layer_tensor(0, 'mlp.gate_proj.weight')}' missing")


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts blocks: a router `mlp.gate` (E, H), E experts stored per expert or fused,
# and (Qwen3-Next, Qwen3.5-MoE) a shared expert with a sigmoid gate

# per-expert tensors of a layer, as published checkpoints store them
_EXPERT = re.compile(r"^mlp\.experts\.(\d{1,9})\.(gate_proj|up_proj|down_proj)\.weight$")
# the model's fused expert parameters
_FUSED_EXPERTS = re.compile(r"^(.+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def has_router(suffixes: frozenset[str]) -> bool:
    """Expert or router tensors in some layer."""
    return any(s.startswith("mlp.experts.") or s == "mlp.gate.weight" for s in suffixes)


def routed_experts(r: ShapeReader) -> set[int]:
    """num_experts and moe_intermediate_size from the routers and the experts, fused (E, 2I, H)
    / (E, H, I) or per expert (I, H) / (H, I); returns the layers that hold them."""
    expert_count: dict[int, int] = {}
    expert_width: dict[int, int] = {}
    for i, per_layer in r.layers.items():
        if "mlp.gate.weight" in per_layer:  # the router, (E, H)
            expert_count[i] = r.shape(i, "mlp.gate.weight", 2)[0]
        if "mlp.experts.down_proj" in per_layer:  # fused, (E, H, I)
            fused = r.shape(i, "mlp.experts.down_proj", 3)
            expert_count.setdefault(i, fused[0])
            expert_width[i] = fused[-1]
        per_expert = [m for s in per_layer if (m := _EXPERT.match(s))]
        if per_expert:  # (I, H) gate/up, (H, I) down per expert
            expert_count.setdefault(i, max(int(m.group(1)) for m in per_expert) + 1)
            first = r.shape(i, per_expert[0].group(0), 2)
            down = per_expert[0].group(2) == "down_proj"
            expert_width.setdefault(i, first[-1] if down else first[0])
    r.fields["num_experts"] = r.one_value(expert_count, "num_experts")
    width = r.one_value(expert_width, "moe_intermediate_size")
    if width is None:
        raise r.fail("a router 'mlp.gate.weight' but no expert weights")
    r.fields["moe_intermediate_size"] = width
    return set(expert_count) | set(expert_width)


def infer_shared_expert(r: ShapeReader, sparse: set[int]) -> None:
    """shared_expert_intermediate_size from the shared expert's gate_proj rows (I_s, H), in
    every layer of SPARSE, beside its gate `mlp.shared_expert_gate` (1, H)."""
    hidden = r.fields["hidden_size"]
    widths: dict[int, int] = {}
    for i in sorted(sparse):
        gate = r.layer_tensor(i, "mlp.shared_expert_gate.weight")
        if tuple(r.get(gate, 2)) != (1, hidden):
            raise r.fail(
                f"tensor '{gate}' has shape {list(r.get(gate, 2))}, expected [1, {hidden}] (one "
                "sigmoid gate per token, by hidden_size)"
            )
        widths[i] = r.get(r.layer_tensor(i, "mlp.shared_expert.gate_proj.weight"), 2)[0]
    r.fields["shared_expert_intermediate_size"] = r.one_value(
        widths, "shared_expert_intermediate_size"
    )


def sparse_pattern(layers: int, sparse: set[int]) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) that make exactly `sparse` the MoE layers.

    transformers' rule: layer i is sparse iff i not in mlp_only_layers and (i + 1) % step == 0.
    A step that gives the set exactly is preferred; otherwise step 1 and the dense layers listed.
    """
    for step in range(1, layers + 1):
        if {i for i in range(layers) if (i + 1) % step == 0} == sparse:
            return step, []
    return 1, sorted(set(range(layers)) - sparse)


def experts(config: Mapping[str, Any]) -> int:
    """Experts per sparse layer of a config dict.

    transformers writes the field as `num_local_experts` (its attribute_map alias), published
    config.json files as `num_experts`; both are read.
    """
    return config.get("num_experts", config.get("num_local_experts", 128))


def expert_parts(name: str, shape: tuple[int, ...]) -> StoredParts:
    """The per-expert checkpoint tensors making up fused expert parameter `name` (else []).

    Published Qwen3-MoE and Qwen3-Next checkpoints, and transformers' own save_pretrained of
    them (which undoes its load-time fusion), store `experts.<e>.{gate,up,down}_proj.weight`;
    the model holds `experts.gate_up_proj` (E, 2I, H), gate rows first, and
    `experts.down_proj` (E, H, I). A checkpoint storing the fused tensors loads them whole.
    """
    match = _FUSED_EXPERTS.match(name)
    if match is None or len(shape) != 3:
        return []
    prefix, kind = match.groups()
    if kind == "down_proj":
        return [((e,), f"{prefix}.{e}.down_proj.weight") for e in range(shape[0])]
    half = shape[1] // 2
    parts: StoredParts = []
    for e in range(shape[0]):
        parts.append(((e, slice(0, half)), f"{prefix}.{e}.gate_proj.weight"))
        parts.append(((e, slice(half, None)), f"{prefix}.{e}.up_proj.weight"))
    return parts
