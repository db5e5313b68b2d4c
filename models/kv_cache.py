"""The KV cache of a stateful capture: its state names, shapes and the cache object.

The families (models/families/) describe their states with these; capture registers one buffer
per state and hands the cache object to the stock model.
"""

from __future__ import annotations

from typing import Any

import torch


def cache_name(kind: str, layer: int) -> str:
    """State names: ``k_cache_<layer>`` and ``v_cache_<layer>``, each (1, Hkv, context, D)."""
    return f"{kind}_cache_{layer}"


def kv_cache_shape(config: Any, context: int) -> tuple[int, int, int, int]:
    """The shape of each layer's K (and V) state: (1, kv_heads, context, head_dim)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // (
        config.num_attention_heads
    )
    return (1, config.num_key_value_heads, context, head_dim)


class OneHotKVCache:
    """A transformers-compatible cache whose update is written with ANE ops only.

    Rows of the cache are addressed by a one-hot matrix ``write`` (context, S) built from the
    position ids: ``cache' = cache * (1 - rowsum(write)) + write @ k``. No scatter, no dynamic
    index, exact in fp16 (every product is with 0 or 1). A position >= context writes nothing.
    OWNER holds the state buffers, named by :func:`cache_name`.
    """

    is_compileable = False

    def __init__(self, owner: torch.nn.Module, write: torch.Tensor):
        self.owner, self.write = owner, write
        self.keep = 1 - write.sum(-1, keepdim=True)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = []
        for kind, new in (("k", key_states), ("v", value_states)):
            buf = getattr(self.owner, cache_name(kind, layer_idx))
            merged = buf * self.keep + self.write @ new
            buf.copy_(merged)  # export turns this into a state output
            out.append(merged)
        return tuple(out)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
