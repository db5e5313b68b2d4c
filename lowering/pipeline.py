"""The lowering pipeline as data: each position with the reason it sits there."""

from __future__ import annotations

import torch

from anefx.lowering.pass_manager import Step
from anefx.passes import (
    add_argmax_head,
    cast_to_compute_dtype,
    densify_experts,
    fold_position_tables,
    limit_rank,
    linear_to_conv2d,
    remove_noop_nodes,
    rms_norm_to_layer_norm,
    sink_layout_changes,
    split_lm_head,
)


def build_pipeline(
    dtype: torch.dtype | None = None, table_len: int | None = None, argmax: bool = False
) -> list[Step]:
    """The ordered passes; DTYPE is the compute dtype, TABLE_LEN the positions tables cover,
    ARGMAX adds the in-model token choice."""
    steps = [
        Step(
            "remove_noop_nodes",
            remove_noop_nodes.remove_noop_nodes,
            remove_noop_nodes.postcondition,
            "first: every matcher after it sees one spelling per op, without asserts, aliases "
            "and casts that do nothing",
        ),
        Step(
            "densify_experts",
            densify_experts.densify_experts,
            densify_experts.postcondition,
            "second: a mixture-of-experts block is matched on the captured spelling (views as "
            "reshape, asserts gone) and becomes plain linears before any pass lays them out; "
            "the router's fp32 softmax is left to the dtype pass",
        ),
        Step(
            "fold_position_tables",
            fold_position_tables.FoldPositionTables(table_len),
            fold_position_tables.postcondition,
            "before the dtype pass: the rotary tables are evaluated by the captured graph in the "
            "precision transformers uses (fp32), then stored in the compute dtype",
        ),
        Step(
            "rms_norm_to_layer_norm",
            rms_norm_to_layer_norm.rms_norm_to_layer_norm,
            rms_norm_to_layer_norm.postcondition,
            "before the dtype pass: the RMSNorm pattern includes transformers' fp32 casts, and "
            "matching is simplest on the logical (1, S, C) layout",
        ),
        Step(
            "cast_to_compute_dtype",
            cast_to_compute_dtype.CastToComputeDtype(dtype),
            cast_to_compute_dtype.postcondition,
            "after the norm rewrite has consumed its casts: the remaining fp32 islands "
            "(softmax) fold into the compute dtype",
        ),
        Step(
            "limit_rank",
            limit_rank.limit_rank,
            limit_rank.postcondition,
            "before layout work: the layout sweep and the emitter handle rank <= 4 only",
        ),
        Step(
            "linear_to_conv2d",
            linear_to_conv2d.linear_to_conv2d,
            linear_to_conv2d.postcondition,
            "after the graph is rank <= 4 and norm-free of pow/rsqrt: introduces the (B, C, 1, S) "
            "convs with explicit layout changes around each",
        ),
        Step(
            "sink_layout_changes",
            sink_layout_changes.sink_layout_changes,
            sink_layout_changes.postcondition,
            "right after the convs exist: carries their layout through the decoder so the "
            "permutes linear_to_conv2d wrote cancel",
        ),
        Step(
            "split_lm_head",
            split_lm_head.split_lm_head,
            split_lm_head.postcondition,
            "after layout: the head is a channels-first conv whose slices become the outputs "
            "directly, with no permute back to (1, S, V)",
        ),
    ]
    if argmax:
        steps.append(
            Step(
                "add_argmax_head",
                add_argmax_head.add_argmax_head,
                add_argmax_head.postcondition,
                "after the split: it reads the slices the split made the outputs",
            )
        )
    steps += [
        Step(
            "remove_noop_nodes_final",
            remove_noop_nodes.remove_noop_nodes,
            remove_noop_nodes.postcondition,
            "last: merges the copies of shared relayouts (rotary tables) the sweep emitted per "
            "layer, chains of views, and dead code",
        ),
    ]
    return steps
