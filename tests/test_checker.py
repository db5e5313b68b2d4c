"""The constraint checker: real captures, lowered graphs, planted violations of every rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx

import anefx
from anefx.core import rules
from anefx.lowering.checker import OpInfo, Report, check_graph, check_ops
from anefx.lowering.shape_prop import propagate_shapes
from anefx.passes._util import add_const
from anefx.targets.mil_program import check_spec

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


def _clean_graph() -> fx.GraphModule:
    """x (1, 64, 1, 64) fp16 -> 1x1 conv: no rule fires on it, checked even as a lowered graph;
    a violation planted in it is the only one."""
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    g = gm.graph
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(1, 64, 1, 64, dtype=torch.float16, device="meta")
    w = add_const(gm, torch.zeros(64, 64, 1, 1, dtype=torch.float16), "w")
    g.output(g.call_function(aten.conv2d.default, (x, w)))
    gm.recompile()
    propagate_shapes(gm)
    return gm


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
    "routing": lambda gm, g, a: g.call_function(aten.topk.default, (a, 2, 1)),
    # a 1x3 kernel dilated by 2, padded to keep the width
    "dilated_conv": lambda gm, g, a: g.call_function(
        aten.conv2d.default,
        (
            a.args[0],
            add_const(gm, torch.zeros(64, 64, 1, 3, dtype=torch.float16), "w"),
            None,
            [1, 1],
            [0, 2],
            [1, 2],
        ),
    ),
    # token ids hashed as Qwen4-Exp's n-gram tables do
    "int_arith": lambda gm, g, a: g.call_function(
        aten.bitwise_xor.Tensor,
        (
            add_const(gm, torch.arange(64, dtype=torch.long), "i"),
            add_const(gm, torch.arange(64, dtype=torch.long) * 7, "j"),
        ),
    ),
    # an op the emitter has no translation for, and that breaks no other rule
    "unsupported_op": lambda gm, g, a: g.call_function(aten.sin.default, (a,)),
}


def _planted_graph(rule: str, stage: str = "planted") -> Callable[[], Report]:
    """PLANTS[RULE] in the clean graph, checked as STAGE. Only unsupported_op is checked as a
    lowered graph: the emitter's op vocabulary is checked on lowered graphs only, and most
    plants are ops outside it, which would fire that rule too."""

    def check() -> Report:
        gm = _clean_graph()
        _plant(gm, lambda g, a: PLANTS[rule](gm, g, a))
        return check_graph(gm, stage)

    return check


def _with_weights(gib: float) -> Report:
    """The clean graph reading GIB of (meta) weights more, checked. The weight is reduced to
    one row of 64: an op putting it out whole would break the dimension rules too."""
    gm = _clean_graph()
    big = torch.empty(int(gib * 2**30) // 2 // 64, 64, dtype=torch.float16, device="meta")
    with gm.graph.inserting_before(gm.graph.output_node()):
        node = add_const(gm, big, "big")
        gm.graph.call_function(aten.sum.dim_IntList, (node, [0], True))
    propagate_shapes(gm)
    return check_graph(gm, "planted")


def _lut_spec():
    """A one-conv iOS18 program whose weight is a valid 4-bit palettization (16 fp16 entries
    per table), as a spec: coremltools' builder accepts only legal ones, so the spec is broken
    afterwards."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    indices = (np.arange(64 * 64) % 16).astype(types.np_uint4_dtype).reshape(64, 64, 1, 1)
    lut = np.linspace(-1, 1, 16, dtype=np.float16).reshape(1, 1, 1, 1, 16, 1)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, 64, 1, 64), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=indices, lut=lut, name="w")
        return mb.conv(x=x, weight=w)

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,  # the program is fp16 already: no cast pass
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    return model.get_spec()


def _fp32_lut() -> Report:
    """_lut_spec with its table stored in float32, checked."""
    from coremltools.proto import MIL_pb2

    spec = _lut_spec()
    (clean,) = check_spec(spec)
    assert not clean.violations, clean.render()
    fn = spec.mlProgram.functions["main"]
    ops = fn.block_specializations[fn.opset].operations
    op = next(op for op in ops if op.type == "constexpr_lut_to_dense")
    op.inputs["lut"].arguments[0].value.type.tensorType.dataType = MIL_pb2.FLOAT32
    (rep,) = check_spec(spec)
    return rep


@dataclass(frozen=True)
class Planted:
    """A minimal input breaking one rule, and what its violation must say."""

    check: Callable[[], Report]  # builds the input, returns the checker's report on it
    says: str  # a part of the message: the limit broken, or what leaves the ANE
    module: str | None = None  # the source module the violation names


def _summary(rule: str) -> str:
    return rules.RULES_BY_ID[rule].summary


# rules on ops that leave the ANE: their message is the rule's own statement of it
_LEAVE_THE_ANE = (
    "linear",
    "rms_pow_rsqrt",
    "scatter",
    "routing",
    "in_graph_mask",
    "gather",
    "dilated_conv",
    "int_arith",
)
# rule id -> its planted violation; the table must not have a rule without one
PLANTED: dict[str, Planted] = {
    **{
        rule: Planted(_planted_graph(rule), says, "planted.module")
        for rule, says in {
            "rank": f"rank 5 > {rules.MAX_RANK}",
            "dim_nc": f"C=70000 > {rules.DIM_LIMITS['C']}",
            "dim_hw": f"W=20000 > {rules.DIM_LIMITS['W']}",
            "conv_width": f"{rules.MAX_CONV_OUT_CHANNELS + 1} output channels > "
            f"{rules.MAX_CONV_OUT_CHANNELS}",
            "fp16": f"float32 tensor, not {rules.COMPUTE_DTYPE}",
            "trailing_dim": f"last axis 8 < {rules.MIN_TRAILING_DIM}",
            **{r: _summary(r) for r in _LEAVE_THE_ANE},
        }.items()
    },
    "unsupported_op": Planted(
        _planted_graph("unsupported_op", "lowered"),
        "no Core ML translation for aten.sin.default",
        "planted.module",
    ),
    "control_flow": Planted(
        lambda: check_ops([OpInfo("c", "cond", "control_flow", [(1, 64)], ["float16"])], "x"),
        _summary("control_flow"),
    ),
    # the dynamic axis is not the last: a last axis of unknown size (-1) also reads as a
    # trailing dimension below 64
    "dynamic_shape": Planted(
        lambda: check_ops(
            [OpInfo("d", "add", "add", [(1, 64, -1, 64)], ["float16"], dynamic=True)], "x"
        ),
        "add has a symbolic shape",
    ),
    "state_align": Planted(
        lambda: check_ops(
            [], "x", {"states": [{"name": "k", "shape": [1, 8, 48, 128], "dtype": "float16"}]}
        ),
        f"[48] not a multiple of {rules.STATE_ALIGN}",
    ),
    # two caches that cannot share one tensor (their contexts differ): two states
    "state_count": Planted(
        lambda: check_ops(
            [],
            "x",
            {
                "states": [
                    {"name": "a", "shape": [1, 8, 128, 64], "dtype": "float16"},
                    {"name": "b", "shape": [1, 8, 128, 96], "dtype": "float16"},
                ]
            },
        ),
        "2 Core ML states in one program",
    ),
    "weights_size": Planted(lambda: _with_weights(1.5), f"> {rules.WEIGHTS_WARN_BYTES >> 30} GiB"),
    "lut": Planted(_fp32_lut, f"LUT float32, not {rules.LUT_DTYPE}"),
}


def test_every_rule_has_a_planted_violation() -> None:
    """A rule added to the table comes with its planted case (the table is read now)."""
    ids = [r.id for r in rules.RULES]
    missing = [rule for rule in ids if rule not in PLANTED]
    assert not missing, f"rules without a planted violation in PLANTED: {missing}"
    assert set(PLANTED) <= set(ids), f"cases of rules not in the table: {set(PLANTED) - set(ids)}"


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_planted_violation_is_caught(rule: str) -> None:
    """The rule fires, alone and once, with its severity, the limit and the source module."""
    case = PLANTED[rule]
    rep = case.check()
    assert [v.rule for v in rep.violations] == [rule], rep.render()
    (hit,) = rep.violations
    assert hit.severity == rules.RULES_BY_ID[rule].severity
    assert case.says in hit.message and hit.limit, hit
    assert hit.module == case.module, hit


@pytest.mark.parametrize("gib, severity", [(1.5, "warning"), (2.5, "error")])
def test_weights_size(gib: float, severity: str) -> None:
    hits = [v for v in _with_weights(gib).violations if v.rule == "weights_size"]
    assert len(hits) == 1 and hits[0].severity == severity


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
    assert len(states) == 4 and all(s["shape"] == [1, 2, 32, context] for s in states)
    hits = [v for v in low.report.violations if v.rule == "state_align"]
    assert len(hits) == expected
    assert {v.node for v in hits} <= {s["name"] for s in states}
    assert all(v.severity == "warning" and str(context) in v.message for v in hits)


class _Hasher(torch.nn.Module):
    """Hashes token ids with int64 arithmetic (no ANE op) and scores with a top-k."""

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hashed = torch.bitwise_xor(ids.long() * 31, ids.long()) % 7
        top = x.topk(2, dim=-1).values.sum(-1, keepdim=True)
        return x * hashed.unsqueeze(-1).to(x.dtype) + top


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)
        self.hash = _Hasher()

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.hash(ids, self.proj(x))


class _Planted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(), _Block(), _Block()])

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(ids, x)
        return x


def test_blocking_constructs_are_grouped_by_class_and_path() -> None:
    """Ops no rule lets through, planted in a known module class at known paths: the report's
    blocking summary names that class once, with the path pattern of its three copies, the ops
    counted once each whatever rules they break, and nothing else (the linears are errors of
    their own class)."""
    from anefx.models.capture import unlift

    ids = torch.zeros(1, 64, dtype=torch.int32)
    x = torch.randn(1, 64, 64, dtype=torch.float16)
    ep = torch.export.export(_Planted().half(), (ids, x), strict=False).run_decompositions({})
    gm, _ = unlift(ep)
    propagate_shapes(gm)
    rep = check_graph(gm, "lowered")
    groups = {g["class"]: g for g in rep.blocking()}
    hasher = groups["_Hasher"]
    assert hasher["module"] == "layers.*.hash"
    assert hasher["ops"]["topk"] == 3 and hasher["ops"]["bitwise_xor"] == 3
    assert hasher["rules"]["routing"] == 3 and hasher["rules"]["int_arith"] >= 6  # mul, xor
    assert (
        groups["Linear"]["module"] == "layers.*.proj" and groups["Linear"]["rules"]["linear"] == 3
    )
    assert set(groups) == {"_Hasher", "Linear"}
    assert sum(g["errors"] for g in rep.blocking()) == len(rep.errors)
    assert "_Hasher (layers.*.hash): " in rep.render()
