"""Op counts per decoder layer of an emitted program, read back from its spec.

Emitted op names carry their source module (targets/mil_program.py: ``split_op_name``), so each
operation of a function can be attributed to ``model.layers.<i>``. The README's figures ("54
ops per decoder layer, 0 transposes + 8 reshapes") are these counts; benchmarks/convert.py
reports them and tests/test_budgets.py holds them as upper bounds, through the functions here.
"""

from __future__ import annotations

import statistics
from collections import Counter

from anefx.lowering.checker import OpInfo
from anefx.models.families import layer_index
from anefx.targets.mil_program import mil_ops


def program_ops(spec, function: str = "main") -> list[OpInfo]:
    """The operations of FUNCTION (no inputs, no consts), in program order, each with the
    module its name carries: a layer's KV-cache writes (slice_update, write_state, named after
    the layer's kv_write) count in that layer, as in ANEMLL's op counts."""
    return [o for o in mil_ops(spec, function) if o.kind not in ("input", "const")]


def layer_histograms(ops: list[OpInfo], n_layers: int) -> tuple[list[Counter], int]:
    """The op-type histogram of each of the N_LAYERS decoder layers, attributed by ``module``,
    and the number of ops outside every layer (embedding, final norm, LM head, unknown)."""
    per_layer = [Counter() for _ in range(n_layers)]
    outside = 0
    for o in ops:
        layer = layer_index(o.module)
        if layer is not None and layer < n_layers:
            per_layer[layer][o.op] += 1
        else:
            outside += 1
    return per_layer, outside


def layer_stats(ops: list[OpInfo], n_layers: int) -> dict:
    """Per-decoder-layer op counts of a program's ops: medians over the layers (the tables
    shared by every layer are computed once, in layer 0, so the median is a repeating layer),
    the largest layer, and the op types of a representative layer."""
    per_layer, outside = layer_histograms(ops, n_layers)
    totals = [sum(c.values()) for c in per_layer]
    med = statistics.median(totals)
    # a representative layer for the op breakdown: the first one closest to the median count
    rep = min(range(n_layers), key=lambda i: abs(totals[i] - med))
    return {
        "ops_per_layer": med,
        "ops_per_layer_max": max(totals),
        "ops_layer0": totals[0],
        "transposes_per_layer": statistics.median(c["transpose"] for c in per_layer),
        "reshapes_per_layer": statistics.median(c["reshape"] for c in per_layer),
        "copies_per_layer": statistics.median(c["transpose"] + c["reshape"] for c in per_layer),
        "outside_layers": outside,
        "layer_op_types": dict(per_layer[rep].most_common()),
        "layer_op_types_index": rep,
    }
