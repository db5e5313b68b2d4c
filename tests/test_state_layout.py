"""The stateful layout on real shapes (meta device: structure only): every program, a single
package or a part of Qwen3-0.6B and Qwen3-8B, holds at most one Core ML state, and no op of the
decode function outputs a tensor of a cache's size except the cache writes themselves."""

from __future__ import annotations

import math

import pytest
import torch

from anefx.core import rules
from anefx.core.ops import KV_WRITE
from anefx.core.signature import pack_states, signature_of
from anefx.lowering.checker import check_graph

CONTEXT = 512
MAX_PART_BYTES = 1 << 30  # convert's default --max-chunk-mb is 1024


def _decode(preset: str):
    import anefx

    return anefx.lower(
        f"preset:{preset}", seq_len=1, dtype=torch.float16, meta=True, context=CONTEXT
    )


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-8b"])
def test_one_state_per_program_and_no_cache_sized_elementwise_op(preset: str) -> None:
    from anefx.targets.split_packages import plan_parts, split_graph

    low = _decode(preset)
    gm = low.graph_module
    states = signature_of(gm).states
    cache = math.prod(states[0].shape)
    # the whole model as one program: its K and V caches are the rows of one state
    (packed,) = pack_states(states)
    assert packed.shape == (len(states), *states[0].shape[1:]) and packed.axes[-1] == "T"
    # and as the parts convert writes: each part holds one state, of its own layers only
    plans = plan_parts(gm, MAX_PART_BYTES)
    assert len(plans) > 1  # 0.6B's 1.5 GB too: an embedding, decoder chunks, a head
    for plan, part in zip(plans, split_graph(gm, plans), strict=True):
        held = pack_states(signature_of(part).states)
        assert len(held) <= rules.MAX_STATES_PER_PROGRAM, plan.name
        if held:
            assert set(held[0].layers) == set(plan.layers), plan.name
        # each part as convert checks it before emitting: no rule error (state_count included)
        report = check_graph(part, f"lowered:{plan.name}")
        assert not report.errors, (plan.name, [(v.rule, v.node) for v in report.errors[:3]])
    # decode: a cache-sized result comes only from a cache write (slice_update in the
    # program, which writes the new rows in place), never from an elementwise op
    sized = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.meta.get("val"), torch.Tensor)
        and n.meta["val"].numel() >= cache
        and n.target is not KV_WRITE
        and n.target not in (torch.ops.aten.reshape.default, torch.ops.aten.transpose.int)
    ]
    assert not sized, [(n.name, n.target, tuple(n.meta["val"].shape)) for n in sized[:5]]
    assert not low.report.errors or {v.rule for v in low.report.errors} == {"weights_size"}
