"""Qwen4-Exp: the Qwen3.5 hybrid (Gated DeltaNet linear layers) with three constructs of its own,
described here so that anefx can load, capture and check it, and say what stands in the way.

transformers 5.23 `model_type` `qwen4_exp_text` (class `Qwen4ExpForCausalLM`; the composite
`qwen4_exp` nests it as `text_config` beside a vision tower, read here as the text model):

* **hyper-connections** (`Qwen4ExpTextGatedResidual`): the residual is `hc_count` streams side by
  side, (B, S, hc_count x hidden). Before the mixer and the MLP of each layer a grouped RMSNorm
  of the streams, a low-rank sigmoid mixer (hc x hidden -> hc_lowrank -> hc x hidden) and a
  mean over the streams give the block input; the block output is injected back into each
  stream with a per-stream weight 2 sigmoid(linear). `model.hyper_connection_mixer` mixes the
  streams down to one before the final norm-free head.
* **QSA** (`Qwen4ExpTextQSAIndexer`, in every `indexed_attention` layer; transformers builds
  one in every attention layer, so a model with attention layers needs the `indexer_*`
  fields): a query selects, by the top-k scores of mean-pooled key blocks of
  `indexer_compress_ratio` tokens, `indexer_budget` tokens it may attend to, plus the
  incomplete trailing block; the selection becomes a boolean mask over the attention.
* **PLE** (`Qwen4ExpTextPLELayer` with `Qwen4ExpTextNGramEmbedding`, on the
  `ple_layer_ids`): token 2- and 3-grams hashed with int64 multiply / xor / remainder into
  prime-sized tables (~20M rows per head, the class's own comment: ~45B parameters per
  table), gathered, projected, gated per stream and passed through a dilated depthwise conv.

The MoE (512 experts, top-10, sigmoid-gated shared expert) and the linear layers are the
Qwen3.5-MoE / Qwen3-Next ones: `densify_experts` and the Qwen3.5 passes lower them. What the
passes do not lower is reported by the checker, grouped by the transformers class it comes
from (docs/qwen4_exp.md, `Family.unlowered`).

Capture substitutes the QSA indexer's per-query Python loop (`torch.nonzero`, a data-dependent
`view`, which torch.export cannot trace) with the same selection written for every query at
once (`QSA_SUBSTITUTION`); the top-k and the scatter stay, and the checker names them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from anefx.core.signature import State
from anefx.errors import AnefxInputError
from anefx.models.families.common import (
    expert_parts,
    infer_shared_expert,
    routed_experts,
    vl_layout,
)
from anefx.models.families.qwen3_5.cache import (
    CONV_AXES,
    hybrid_states,
    loop_free_delta_rule,
)
from anefx.models.families.qwen3_5.delta_rule import SUBSTITUTIONS as DELTA_RULE_SUBSTITUTIONS
from anefx.models.families.qwen3_5.hybrid import (
    FULL,
    LINEAR,
    Hybrid,
    has_linear_attention,
    hybrid_family,
    separate_projections,
)
from anefx.models.families.qwen3_5.layout import HYBRID_DEFAULTS, TINY_EXPERTS, hybrid_tiny
from anefx.models.family import Default, StoredParts
from anefx.models.kv_cache import CACHE_AXES
from anefx.models.messages import shown
from anefx.models.tensor_shapes import ShapeReader

MODEL_TYPE = "qwen4_exp_text"
ARCHITECTURE = "Qwen4ExpForCausalLM"
CONFIG_CLASS = "Qwen4ExpTextConfig"
INDEXED = "indexed_attention"  # transformers' name of a full layer with a QSA indexer

# The transformers classes the passes leave (what docs/qwen4_exp.md explains): the report's
# blocking constructs name exactly these (tests/test_qwen4_exp.py)
UNLOWERED = (
    "Qwen4ExpTextNGramEmbedding",  # int64 hashing of token n-grams, a gather from the tables
    "Qwen4ExpTextQSAIndexer",  # top-k block selection, a scatter into the token mask
    "Qwen4ExpTextPLELayer",  # the gate sign(g) sqrt(max(|g|, eps)): no translators
    "Qwen4ExpTextAttention",  # the QSA mask laid over the causal one (not, masked_fill)
)

QSA_SUBSTITUTION = (
    "the QSA indexer's per-query loop (torch.nonzero, a data-dependent view) as one top-k over "
    "every query's complete key blocks (models/families/qwen4_exp.py qsa_selection; each query "
    "sees a prefix of the slots, as every mask anefx builds)"
)

# Qwen/Qwen4-Exp: transformers' Qwen4ExpTextConfig is documented with this checkpoint
# (@auto_docstring(checkpoint="Qwen/Qwen4-Exp")) and its defaults are taken as the model's
# shapes: 40 layers of 2048, [linear x 3, indexed] x 10, attention 16 heads / 2 KV x 256, linear
# 16 key / 32 value heads x 128, conv 4, 512 experts of 512, top 10, a shared expert of 512,
# vocabulary 248 320, untied head, context 32 768, rotary theta 1e4 over the whole head (the
# class's rope default), 4 residual streams mixed at rank 320, PLE conv 4, 3-grams, 8 heads per
# n-gram order, tables of primes from 20M, padded to 128 rows, seed 1234. No config.json was
# available here: the fields the class leaves unset are ASSUMED, and marked so below.
_PUBLISHED: dict[str, Any] = {
    "model_type": MODEL_TYPE,
    "architectures": [ARCHITECTURE],
    "vocab_size": 248320,
    "hidden_size": 2048,
    "num_hidden_layers": 40,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "tie_word_embeddings": False,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "hc_count": 4,
    "hc_lowrank": 320,
    "ple_conv_kernel_size": 4,
    "ngram_size": 3,
    "heads_per_ngram": 8,
    "ngram_vocab_size_base": 20_000_000,
    "make_ngram_vocab_size_divisible_by": 128,
    "seed": 1234,
    "split_ngram_parts": 512,
    # ASSUMED (the class leaves them unset, and builds no attention layer without them):
    # as many indexer heads as attention heads, one key head (the class requires it), the head
    # as wide as the attention's (the class requires the rotary width, 256 here, to fit), 32
    # blocks of 64 tokens selected
    "indexer_n_heads": 16,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 256,
    "indexer_budget": 2048,
    "indexer_compress_ratio": 64,
    # ASSUMED: one PLE layer (the first; PLE only goes on linear layers): the class's comment
    # puts "this embedding" at ~45B parameters, one table at these defaults (16 heads x ~20M
    # rows x 128); the end-of-text id (required with PLE) is Qwen3.5's, same vocabulary
    "ple_layer_ids": [1],
    "eos_token_id": 248046,
    "dtype": "bfloat16",
}


def _tiny(**fields: Any) -> dict[str, Any]:
    """The shared tiny shapes with Qwen4-Exp's: 4 layers [L, L, L, indexed], 8 experts of 32,
    top 2, a shared expert of 48, 4 streams mixed at rank 16, a quarter of each head rotating."""
    cfg = hybrid_tiny(
        MODEL_TYPE,
        ARCHITECTURE,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
        },
        **TINY_EXPERTS,
        norm_topk_prob=True,
        hc_count=4,
        hc_lowrank=16,
        layer_types=[LINEAR, LINEAR, LINEAR, INDEXED],
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=8,
        indexer_compress_ratio=4,
        eos_token_id=1,
        **fields,
    )
    cfg.pop("intermediate_size")  # no dense MLP
    return cfg


# PLE on two linear layers, 2- and 3-grams with 2 heads each into tables of primes from 1000
_TINY_PLE = {
    "ple_layer_ids": [1, 3],
    "ple_embed_dim": 32,
    "ple_conv_kernel_size": 4,
    "ngram_size": 3,
    "heads_per_ngram": 2,
    "ngram_vocab_size_base": 1000,
    "make_ngram_vocab_size_divisible_by": 128,
    "seed": 1234,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen4-exp": copy.deepcopy(_PUBLISHED),
    # hyper-connections, QSA on the indexed layer, PLE on layers 1 and 3, an untied head
    "qwen4-exp-tiny": _tiny(tie_word_embeddings=False, **_TINY_PLE),
    # no PLE: the hyper-connections and QSA alone
    "qwen4-exp-tiny-no-ple": _tiny(tie_word_embeddings=True),
}


# ---------------------------------------------------------------------------------------------
# Recognition and inference from tensor shapes


def recognise(suffixes: frozenset[str], first: frozenset[str]) -> int:
    """Hyper-connection mixers in the layers: above every other hybrid (Qwen3.5-MoE's 4)."""
    hyper = any(s.startswith("attn_hyper_connection.") for s in suffixes)
    return 6 if hyper and has_linear_attention(suffixes) else 0


def refuse(suffixes: frozenset[str], first: frozenset[str]) -> str | None:
    return None


def _mlp(r: ShapeReader) -> None:
    """Every layer routes (the class has no dense MLP): the experts and the shared expert."""
    sparse = routed_experts(r)
    infer_shared_expert(r, sparse)


def _own_fields(r: ShapeReader) -> None:
    """The hyper-connections, PLE and indexer fields from their tensors."""
    hidden = r.fields["hidden_size"]
    norm = r.layer_tensor(0, "attn_hyper_connection.hc_norm.weight")
    (streams,) = r.get(norm, 1)
    r.fields["hc_count"] = r.divide(norm, streams, hidden, "hidden_size")
    down = r.layer_tensor(0, "attn_hyper_connection.input_mix_weight_down.weight")
    r.fields["hc_lowrank"] = r.get(down, 2)[0]
    ple = sorted(i for i, per in r.layers.items() if "ple.value_proj.weight" in per)
    r.fields["ple_layer_ids"] = [i + 1 for i in ple]
    if ple:
        _, embed = r.get(r.layer_tensor(ple[0], "ple.value_proj.weight"), 2)
        r.fields["ple_embed_dim"] = embed
        _, _, kernel = r.get(r.layer_tensor(ple[0], "ple.conv1d.weight"), 3)
        r.fields["ple_conv_kernel_size"] = kernel
        _ngram_tables(r, ple[0], embed)
    full = [i for i, per in r.layers.items() if "self_attn.indexer.index_qk_proj.weight" in per]
    if full:
        (head_dim,) = r.get(r.layer_tensor(full[0], "self_attn.indexer.q_layernorm.weight"), 1)
        qk = r.layer_tensor(full[0], "self_attn.indexer.index_qk_proj.weight")
        heads = r.divide(qk, r.get(qk, 2)[0], head_dim, "indexer head dim") - 1
        r.fields.update(indexer_head_dim=head_dim, indexer_n_heads=heads, indexer_kv_heads=1)


# what the n-gram tables' shapes leave open: the n-gram orders and heads (only their product is
# the table's width), the prime base and the padding (only the padded sum of primes is its rows)
_NGRAM_FIELDS = ("ngram_size", "heads_per_ngram", "ngram_vocab_size_base")


def _shard_count(r: ShapeReader, table: str) -> int:
    """How many row shards `<table>.shard_<i>.weight` are stored (at least one)."""
    count = 0
    while f"{table}.shard_{count}.weight" in r.tensors:
        count += 1
    if not count:
        raise r.fail(f"tensor '{table}.weight' missing (nor its shards '{table}.shard_0.weight')")
    return count


def _ngram_tables(r: ShapeReader, layer: int, embed: int) -> None:
    """The n-gram fields from a preset whose first table has the stored rows and width (the
    hashing's sizes, which no tensor states); else the class's 3-grams with the heads the width
    gives, and the class's base (said by the defaults)."""
    table = r.layer_tensor(layer, "ple.ple_embedding.ngram_embedding")
    if f"{table}.weight" in r.tensors:
        rows, width = r.get(f"{table}.weight", 2)
    else:  # stored in row shards, as transformers saves it (stored_parts)
        shards = [r.get(f"{table}.shard_{i}.weight", 2) for i in range(_shard_count(r, table))]
        rows, width = sum(s[0] for s in shards), shards[0][1]
    heads = r.divide("ple_embed_dim", embed, width, "the n-gram table's width")
    for name, preset in PRESETS.items():
        if (
            not preset.get("ple_layer_ids")
            or preset.get("ple_embed_dim", preset["hidden_size"]) != embed
        ):
            continue
        preset_heads = (preset["ngram_size"] - 1) * preset["heads_per_ngram"]
        if preset_heads == heads and _ngram_rows(preset, 0) == rows:
            for field in (*_NGRAM_FIELDS, "make_ngram_vocab_size_divisible_by"):
                r.fields[field] = preset[field]
                r.reasons[field] = f"preset:{name}, whose n-gram table this is"
            return
    if heads % 2:
        raise r.fail(
            f"the n-gram tables have {heads} heads: not a whole number per n-gram order of "
            "the class's 3-grams; a config.json must give ngram_size and heads_per_ngram"
        )
    r.fields["heads_per_ngram"] = heads // 2


def _infer(r: ShapeReader) -> None:
    HYBRID.infer(r)
    _own_fields(r)


HYBRID = Hybrid(CONFIG_CLASS, PRESETS, separate_projections, _mlp)


# ---------------------------------------------------------------------------------------------
# Config checks (after the shared ones), before transformers builds anything

# The n-gram tables: transformers finds each head's prime by trial division from the base,
# head after head, when it builds the model; these bounds keep that (and the count here) quick
MAX_NGRAM_BASE = 1 << 31
MAX_NGRAM_HEADS = 64  # over every PLE layer (published: 16)
_QSA = (
    "indexer_n_heads",
    "indexer_kv_heads",
    "indexer_head_dim",
    "indexer_budget",
    "indexer_compress_ratio",
)
_OWN_INTS = (
    "hc_count",
    "hc_lowrank",
    "ple_conv_kernel_size",
    "ngram_size",
    "heads_per_ngram",
    "ngram_vocab_size_base",
    "make_ngram_vocab_size_divisible_by",
    "ple_embed_dim",
    *_QSA,
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(raw: Mapping[str, Any]) -> str | None:
    """The hybrid's checks with indexed layers read as full ones, then the fields of its own:
    positive integers, bounded n-gram tables, QSA fields all or none."""
    kinds = raw.get("layer_types")
    if isinstance(kinds, list):
        raw = {**raw, "layer_types": [FULL if k == INDEXED else k for k in kinds]}
    why = HYBRID.check_config(raw)
    if why:
        return why
    for field in _OWN_INTS:
        value = raw.get(field)
        if value is not None and (not _is_int(value) or value <= 0):
            return f"field '{field}' must be a positive integer, got {shown(value)}"
    ple = raw.get("ple_layer_ids") or []
    if not isinstance(ple, list) or not all(_is_int(i) for i in ple):
        return f"field 'ple_layer_ids' must list layer numbers, got {shown(ple)}"
    if ple:
        base = HYBRID.field(raw, "ngram_vocab_size_base")
        heads = (HYBRID.field(raw, "ngram_size") - 1) * HYBRID.field(raw, "heads_per_ngram")
        if base > MAX_NGRAM_BASE:
            return (
                f"field 'ngram_vocab_size_base' is {base}, above the bound {MAX_NGRAM_BASE} "
                "(anefx.models.families.qwen4_exp.MAX_NGRAM_BASE)"
            )
        if heads * len(set(ple)) > MAX_NGRAM_HEADS:
            return (
                f"fields 'ple_layer_ids', 'ngram_size' and 'heads_per_ngram' give "
                f"{heads * len(set(ple))} hashed n-gram tables, above the bound "
                f"{MAX_NGRAM_HEADS} (anefx.models.families.qwen4_exp.MAX_NGRAM_HEADS)"
            )
    given = [f for f in _QSA if raw.get(f) is not None]
    kinds = raw.get("layer_types") or []
    if given and len(given) < len(_QSA) or (not given and FULL in kinds):
        missing = [f for f in _QSA if raw.get(f) is None]
        return (
            f"field '{missing[0]}' missing: a Qwen4-Exp attention layer holds a QSA indexer, "
            f"which needs {', '.join(_QSA)}"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Parameter counts


def _hc_parameters(config: Mapping[str, Any], combine: bool) -> int:
    """One Qwen4ExpTextGatedResidual: its grouped norm (hc x hidden), the low-rank mixer down
    and up, and (in a layer) the per-stream injection weights."""
    wide = HYBRID.field(config, "hc_count") * config["hidden_size"]
    rank = HYBRID.field(config, "hc_lowrank")
    return wide + 2 * wide * rank + (wide * HYBRID.field(config, "hc_count") if combine else 0)


def _ngram_rows(config: Mapping[str, Any], ple_index: int) -> int:
    """The rows of one PLE layer's n-gram table, as transformers sizes it: a distinct prime per
    head (the global head index-th prime after the base), padded to the divisor."""
    from transformers.models.qwen4_exp.modeling_qwen4_exp import _find_nth_prime_after

    heads = (HYBRID.field(config, "ngram_size") - 1) * HYBRID.field(config, "heads_per_ngram")
    base = HYBRID.field(config, "ngram_vocab_size_base")
    total = sum(_find_nth_prime_after(base - 1, ple_index * heads + h + 1) for h in range(heads))
    divisor = HYBRID.field(config, "make_ngram_vocab_size_divisible_by")
    return math.ceil(total / divisor) * divisor


def _ple_parameters(config: Mapping[str, Any], ple_index: int) -> int:
    """One PLE layer: the n-gram table, key (-> hc x hidden) and value (-> hidden)
    projections, three grouped norms and the depthwise conv."""
    hidden = config["hidden_size"]
    wide = HYBRID.field(config, "hc_count") * hidden
    embed = config.get("ple_embed_dim") or hidden
    heads = (HYBRID.field(config, "ngram_size") - 1) * HYBRID.field(config, "heads_per_ngram")
    table = _ngram_rows(config, ple_index) * (embed // heads)
    kernel = HYBRID.field(config, "ple_conv_kernel_size")
    return table + embed * wide + embed * hidden + 3 * wide + wide * kernel


def other_parameters(config: Mapping[str, Any]) -> int:
    """Beside the mixers, MLPs, embedding and head: two hyper-connections per layer and the
    final mixer (no RMSNorm of the usual kind anywhere), PLE, and each attention layer's
    indexer (its q | k projection and two norms)."""
    layers = config["num_hidden_layers"]
    total = 2 * layers * _hc_parameters(config, True) + _hc_parameters(config, False)
    ple = sorted(set(config.get("ple_layer_ids") or []))
    total += sum(_ple_parameters(config, i) for i in range(len(ple)))
    full = layers - HYBRID.linear_attention(config)[0]
    if full:
        head_dim = config["indexer_head_dim"]
        rows = (config["indexer_n_heads"] + config["indexer_kv_heads"]) * head_dim
        total += full * (rows * config["hidden_size"] + 2 * head_dim)
    return total


# ---------------------------------------------------------------------------------------------
# How checkpoints store the n-gram tables

# transformers saves each table in `split_ngram_parts` row shards (`ngram_embedding.shard_<i>.
# weight`) and concatenates them when loading (conversion_mapping.py); the count is the class's
# default, which this reading assumes (a stored part count needs the config, which
# stored_parts is not given)
NGRAM_PARTS = 512
_NGRAM_TABLE = ".ple.ple_embedding.ngram_embedding.weight"


def stored_parts(name: str, shape: tuple[int, ...]) -> StoredParts:
    """The n-gram table as its row shards (torch.chunk's split of the rows), the experts per
    expert (common.expert_parts), every other parameter whole."""
    if not name.endswith(_NGRAM_TABLE) or len(shape) != 2:
        return expert_parts(name, shape)
    prefix = name[: -len(".weight")]
    size = -(-shape[0] // NGRAM_PARTS)
    return [
        ((slice(start, min(start + size, shape[0])),), f"{prefix}.shard_{i}.weight")
        for i, start in enumerate(range(0, shape[0], size))
    ]


# ---------------------------------------------------------------------------------------------
# States and the cache


def ple_conv_name(layer: int) -> str:
    return f"ple_conv_state_{layer}"


def ngram_context_name(layer: int) -> str:
    return f"ngram_ctx_{layer}"


def index_key_name(layer: int) -> str:
    return f"index_k_cache_{layer}"


def states(config: Any, context: int, dtype: str) -> tuple[State, ...]:
    """Qwen3.5's states (a linear layer's conv window and delta-rule state, a full layer's K
    and V) and, as transformers' cache holds them: a PLE layer's dilated-conv window (1, hc x
    hidden, (kernel - 1) x ngram_size) and its last ngram_size - 1 token ids (int32), an
    indexed layer's raw index keys (1, 1, indexer_head_dim, context). Described, not captured:
    a stateful capture is refused (`cache`)."""
    out: list[State] = []
    ple = set(getattr(config, "ple_layer_ids", None) or [])
    for state in hybrid_states(config, context, dtype):
        out.append(state)
        layer = state.layers[0]
        if state.kind == "recurrent" and layer + 1 in ple:
            wide = config.hc_count * config.hidden_size
            window = (config.ple_conv_kernel_size - 1) * config.ngram_size
            out.append(
                State(
                    ple_conv_name(layer),
                    "conv",
                    (layer,),
                    (1, wide, window),
                    dtype,
                    CONV_AXES,
                    True,
                )
            )
            out.append(
                State(
                    ngram_context_name(layer),
                    "conv",
                    (layer,),
                    (1, 1, config.ngram_size - 1),
                    "int32",
                    CONV_AXES,
                    True,
                )
            )
        if state.kind == "value":
            shape = (1, 1, config.indexer_head_dim, context)
            out.append(State(index_key_name(layer), "key", (layer,), shape, dtype, CACHE_AXES))
    return tuple(out)


def cache(owner: Any, positions: Any) -> Any:
    """No stateful capture: the QSA selection over a growing cache and the n-gram context of
    token ids have no lowering here (docs/qwen4_exp.md)."""
    raise AnefxInputError(
        "qwen4_exp: no stateful (--context) capture: its QSA indexer selects cache slots by "
        "top-k and its PLE hashes the token ids of the previous calls, neither of which "
        "anefx lowers (docs/qwen4_exp.md); check it without --context"
    )


def layer_kinds(config: Any) -> list[str]:
    """Each layer's kind, for reports: "linear", "indexed" (attention with QSA), and "+ple"."""
    ple = set(getattr(config, "ple_layer_ids", None) or [])
    return [
        ("linear" if kind == LINEAR else "indexed") + ("+ple" if i + 1 in ple else "")
        for i, kind in enumerate(config.layer_types[: config.num_hidden_layers])
    ]


def describe(config: Any) -> dict[str, str]:
    """`anefx inspect` rows: the layer kinds, the streams, QSA and PLE."""
    kinds = layer_kinds(config)
    rows = {
        "layer_kinds": ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)),
        "hyper_connections": f"{config.hc_count} streams, mixer rank {config.hc_lowrank}",
    }
    if INDEXED in config.layer_types:
        rows["qsa"] = (
            f"{config.indexer_n_heads} heads x {config.indexer_head_dim}, "
            f"{config.indexer_budget} tokens in blocks of {config.indexer_compress_ratio}"
        )
    if config.ple_layer_ids:
        rows["ple"] = (
            f"layers {config.ple_layer_ids}: {config.ngram_size}-grams x "
            f"{config.heads_per_ngram} heads, dim {config.ple_embed_dim}, tables from "
            f"{config.ngram_vocab_size_base:,} rows"
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Capture: the QSA selection without the per-query loop


def qsa_selection(
    indexer: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    past_key_values: Any = None,
) -> torch.Tensor:
    """transformers' Qwen4ExpTextQSAIndexer.forward for every query at once, when each query
    sees a prefix of the key slots (the causal and the context masks anefx builds): its
    complete blocks are the first n // r positional blocks of r slots (n the slots it sees);
    each block's key is the RMS-normed mean of its raw keys, rotated at its first slot; the
    block score is the sum over heads of relu(q . k) / sqrt(d); the top budget / r complete
    blocks and the incomplete tail are selected. Returns the (B, 1, S, T) boolean mask."""
    from transformers.models.qwen4_exp.modeling_qwen4_exp import apply_rotary_pos_emb

    if past_key_values is not None:
        raise AnefxInputError("qwen4_exp: the QSA indexer is captured without a cache")
    batch, seq, _ = hidden_states.shape
    d, r = indexer.index_head_dim, indexer.compress_ratio
    full_cos, full_sin = position_embeddings
    qk = indexer.index_qk_proj(hidden_states)
    q, raw_keys = torch.split(qk, [indexer.index_n_heads * d, indexer.index_kv_heads * d], dim=-1)
    # rotated as (B, heads, S, d): the tables are read one row per position (what
    # fold_position_tables folds into constants)
    q = indexer.q_layernorm(q.reshape(batch, seq, -1, d)).transpose(1, 2)
    q = apply_rotary_pos_emb(q, cos=full_cos[:, -seq:, :], sin=full_sin[:, -seq:, :])
    slots = attention_mask.shape[-1]
    blocks = slots // r
    # in float arithmetic and comparisons the emitter has, so that what the report names in
    # this class is the selection itself (top-k, the scatter of the chosen blocks)
    if attention_mask.dtype == torch.bool:
        visible = attention_mask[:, 0].float()
    else:  # additive: 0 where a slot is seen, a large negative where not
        visible = (attention_mask[:, 0] > -1.0).float()
    if blocks == 0:  # fewer slots than a block: nothing to select, every slot is tail
        return (visible > 0.5).unsqueeze(1)
    seen = visible.sum(-1, keepdim=True)  # (B, S, 1): the slots each query sees, a prefix
    device = hidden_states.device
    # block b is complete for a query that sees its (b + 1) r slots
    ends = torch.arange(1, blocks + 1, dtype=torch.float32, device=device) * r
    is_complete = (ends - 0.5 < seen).float()  # (B, S, blocks)
    pooled = raw_keys[:, : blocks * r].reshape(batch, blocks, r, d).float().mean(2)
    pooled = indexer.k_layernorm(pooled.to(raw_keys.dtype))
    # each block's key rotated at its first slot: the key given to every slot of its block,
    # rotated there (one table row per slot), read at the block's first slot
    spread = pooled.repeat_interleave(r, dim=1).unsqueeze(1)  # (B, 1, blocks x r, d)
    rotated = apply_rotary_pos_emb(
        spread, cos=full_cos[:, : blocks * r], sin=full_sin[:, : blocks * r]
    )
    block_keys = rotated[:, :, ::r]  # (B, 1, blocks, d)
    scores = torch.matmul(q.float(), block_keys.float().transpose(-1, -2))  # (B, H, S, blocks)
    scores = torch.relu(scores).sum(1) / math.sqrt(d)  # (B, S, blocks), each >= 0
    # incomplete blocks below every complete one
    scores = scores - (1.0 - is_complete) * 1e4
    top = scores.topk(min(indexer.block_topk, blocks), dim=-1).indices
    chosen = torch.zeros_like(scores).scatter(-1, top, 1.0) * is_complete
    in_chosen = chosen.repeat_interleave(r, dim=-1)
    if slots > blocks * r:  # slots past the last whole block: never complete, always tail
        rest = torch.zeros(batch, seq, slots - blocks * r, device=device)
        in_chosen = torch.cat([in_chosen, rest], dim=-1)
    # a slot is in the tail when its block is not complete
    block_end = (torch.arange(slots, device=device) // r + 1).float() * r
    tail = (block_end - 0.5 > seen).float()
    return ((in_chosen + tail) * visible > 0.5).unsqueeze(1)


@contextlib.contextmanager
def capture_context(model: torch.nn.Module):
    """Qwen3.5's substitutions (the loop-free delta rule, the text rotary's recomposition) and
    the QSA selection of `qsa_selection` for every indexer; restored afterwards."""
    saved = []
    for module in model.modules():
        if type(module).__name__ == "Qwen4ExpTextQSAIndexer":
            saved.append(module)
            module.forward = qsa_selection.__get__(module)
    try:
        with loop_free_delta_rule(model):
            yield
    finally:
        for module in saved:
            del module.forward


DEFAULTS: tuple[Default, ...] = (
    Default("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}, "the class's"),
    *HYBRID_DEFAULTS,
    Default("num_experts_per_tok", lambda f: min(10, f["num_experts"]), "the class's 10"),
    Default("norm_topk_prob", True, "the class's"),
    Default("ngram_size", 3, "the class's (no tensor stores it)"),
    Default("heads_per_ngram", 8, "the class's (no tensor splits the table's width by head)"),
    Default("indexer_budget", 2048, "ASSUMED (the class has none; no tensor stores it)"),
    Default("indexer_compress_ratio", 64, "ASSUMED (the class has none; no tensor stores it)"),
    Default("eos_token_id", 248046, "Qwen3.5's, same vocabulary (PLE needs one)"),
)

# The composite Qwen4ExpForConditionalGeneration (`qwen4_exp`), read as its text model: the
# head is tied by the outer config's flag, as Qwen3.5's
NESTED = vl_layout("qwen4_exp", "Qwen4ExpConfig")

FAMILY = hybrid_family(
    HYBRID,
    with_experts=True,
    model_type=MODEL_TYPE,
    order=10,
    config_class=CONFIG_CLASS,
    model_class=ARCHITECTURE,
    architectures=(ARCHITECTURE,),
    recognise=recognise,
    sign="attn_hyper_connection tensors (Qwen4-Exp)",
    refuse=refuse,
    infer=_infer,
    check_config=check_config,
    defaults=DEFAULTS,
    presets=PRESETS,
    tiny="qwen4-exp-tiny",
    stored_parts=stored_parts,
    other_parameters=other_parameters,
    parameter_fields=(
        "hc_count",
        "hc_lowrank",
        "ple_layer_ids",
        "ple_embed_dim",
        "ple_conv_kernel_size",
        "ngram_size",
        "heads_per_ngram",
        "ngram_vocab_size_base",
        "make_ngram_vocab_size_divisible_by",
        *_QSA,
    ),
    states=states,
    cache=cache,
    capture_context=capture_context,
    substitutions=(*DELTA_RULE_SUBSTITUTIONS, QSA_SUBSTITUTION),
    layer_kinds=layer_kinds,
    describe=describe,
    unlowered=UNLOWERED,
    # no final RMSNorm: the streams' mixer stands before the head
    norm_path="model.hyper_connection_mixer",
    nested=(NESTED,),
    dropped_tensors=(
        ("model.visual.", "of the vision tower"),
        ("mtp.", "of multi-token prediction"),
    ),
)
