"""The constraint checker: real captures, lowered graphs, planted violations of every rule."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import anefx
from anefx.lowering import rules
from anefx.lowering.checker import OpInfo, check_graph, check_ops, check_spec
from anefx.lowering.shape_prop import propagate_shapes
from anefx.passes._util import add_const

aten = torch.ops.aten


@pytest.fixture(scope="module")
def real_shape():
    """Qwen3-0.6B shapes on the meta device: raw capture report and lowered report."""
    return anefx.lower("preset:qwen3-0.6b", seq_len=64, meta=True, raw_report=True)


def test_raw_capture_reports_the_stock_problems_with_their_modules(real_shape) -> None:
    raw = real_shape.captured_report
    counts = raw.counts()
    for rule in ("rank", "dim_hw", "linear", "rms_pow_rsqrt", "fp16", "gather"):
        assert counts.get(rule), (rule, counts)
    by_rule = {}
    for v in raw.violations:
        by_rule.setdefault(v.rule, []).append(v)
    assert any(v.module == "model.layers.3.self_attn" for v in by_rule["rank"])
    assert any(v.module == "model.layers.3.self_attn.q_proj" for v in by_rule["linear"])
    assert any(
        v.module == "model.layers.27.post_attention_layernorm" for v in by_rule["rms_pow_rsqrt"]
    )
    assert any(v.module == "model.layers.5.self_attn.k_norm" for v in by_rule["rms_pow_rsqrt"])
    assert any(v.module == "lm_head" and v.shape[-1] == 151936 for v in by_rule["dim_hw"])
    assert counts["linear"] == 28 * 7 + 1
    assert all(v.pass_ is None for v in raw.violations)


def test_lowered_real_shape_has_no_errors(real_shape) -> None:
    rep = real_shape.report
    assert not rep.errors, rep.render()
    assert rep.counts().get("gather") == 1  # the embedding: a warning, on the CPU
    assert rep.stats["lm_head_slices"] == rules.lm_head_slices(151936) == 10


def _lowered_tiny():
    low = anefx.lower("preset:qwen3-tiny", seq_len=64, dtype=torch.float16)
    assert not low.report.errors
    return low.graph_module


def _plant(gm: fx.GraphModule, build) -> fx.GraphModule:
    """Insert the nodes BUILD makes before the output, recompute shapes."""
    g = gm.graph
    anchor = next(n for n in g.nodes if n.target is aten.conv2d.default)
    with g.inserting_before(g.output_node()):
        node = build(g, anchor)
    node.meta["anefx_module"] = "planted.module"
    propagate_shapes(gm)
    return gm


PLANTS = {
    "rank": lambda gm, g, a: g.call_function(aten.unsqueeze.default, (a, 0)),
    "dim_nc": lambda gm, g, a: g.call_function(
        aten.full.default, ([1, 70000, 1, 64], 0.0), {"dtype": torch.float16}
    ),
    "dim_hw": lambda gm, g, a: g.call_function(
        aten.full.default, ([1, 8, 1, 20000], 0.0), {"dtype": torch.float16}
    ),
    "conv_width": lambda gm, g, a: g.call_function(
        aten.conv2d.default,
        (
            a.args[0],
            add_const(
                gm,
                torch.zeros(
                    rules.MAX_CONV_OUT_CHANNELS + 1,
                    a.args[0].meta["val"].shape[1],
                    1,
                    1,
                    dtype=torch.float16,
                ),
                "w",
            ),
        ),
    ),
    "fp16": lambda gm, g, a: g.call_function(aten._to_copy.default, (a,), {"dtype": torch.float32}),
    "linear": lambda gm, g, a: g.call_function(
        aten.linear.default, (a, add_const(gm, torch.zeros(64, 64, dtype=torch.float16), "w"))
    ),
    "rms_pow_rsqrt": lambda gm, g, a: g.call_function(aten.rsqrt.default, (a,)),
    "scatter": lambda gm, g, a: g.call_function(
        aten.index_put.default,
        (
            a,
            [add_const(gm, torch.zeros(1, dtype=torch.long), "i")],
            add_const(gm, torch.zeros(1, dtype=torch.float16), "v"),
        ),
    ),
    "in_graph_mask": lambda gm, g, a: g.call_function(aten.triu.default, (a, 1)),
    "trailing_dim": lambda gm, g, a: g.call_function(
        aten.full.default, ([1, 64, 1, 8], 0.0), {"dtype": torch.float16}
    ),
    "gather": lambda gm, g, a: g.call_function(
        aten.index_select.default, (a, 1, add_const(gm, torch.zeros(3, dtype=torch.long), "i"))
    ),
}


@pytest.mark.parametrize("rule", sorted(PLANTS))
def test_planted_violation_is_caught(rule: str) -> None:
    gm = _lowered_tiny()
    before = check_graph(gm, "lowered").counts().get(rule, 0)
    gm = _plant(gm, lambda g, a: PLANTS[rule](gm, g, a))
    rep = check_graph(gm, "planted")
    assert rep.counts().get(rule, 0) > before, rep.counts()
    hit = [v for v in rep.violations if v.rule == rule and v.module == "planted.module"]
    assert hit and hit[0].severity == rules.RULES_BY_ID[rule].severity


@pytest.mark.parametrize("gib, severity", [(1.5, "warning"), (2.5, "error")])
def test_weights_size(gib: float, severity: str) -> None:
    gm = _lowered_tiny()
    big = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device="meta")
    with gm.graph.inserting_before(gm.graph.output_node()):
        node = add_const(gm, big, "big")
        gm.graph.call_function(aten.neg.default, (node,))
    propagate_shapes(gm)
    hits = [v for v in check_graph(gm, "x").violations if v.rule == "weights_size"]
    assert len(hits) == 1 and hits[0].severity == severity


def test_control_flow_and_dynamic_shapes_from_records() -> None:
    ops = [
        OpInfo("c", "cond", "control_flow", [(1, 64)], ["float16"]),
        OpInfo("d", "add", "add", [(1, -1)], ["float16"], dynamic=True),
    ]
    counts = check_ops(ops, "x").counts()
    assert counts["control_flow"] == 1 and counts["dynamic_shape"] == 1


def test_emitted_program_rules_map_onto_mil_op_names(tmp_path) -> None:
    """A MIL program with stock-converter ops: the same rules, read back from the package."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, 64, 20000), dtype=types.fp32)],
        opset_version=ct.target.iOS18,
    )
    def prog(x):
        y = mb.linear(x=x, weight=np.zeros((64, 20000), np.float32))
        y = mb.pow(x=y, y=np.float32(2.0))
        y = mb.rsqrt(x=y)
        y = mb.expand_dims(x=y, axes=[0, 1])
        return y

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    path = tmp_path / "bad.mlpackage"
    model.save(str(path))
    (rep,) = check_spec(ct.models.MLModel(str(path), skip_model_load=True).get_spec())
    counts = rep.counts()
    for rule in ("linear", "rms_pow_rsqrt", "rank", "fp16", "dim_hw"):
        assert counts.get(rule), (rule, counts)


@pytest.mark.parametrize("context, expected", [(64, 0), (48, 4)])
def test_state_alignment(context: int, expected: int) -> None:
    """KV-cache states whose context axis is not a multiple of STATE_ALIGN are reported."""
    low = anefx.lower("preset:qwen3-tiny", seq_len=1, dtype=torch.float16, context=context)
    states = low.report.stats["states"]
    assert len(states) == 4 and all(s["shape"] == [1, 2, context, 32] for s in states)
    hits = [v for v in low.report.violations if v.rule == "state_align"]
    assert len(hits) == expected
    assert {v.node for v in hits} <= {s["name"] for s in states}
    assert all(v.severity == "warning" and str(context) in v.message for v in hits)
