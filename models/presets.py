"""Named model shapes: the published Qwen2.5, Qwen3, Qwen3-MoE and Qwen3.5 configs plus tiny ones
for tests.

Each family module (models/families/) owns its presets; this module lists them all (published
models first, then the tiny ones, each group in family order), looks them up and counts
parameters. Each preset is a dict of keyword arguments for the transformers config class named
by its "model_type". Values follow the public config.json files of the Qwen/* repositories (the
Qwen2.5 ones are the -Instruct repositories, whose shapes equal the base models'); the RoPE base
is spelled the transformers-5 way (`rope_parameters`), which the config class also derives from
the legacy top-level `rope_theta` found in those files.
"""

from __future__ import annotations

import copy
from typing import Any

from anefx.errors import AnefxInputError
from anefx.models.families import FAMILIES


def _is_tiny(name: str, tiny: str) -> bool:
    """NAME is its family's tiny preset or a variant of it ("qwen3.5-tiny-untied")."""
    return name == tiny or name.startswith(f"{tiny}-")


def _all_presets() -> dict[str, dict[str, Any]]:
    by_order = list(FAMILIES.values())
    published = {n: c for f in by_order for n, c in f.presets.items() if not _is_tiny(n, f.tiny)}
    tiny = {n: c for f in by_order for n, c in f.presets.items() if _is_tiny(n, f.tiny)}
    return {**published, **tiny}


PRESETS: dict[str, dict[str, Any]] = _all_presets()


def get_preset(name: str) -> dict[str, Any]:
    """Return a deep copy of preset `name`'s config dict; unknown names raise AnefxInputError."""
    if name not in PRESETS:
        known = ", ".join(PRESETS)
        raise AnefxInputError(f"unknown preset '{name}'; known presets: {known}")
    return copy.deepcopy(PRESETS[name])


def num_experts(config: dict[str, Any]) -> int:
    """Experts per sparse layer of a config dict, as its family reads them (0: dense)."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    return family.experts(config) if family is not None else 0


def sparse_layers(config: dict[str, Any]) -> list[int]:
    """Indices of the layers holding a routed-experts block, by transformers' own rule."""
    experts = num_experts(config)
    step = config.get("decoder_sparse_step", 1)
    dense = set(config.get("mlp_only_layers") or [])
    return [
        i
        for i in range(config["num_hidden_layers"])
        if experts > 0 and i not in dense and (i + 1) % step == 0
    ]


def _head_dim(config: dict[str, Any]) -> int:
    # Qwen2 has no head_dim field; transformers then uses hidden / heads (as here).
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _expert_params(config: dict[str, Any]) -> int:
    """One expert's weights: gate and up (I, H) and down (H, I)."""
    return 3 * config["hidden_size"] * config.get("moe_intermediate_size", 768)


def count_parameters(config: dict[str, Any]) -> int:
    """Exact parameter count of the *ForCausalLM built from `config`, tied weights counted once.

    Covers the Qwen3 layout (q/k RMSNorm over head_dim, optional bias on all four attention
    projections), Qwen2 (bias on q/k/v only, no q/k norms, head_dim = hidden / heads),
    Qwen3-MoE (Qwen3 attention; per sparse layer a router (E, H) and the experts' fused
    gate_up (E, 2I, H) and down (E, H, I); a dense MLP on the other layers), a shared expert
    beside the routed ones (the family's `shared_expert`: Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE)
    and the hybrids (the family's linear-attention layers in place of attention blocks; its gated
    attention's extra q_proj rows in `attention_parameters`).
    """
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise AnefxInputError(f"cannot count parameters for model_type '{model_type}'")
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = _head_dim(config)
    # a model whose every layer is sparse may have no dense width (Qwen3.5-MoE's class has none)
    inter = config.get("intermediate_size") or 0
    vocab = config["vocab_size"]
    layers = config["num_hidden_layers"]
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    attn += family.attention_parameters(config, head_dim)  # biases, q/k norms
    dense_mlp = 3 * hidden * inter
    sparse = len(sparse_layers(config))
    experts = num_experts(config)
    sparse_mlp = experts * hidden + experts * _expert_params(config)  # router + experts
    sparse_mlp += family.shared_expert(config) if experts else 0

    # the layers whose mixer is a linear attention hold no attention block
    linear_layers, linear_mixers = family.linear_attention(config)
    total = (layers - linear_layers) * attn + linear_mixers
    total += family.other_parameters(config)  # the norms (and what else the family holds)
    total += (layers - sparse) * dense_mlp + sparse * sparse_mlp
    total += vocab * hidden  # embedding
    if not config.get("tie_word_embeddings", False):
        total += vocab * hidden
    return total


def active_parameters(config: dict[str, Any]) -> int:
    """Parameters one token uses: all but the experts it is not routed to (= total if dense;
    a shared expert is used by every token)."""
    idle = num_experts(config) - config.get("num_experts_per_tok", 8)
    if idle <= 0:
        return count_parameters(config)
    return count_parameters(config) - len(sparse_layers(config)) * idle * _expert_params(config)


def describe_presets() -> list[dict[str, Any]]:
    """One summary row per preset: shapes, parameter counts and fp16 weight bytes.

    `experts` and `experts_per_tok` are 0 for dense models; `active_params` is the count one
    token touches (all of them for dense models).
    """
    rows = []
    for name, cfg in PRESETS.items():
        params = count_parameters(cfg)
        rows.append(
            {
                "name": name,
                "model_type": cfg["model_type"],
                "layers": cfg["num_hidden_layers"],
                "hidden": cfg["hidden_size"],
                "heads": cfg["num_attention_heads"],
                "kv_heads": cfg["num_key_value_heads"],
                "head_dim": _head_dim(cfg),
                "intermediate": cfg.get("intermediate_size") or 0,
                "experts": num_experts(cfg),
                "experts_per_tok": cfg.get("num_experts_per_tok", 0) if num_experts(cfg) else 0,
                "moe_intermediate": cfg.get("moe_intermediate_size", 0) if num_experts(cfg) else 0,
                "vocab": cfg["vocab_size"],
                "tied": cfg["tie_word_embeddings"],
                "params": params,
                "active_params": active_parameters(cfg),
                "fp16_bytes": 2 * params,
            }
        )
    return rows
