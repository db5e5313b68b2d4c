"""The KV cache of a stateful capture: its state names, shapes and the cache object.

The families (models/families/) describe their states with these; capture registers one buffer
per state and hands the cache object to the stock model.

Each layer's K and V are held as (1, kv_heads, head_dim, context): a call's new rows arrive from
the 1x1 convs channels-first, (1, kv_heads, head_dim, S), so they are written along the last
axis with no transpose (``anefx::kv_write``, Core ML's ``slice_update``), and attention reads
the cache through matmul's transpose flags. The emitter packs every state of a program into one
Core ML state (targets/coreml.py), the one state per program the devices run.
"""

from __future__ import annotations

from typing import Any

import torch

from anefx.core.ops import kv_write

# the axes of one layer's cache: batch, kv heads, head_dim, context slots
CACHE_AXES = ("B", "H", "D", "T")


def cache_name(kind: str, layer: int) -> str:
    """State names: ``k_cache_<layer>`` and ``v_cache_<layer>``, each (1, Hkv, D, context)."""
    return f"{kind}_cache_{layer}"


def kv_cache_shape(config: Any, context: int) -> tuple[int, int, int, int]:
    """The shape of each layer's K (and V) state: (1, kv_heads, head_dim, context)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // (
        config.num_attention_heads
    )
    return (1, config.num_key_value_heads, head_dim, context)


class RowKVCache:
    """A transformers-compatible cache whose update writes only the call's rows.

    ``update`` gets the new K and V as (1, Hkv, S, D), writes them at the call's first position
    into OWNER's buffers (named by :func:`cache_name`, laid out (1, Hkv, D, T)) with
    ``anefx::kv_write``, and returns the whole caches as (1, Hkv, T, D) for attention. A call
    writes S contiguous slots from its first position: the slots of padding tokens after the
    real ones are past every real position, never seen by a query before a later call writes
    its own tokens there (the causal mask), so padding corrupts nothing a query reads.
    """

    is_compileable = False

    def __init__(self, owner: torch.nn.Module, positions: torch.Tensor):
        self.owner, self.positions = owner, positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = []
        for kind, new in (("k", key_states), ("v", value_states)):
            buf = getattr(self.owner, cache_name(kind, layer_idx))
            merged = kv_write(buf, new.transpose(-1, -2), self.positions)
            buf.copy_(merged)  # export turns this into a state output
            out.append(merged.transpose(-1, -2))
        return tuple(out)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """What the model call passes down beside the cache (a KV cache needs nothing)."""
        return {}
