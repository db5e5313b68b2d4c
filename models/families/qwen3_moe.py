"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3 attention, routed experts (a router `mlp.gate` and
`num_experts` experts) in the sparse layers, a dense MLP in the others, no shared expert."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from anefx.models.families.common import (
    KV_PADDING,
    RMS_EPS_DEFAULT,
    ROPE_DEFAULT,
    dense_mlp,
    kv_states,
    q_norm_attention,
    q_norm_attention_parameters,
    tiny,
)
from anefx.models.families.qwen3 import MAX_POSITIONS_DEFAULT
from anefx.models.families.qwen3 import published as published_dense
from anefx.models.family import Default, Family, StoredParts
from anefx.models.kv_cache import RowKVCache
from anefx.models.tensor_shapes import ShapeReader

# What the published Qwen3 mixture-of-experts models change in the dense Qwen3 config: 128
# experts, 8 routed per token with renormalised top-k weights, every layer sparse, no shared
# expert, untied head. intermediate_size stays the dense-MLP width, unused while every layer is
# sparse.
_MOE_FIELDS: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "num_key_value_heads": 4,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


def published(
    hidden: int, layers: int, heads: int, intermediate: int, moe_intermediate: int
) -> dict[str, Any]:
    """A published Qwen3-MoE config with these shapes."""
    return {
        **published_dense(hidden, layers, heads, intermediate, tied=False),
        **copy.deepcopy(_MOE_FIELDS),
        "moe_intermediate_size": moe_intermediate,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": published(
        hidden=2048, layers=48, heads=32, intermediate=6144, moe_intermediate=768
    ),
    "qwen3-235b-a22b": published(
        hidden=4096, layers=94, heads=64, intermediate=12288, moe_intermediate=1536
    ),
    # Qwen3-MoE's layout with both kinds of layer: layer 0 routes each token to 2 of 8 experts,
    # layer 1 (mlp_only_layers) is a dense MLP; untied head as in the published MoE models.
    "qwen3-moe-tiny": {
        **tiny(
            "qwen3_moe",
            head_dim=32,
            attention_bias=False,
            tie_word_embeddings=False,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        ),
        "architectures": ["Qwen3MoeForCausalLM"],
    },
}

DEFAULTS = (
    ROPE_DEFAULT,
    RMS_EPS_DEFAULT,
    MAX_POSITIONS_DEFAULT,
    Default(
        "num_experts_per_tok",
        lambda f: min(8, f["num_experts"]),
        "8 as in Qwen3-30B-A3B and 235B-A22B (at most num_experts)",
    ),
    Default(
        "norm_topk_prob",
        True,
        "published Qwen3-MoE (the config class would default to false)",
    ),
    Default(
        "intermediate_size",
        lambda f: 3 * f["hidden_size"],
        "3 x hidden_size as published; only when every layer is sparse, so it is unused",
    ),
)

# per-expert tensors of a layer, as published checkpoints store them
_EXPERT = re.compile(r"^mlp\.experts\.(\d{1,9})\.(gate_proj|up_proj|down_proj)\.weight$")
# the model's fused expert parameters
_FUSED_EXPERTS = re.compile(r"^(.+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _has_experts(suffixes: frozenset[str]) -> bool:
    return any(s.startswith("mlp.experts.") or s == "mlp.gate.weight" for s in suffixes)


def _has_shared_expert(suffixes: frozenset[str]) -> bool:
    return any(s.startswith("mlp.shared_expert") for s in suffixes)


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Expert (or router) tensors and Qwen3's q_norm: above dense Qwen3's score."""
    return 2 if _has_experts(suffixes) and "self_attn.q_norm.weight" in first else 0


def refuse(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    """Other mixture-of-experts layouts than Qwen3-MoE's and Qwen2-MoE's (a shared expert
    without q_norm, models/families/qwen2_moe.py)."""
    q_norm = "self_attn.q_norm.weight" in first
    if _has_shared_expert(suffixes) and q_norm:
        return "shared-expert tensors beside q_norm are not a supported family"
    if _has_experts(suffixes) and not q_norm and not _has_shared_expert(suffixes):
        return "expert tensors without q_norm or a shared expert: not a supported MoE layout"
    return None


def infer(r: ShapeReader) -> None:
    """Qwen3 attention; the experts' count and width, and which layers are sparse."""
    q_norm_attention(r)
    infer_experts(r)


def infer_experts(r: ShapeReader) -> None:
    """The routed experts' count and width (stored per expert or fused), which layers are
    sparse, and intermediate_size from a dense layer if there is one."""
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
    dense_mlp(r, required=False)  # a dense layer, if any, gives intermediate_size
    r.fields["num_experts"] = r.one_value(expert_count, "num_experts")
    width = r.one_value(expert_width, "moe_intermediate_size")
    if width is None:
        raise r.fail("a router 'mlp.gate.weight' but no expert weights")
    r.fields["moe_intermediate_size"] = width
    step, dense = sparse_pattern(len(r.layers), set(expert_count) | set(expert_width))
    r.fields["decoder_sparse_step"] = step
    r.fields["mlp_only_layers"] = dense


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


def stored_parts(name: str, shape: tuple[int, ...]) -> StoredParts:
    """The per-expert checkpoint tensors making up fused expert parameter `name` (else []).

    Published Qwen3-MoE checkpoints, and transformers' own save_pretrained (which undoes its
    load-time fusion), store `experts.<e>.{gate,up,down}_proj.weight`; the model holds
    `experts.gate_up_proj` (E, 2I, H), gate rows first, and `experts.down_proj` (E, H, I).
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


FAMILY = Family(
    model_type="qwen3_moe",
    order=2,
    config_class="Qwen3MoeConfig",
    model_class="Qwen3MoeForCausalLM",
    architectures=("Qwen3MoeForCausalLM",),
    # Qwen3MoeConfig would default to 128 experts of width 768; transformers itself writes
    # num_experts as num_local_experts (its attribute_map alias)
    required=(("num_experts", "num_local_experts"), ("moe_intermediate_size",)),
    recognise=recognise,
    sign=None,
    refuse=refuse,
    infer=infer,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3-moe-tiny",
    attention_parameters=q_norm_attention_parameters,
    experts=experts,
    stored_parts=stored_parts,
    states=kv_states,
    cache=RowKVCache,
    padding=KV_PADDING,
    # the router: its scores are compared to pick the experts, where a small error changes
    # which experts run
    dense_in_layer=("mlp.gate",),
)
