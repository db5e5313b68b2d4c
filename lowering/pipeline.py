"""The lowering pipeline as data: each position names a registered pass, with the reason it
sits there (the passes register themselves in ``anefx.core.pass_registry``; this module does
not import them)."""

from __future__ import annotations

import torch

from anefx.core.pass_registry import get_pass
from anefx.lowering.pass_manager import Step


def _step(name: str, reason: str, label: str | None = None, **options) -> Step:
    """The registered pass NAME built with OPTIONS, at a position labelled LABEL (default NAME)."""
    spec = get_pass(name)
    return Step(label or name, spec.build(**options), spec.postcondition, reason, spec.summary)


def build_pipeline(
    dtype: torch.dtype | None = None, table_len: int | None = None, argmax: bool = False
) -> list[Step]:
    """The ordered passes; DTYPE is the compute dtype, TABLE_LEN the positions tables cover,
    ARGMAX adds the in-model token choice."""
    steps = [
        _step(
            "remove_noop_nodes",
            "first: every matcher after it sees one spelling per op, without asserts, aliases "
            "and casts that do nothing",
        ),
        _step(
            "densify_experts",
            "second: a mixture-of-experts block is matched on the captured spelling (views as "
            "reshape, asserts gone) and becomes plain linears before any pass lays them out; "
            "the router's fp32 softmax is left to the dtype pass",
        ),
        _step(
            "fold_position_tables",
            "before the dtype pass: the rotary tables are evaluated by the captured graph in the "
            "precision transformers uses (fp32), then stored in the compute dtype",
            table_len=table_len,
        ),
        _step(
            "fold_constants",
            "after the position tables (computed from positions, not constants alone) and "
            "before the matchers: a zero-centred norm's (1 + w) is then a constant weight, a "
            "conv weight a constant, a delta rule without a state has no zero-state arithmetic",
        ),
        _step(
            "split_to_slices",
            "before the passes that read slices: a split is a tuple of values the emitter has "
            "no op for, an integer index a slice plus a reshape",
        ),
        _step(
            "split_sliced_linears",
            "after split_to_slices (the query/gate chunk is then slices) and before "
            "linear_to_conv2d: the linear is split by its weight rows, not its activations",
        ),
        _step(
            "merge_concatenated_linears",
            "right after split_sliced_linears, whose parts of a fused projection (Qwen3-Next's "
            "q | k | v | z) it joins again where the model concatenates them, and before "
            "linear_to_conv2d: one linear becomes one conv",
        ),
        _step(
            "sdpa_to_matmul",
            "before limit_rank, which folds the GQA repeat into the matmuls this writes, and "
            "before the dtype pass, which folds the softmax into the compute dtype",
        ),
        _step(
            "rms_norm_to_layer_norm",
            "before the dtype pass: the RMSNorm pattern includes transformers' fp32 casts, and "
            "matching is simplest on the logical (1, S, C) layout",
        ),
        _step(
            "l2_norm_to_layer_norm",
            "after rms_norm_to_layer_norm, which leaves (and reports) every rsqrt that is no "
            "RMSNorm: the L2 norms are among them",
        ),
        _step(
            "mean_to_sum",
            "after the norm rewrites, which match the mean of squares of an RMSNorm: what "
            "is left is a plain average (Qwen4-Exp's hyper-connections over their streams)",
        ),
        _step(
            "repeat_to_cat",
            "beside mean_to_sum, before limit_rank and the layout sweep, which handle cat: "
            "the copies of a tensor repeated whole (Qwen4-Exp's residual streams)",
        ),
        _step(
            "pad_to_cat",
            "beside repeat_to_cat and before the dilated conv's taps, whose input it pads: a "
            "constant padding is a cat with constant blocks (Qwen4-Exp's PLE conv input)",
        ),
        _step(
            "cast_to_compute_dtype",
            "after the norm rewrite has consumed its casts: the remaining fp32 islands "
            "(softmax) fold into the compute dtype",
            dtype=dtype,
        ),
        _step(
            "repeat_interleave_to_expand",
            "before limit_rank and the layout work: the head repeat becomes rank-4 views",
        ),
        _step(
            "limit_rank",
            "before layout work: the layout sweep and the emitter handle rank <= 4 only",
        ),
        _step(
            "views_to_reshape",
            "after limit_rank, which reads the GQA repeat's unsqueeze: squeeze and unsqueeze "
            "then reach the layout sweep as reshapes",
        ),
        _step(
            "unflatten_rows",
            "after the norm rewrites (the gated norm is then a layer_norm along its rows) and "
            "before the layout sweep, which then carries (tokens, heads) without a transpose",
        ),
        _step(
            "linear_to_conv2d",
            "after the graph is rank <= 4 and norm-free of pow/rsqrt: introduces the (B, C, 1, S) "
            "convs with explicit layout changes around each",
        ),
        _step(
            "dilated_conv_to_taps",
            "before conv1d_to_conv2d, which leaves a dilated conv: its taps become slices and "
            "multiply-adds, which the layout sweep carries like any elementwise op",
        ),
        _step(
            "conv1d_to_conv2d",
            "after linear_to_conv2d, before the layout sweep: the depthwise conv joins the 1x1 "
            "convs on the (B, C, 1, S) layout the sweep carries",
        ),
        _step(
            "sink_layout_changes",
            "right after the convs exist: carries their layout through the decoder so the "
            "permutes linear_to_conv2d wrote cancel",
        ),
        _step(
            "split_lm_head",
            "after layout: the head is a channels-first conv whose slices become the outputs "
            "directly, with no permute back to (1, S, V)",
        ),
    ]
    if argmax:
        steps.append(
            _step(
                "add_argmax_head",
                "after the split: it reads the slices the split made the outputs",
            )
        )
    steps += [
        _step(
            "remove_noop_nodes",
            "last: merges the copies of shared relayouts (rotary tables) the sweep emitted per "
            "layer, chains of views, and dead code",
            label="remove_noop_nodes_final",
        ),
    ]
    return steps
