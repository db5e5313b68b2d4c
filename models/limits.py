"""Bounds on what an input may ask for, checked before any memory or disk is spent on it.

These are not ANE limits (those are the rule table's, ``core/rules.py``): they keep a
malformed or hostile config, manifest or flag from asking for a 20 000-layer model or a 128 GB
state before a single weight is read. Each bound sits well above every published Qwen model
(the largest, noted beside each, from the presets and the published configs), so no real
checkpoint meets one; a value above a bound is refused with exit 2 naming the field and the
bound.
"""

from __future__ import annotations

# decoder layers: Qwen3-235B-A22B has 94, Qwen2.5-72B 80
MAX_LAYERS = 512
# model width: Qwen2.5-72B 8192; 65536 is also the ANE's channel limit (rules.DIM_LIMITS["C"])
MAX_HIDDEN = 65536
# MLP width: Qwen2.5-72B 29568
MAX_INTERMEDIATE = 262144
# vocabulary: Qwen3.5 248320
MAX_VOCAB = 1 << 20
# attention heads (query, key/value): Qwen2.5-72B 64 / 8
MAX_HEADS = 1024
# per-head width: 256 in Qwen3.5, 128 in Qwen3
MAX_HEAD_DIM = 4096
# routed experts per MoE block: Qwen3.5-397B-A17B 512
MAX_EXPERTS = 4096
# max_position_embeddings as declared (not the context anefx builds): Qwen3.5 262144
MAX_POSITIONS = 1 << 24
# a model's parameters: Qwen3.5-397B about 4e11
MAX_PARAMETERS = 4 * 10**12
# the bytes of every Core ML state of one artifact (KV cache): Qwen3-32B at context 16384 holds
# 4.3 GB; a manifest or config asking for more than this is refused before anything is allocated
MAX_STATE_BYTES = 64 << 30
# generation / verification steps in one call (a context cannot hold more anyway)
MAX_STEPS = 1 << 20

# Files of a checkpoint folder.
# config.json and *.safetensors.index.json, read whole: a published config is a few KB, the
# largest index (per-expert tensors of a 512-expert, 94-layer model) about 15 MB
MAX_JSON_BYTES = 64 << 20
# tensors in a checkpoint, over all shards: Qwen3-235B-A22B stores 37 000 (experts apart), a
# 512-expert, 94-layer model 145 000; each costs a Python object per header entry
MAX_TENSORS = 1 << 19

# config field -> (bound, what it counts), checked before the config class is built (which
# allocates per layer) and before the model; a model's other sizes are products of these and
# are held by MAX_PARAMETERS
CONFIG_BOUNDS: dict[str, tuple[int, str]] = {
    "num_hidden_layers": (MAX_LAYERS, "MAX_LAYERS"),
    "hidden_size": (MAX_HIDDEN, "MAX_HIDDEN"),
    "intermediate_size": (MAX_INTERMEDIATE, "MAX_INTERMEDIATE"),
    "moe_intermediate_size": (MAX_INTERMEDIATE, "MAX_INTERMEDIATE"),
    "shared_expert_intermediate_size": (MAX_INTERMEDIATE, "MAX_INTERMEDIATE"),
    "vocab_size": (MAX_VOCAB, "MAX_VOCAB"),
    "num_attention_heads": (MAX_HEADS, "MAX_HEADS"),
    "num_key_value_heads": (MAX_HEADS, "MAX_HEADS"),
    "head_dim": (MAX_HEAD_DIM, "MAX_HEAD_DIM"),
    "num_experts": (MAX_EXPERTS, "MAX_EXPERTS"),
    "num_local_experts": (MAX_EXPERTS, "MAX_EXPERTS"),
    "num_experts_per_tok": (MAX_EXPERTS, "MAX_EXPERTS"),
    "decoder_sparse_step": (MAX_LAYERS, "MAX_LAYERS"),
    "max_position_embeddings": (MAX_POSITIONS, "MAX_POSITIONS"),
    "sliding_window": (MAX_POSITIONS, "MAX_POSITIONS"),
    "original_max_position_embeddings": (MAX_POSITIONS, "MAX_POSITIONS"),
}
# num_labels of a config (a classifier's; a causal LM has none): transformers builds an
# id2label entry for each
MAX_LABELS = 1 << 16
# the RoPE base: published Qwen models use 1e6 and 5e6 (the 2507 updates); torch computes
# base ** x in float32, where a larger base only gives a degenerate table (or an overflow)
MAX_ROPE_THETA = 1e12
# rope scaling numbers (factor, attention_factor, beta_fast, mscale, ...): published yarn
# configs use factor 4, llama3 8, longrope about 40, beta_fast 32
MAX_ROPE_SCALE = 1e6
