"""The language model of Qwen3-VL-MoE (30B-A3B, 235B-A22B): Qwen3-MoE's decoder (Qwen3
attention; a router and `num_experts` experts in the sparse layers, top-k weights always
renormalised, no shared expert) with Qwen3-VL's interleaved mrope, read from a
vision-language checkpoint without its vision tower.

The experts go through passes/densify_experts.py as Qwen3-MoE's (the report states the
compute multiplier). They are stored fused: published checkpoints hold ``experts.gate_up_proj``
as (E, H, 2I) and ``experts.down_proj`` as (E, I, H), the transpose of the model's (E, 2I, H) and
(E, H, I) (transformers transposes them when loading); transformers 5's save_pretrained writes
the model's own orientation. Both load (`stored_parts`: a tensor of the model's shape whole,
else transposed). Mrope and the absent deepstack features as in qwen3_vl.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from anefx.models.families import qwen3_moe, qwen3_vl
from anefx.models.families.common import (
    experts,
    infer_experts,
    q_norm_attention,
    q_norm_attention_parameters,
    tiny,
    vl_layout,
    vl_text_family,
)
from anefx.models.family import Default, StoredParts, Transposed
from anefx.models.tensor_shapes import ShapeReader

MODEL_CLASS = "Qwen3VLMoeTextForCausalLM"


def published(
    hidden: int, layers: int, heads: int, intermediate: int, moe_intermediate: int
) -> dict[str, Any]:
    """A published Qwen3-VL-MoE text config with these shapes: Qwen3-MoE's fields on
    Qwen3-VL's (Qwen3VLMoeTextConfig has no norm_topk_prob: it always renormalises)."""
    moe = qwen3_moe.moe_fields(moe_intermediate)
    del moe["norm_topk_prob"]
    return {
        **qwen3_vl.published(hidden, layers, heads, intermediate, tied=False),
        **moe,
        "model_type": "qwen3_vl_moe_text",
        "architectures": [MODEL_CLASS],
    }


# Qwen/Qwen3-VL-30B-A3B-Instruct and -235B-A22B-Instruct config.json (text_config): the shapes
# of Qwen3-30B-A3B and -235B-A22B (equal counts, tests/test_vl_towers.py); the published totals
# (31.1B, 236B) add the vision tower.
_TINY = {k: v for k, v in qwen3_moe.TINY_MOE_FIELDS.items() if k != "norm_topk_prob"}
PRESETS: dict[str, dict[str, Any]] = {
    **{f"qwen3-vl-{size}": published(**shape) for size, shape in qwen3_moe.SHAPES.items()},
    # 2I (32) and I (16) differ from hidden (64), so either stored orientation of the experts
    # is unambiguous
    "qwen3-vl-moe-tiny": {
        **tiny("qwen3_vl_moe_text", **_TINY, moe_intermediate_size=16),
        "rope_parameters": qwen3_vl.rope(32),
        "architectures": [MODEL_CLASS],
    },
}
PRESETS["qwen3-vl-moe-tiny-tied"] = {
    **copy.deepcopy(PRESETS["qwen3-vl-moe-tiny"]),
    "tie_word_embeddings": True,
}
for _cfg in PRESETS.values():  # the config class has no sliding-window switch
    for _key in ("max_window_layers", "use_sliding_window", "sliding_window"):
        _cfg.pop(_key, None)

# the model's fused expert parameters
_FUSED_EXPERTS = re.compile(r"^.+\.mlp\.experts\.(gate_up_proj|down_proj)$")


def stored_parts(name: str, shape: tuple[int, ...]) -> StoredParts:
    """A fused expert parameter stored transposed, as published (E, H, 2I) / (E, I, H); one of
    the model's shape loads whole (models/weights.py tries that first)."""
    if _FUSED_EXPERTS.match(name) is None or len(shape) != 3:
        return []
    return [(Transposed(1, 2), name)]


def _has_experts(suffixes: frozenset[str]) -> bool:
    return any(s.startswith("mlp.experts.") or s == "mlp.gate.weight" for s in suffixes)


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Expert tensors and Qwen3's q_norm, no linear attention, in a Qwen3-VL-MoE layout: above
    Qwen3-MoE (the tensors are a candidate only in that layout: Family.text_twin)."""
    if any(s.startswith("linear_attn.") for s in suffixes):
        return 0
    return 2 * qwen3_moe.recognise(suffixes, first)


def infer(r: ShapeReader) -> None:
    """Qwen3 attention; the experts' count and width (either stored orientation) and the
    sparse layers, as Qwen3-MoE's."""
    q_norm_attention(r)
    infer_experts(r)


DEFAULTS: tuple[Default, ...] = (*qwen3_vl.DEFAULTS, *qwen3_moe.EXPERT_DEFAULTS)


FAMILY = vl_text_family(
    "Qwen3VLMoeTextModel",
    "Qwen3VLMoePreTrainedModel",
    model_type="qwen3_vl_moe_text",
    order=9,
    config_class="Qwen3VLMoeTextConfig",
    model_class=MODEL_CLASS,
    # the config class would default to 60 experts of width 1408, 4 per token: no published
    # model's; transformers itself writes num_experts as num_local_experts
    required=(
        ("num_experts", "num_local_experts"),
        ("moe_intermediate_size",),
        ("num_experts_per_tok",),
    ),
    recognise=recognise,
    infer=infer,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen3-vl-moe-tiny",
    attention_parameters=q_norm_attention_parameters,
    experts=experts,
    stored_parts=stored_parts,
    # the router: its scores pick the experts, where a small error changes which run
    dense_in_layer=("mlp.gate",),
    nested=(vl_layout("qwen3_vl_moe", "Qwen3VLMoeConfig"),),
    text_twin="qwen3_moe",
)
