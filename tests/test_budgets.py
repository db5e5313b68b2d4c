"""Op budgets per decoder layer: the README's headline figures, held as upper bounds.

The counts depend on the layer shapes, not on the depth or the vocabulary, and a full Qwen3-0.6B
conversion is too slow for the default run. So a slice of preset:qwen3-0.6b with the real layer
shapes (hidden 1024, 16 heads, 8 KV heads, head_dim 128, intermediate 3072), 3 layers and a
small vocabulary, with random weights, is lowered, emitted and read back; its ops are counted
per layer as benchmarks/convert.py counts them (``anefx.targets.op_counts``: op names carry
their source module; a layer's KV-cache reads and writes count in that layer).

Three layers, because the tables every layer shares (the rotary-table lookup, the mask relayout)
are computed once, in layer 0: layers 1 and 2 are the repeating layer that the README's "per
decoder layer" (the median over the 28 layers) describes, and layer 0 has a budget of its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

LAYERS = 3
VOCAB = 512  # the LM head is outside the layers; a narrow one keeps the packages small
SEQ = 64  # the README's prefill length
CONTEXT = 512  # the README's decode function: S = 1, a KV cache of 512 slots as state


@dataclass(frozen=True)
class Budget:
    """Upper bounds for the ops of one decoder layer of one emitted function."""

    ops: int  # ops of a repeating layer (layers 1 and after)
    reshapes: int  # of which reshapes; a repeating layer has no transpose at all
    types: frozenset[str]  # the op types a repeating layer has today: no new type may appear
    first_ops: int  # layer 0: the repeating layer plus the tables shared by every layer
    first_transposes: int
    first_types: frozenset[str]  # the types only layer 0 has (the shared tables' lookup)


# Measured on the 3-layer slice (ops per layer 0, 1, 2; reshapes; transposes):
#   prefill, seq 64 (anefx.emit, function main):  60, 54, 54 ops; 10, 8, 8 reshapes; no transpose
#     layer 1: mul 12, slice_by_index 8, reshape 8, conv 7, concat 6, add 5, layer_norm 4,
#     matmul 2, softmax 1, silu 1; layer 0 adds reshape 2, matmul 2, equal 1, cast 1
#   decode, S = 1, KV cache of 512 as the program's one state:  76, 67, 67 ops; 12, 9, 9
#     reshapes; none. layer 1: mul 12, slice_by_index 10, reshape 9, add 9, conv 7, concat 6,
#     layer_norm 4, slice_update 2, write_state 2, read_state 2, matmul 2, softmax 1, silu 1: each
#     of K and V is written as its new rows (slice_update at [row, 0, 0, position], two int adds
#     for the bounds, the state updated and its row read back as a view); layer 0 adds the
#     one-hot rotary lookup and the shared write position (reshape 3, matmul 2, concat 1,
#     slice_by_index 1, equal 1, cast 1)
#   stateful prefill, seq 64, same package:  77, 67, 67 ops; as decode, and one transpose in
#     layer 0 (the shared mask relayout)
# The one-hot cache write these replace (before issue 15) was 66 ops per decode layer and 65 per
# stateful prefill layer, with four cache-sized ops per K and per V (benchmarks/cost.py).
_PREFILL_TYPES = {"mul", "slice_by_index", "reshape", "conv", "concat", "add", "layer_norm"}
_PREFILL_TYPES |= {"matmul", "softmax", "silu"}
_STATE_TYPES = {"read_state", "write_state", "slice_update"}
_TABLE_TYPES = frozenset({"equal", "cast"})  # the one-hot rotary-table lookup, in layer 0
BUDGETS = {
    "prefill": Budget(54, 8, frozenset(_PREFILL_TYPES), 60, 0, _TABLE_TYPES),
    "decode": Budget(67, 9, frozenset(_PREFILL_TYPES | _STATE_TYPES), 76, 0, _TABLE_TYPES),
    "stateful_prefill": Budget(
        67, 9, frozenset(_PREFILL_TYPES | _STATE_TYPES), 77, 1, _TABLE_TYPES | {"transpose"}
    ),
}


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, list]:
    """Budget name -> the ops of that function of the emitted slice (program order)."""
    import anefx
    from anefx.generation import lower_decoder
    from anefx.models.presets import get_preset
    from anefx.models.synthetic import random_model
    from anefx.targets.coreml import emit_functions, read_spec
    from anefx.targets.op_counts import program_ops

    config = get_preset("qwen3-0.6b")
    config.update(num_hidden_layers=LAYERS, max_window_layers=LAYERS, vocab_size=VOCAB)
    model = random_model(config, torch.float16, seed=0)
    root: Path = tmp_path_factory.mktemp("budgets")
    prefill = root / "prefill.mlpackage"
    anefx.emit(anefx.lower(model, seq_len=SEQ, dtype=torch.float16), prefill)
    dec = lower_decoder(model, batch=SEQ, context=CONTEXT, dtype=torch.float16)
    stateful = root / "stateful.mlpackage"
    emit_functions({"prefill": dec.prefill, "decode": dec.decode}, stateful, default="decode")
    spec = read_spec(stateful)
    return {
        "prefill": program_ops(read_spec(prefill), "main"),
        "decode": program_ops(spec, "decode"),
        "stateful_prefill": program_ops(spec, "prefill"),
    }


def test_the_slice_has_the_real_layer_shapes(programs: dict) -> None:
    """The budgets speak for Qwen3-0.6B only if the slice's layers are its layers: the convs of
    a layer have its widths (16 heads and 8 KV heads of 128, intermediate 3072, hidden 1024)."""
    widths = {
        o.module.removeprefix("model.layers.1."): o.shapes[0]
        for o in programs["prefill"]
        if o.op == "conv" and (o.module or "").startswith("model.layers.1.")
    }
    assert widths == {
        "self_attn.q_proj": (1, 16 * 128, 1, SEQ),
        "self_attn.k_proj": (1, 8 * 128, 1, SEQ),
        "self_attn.v_proj": (1, 8 * 128, 1, SEQ),
        "self_attn.o_proj": (1, 1024, 1, SEQ),
        "mlp.gate_proj": (1, 3072, 1, SEQ),
        "mlp.up_proj": (1, 3072, 1, SEQ),
        "mlp.down_proj": (1, 1024, 1, SEQ),
    }


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_ops_per_decoder_layer_within_budget(programs: dict, name: str) -> None:
    from anefx.targets.op_counts import layer_histograms, layer_stats

    budget = BUDGETS[name]
    ops = programs[name]
    per_layer, _ = layer_histograms(ops, LAYERS)
    first, repeating = per_layer[0], per_layer[1:]
    totals = [sum(c.values()) for c in per_layer]
    # the slice stands for 28 layers only if every layer after the first is the same
    assert all(c == repeating[0] for c in repeating), totals
    layer = repeating[0]
    assert sum(layer.values()) <= budget.ops, (totals, dict(layer))
    assert layer["transpose"] == 0, dict(layer)
    assert layer["reshape"] <= budget.reshapes, dict(layer)
    new = set(layer) - budget.types
    assert not new, f"a decoder layer gained op types {sorted(new)}: {dict(layer)}"
    # the figures as the benchmark reports them (medians over the layers)
    stats = layer_stats(ops, LAYERS)
    assert stats["ops_per_layer"] <= budget.ops
    assert stats["transposes_per_layer"] == 0
    assert stats["reshapes_per_layer"] <= budget.reshapes
    # layer 0 also holds what every layer shares, computed once
    assert sum(first.values()) <= budget.first_ops, (totals, dict(first))
    assert first["transpose"] <= budget.first_transposes, dict(first)
    new = set(first) - budget.types - budget.first_types
    assert not new, f"decoder layer 0 gained op types {sorted(new)}: {dict(first)}"


def test_every_layer_writes_only_its_rows_of_the_one_state(programs: dict) -> None:
    """The state ops are attributed to their layers (the decode budget counts them): each layer
    writes its K and V rows with one slice_update each, into the program's one state."""
    from anefx.targets.op_counts import layer_histograms

    for name in ("decode", "stateful_prefill"):
        per_layer, outside = layer_histograms(programs[name], LAYERS)
        for c in per_layer:
            assert (c["slice_update"], c["write_state"]) == (2, 2), (name, dict(c))
        # the state is read once, at the start, outside every layer
        reads = [o for o in programs[name] if o.op == "read_state" and not o.module]
        assert len(reads) == 1, (name, reads)
    assert not Counter(o.op for o in programs["prefill"]) & Counter(_STATE_TYPES)
