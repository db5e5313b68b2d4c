"""The op registry (targets/op_registry.py), op by op: every translator against torch.

Each property test builds a small fx graph holding the ops of one family (several outputs of one
graph, to convert once), propagates shapes, translates it with the emitter into a one-function
program, converts and saves it as anefx does (``convert_program``), loads it with the reference
executor (targets/coreml_exec.py) and runs it. The reference is the same fx graph run by torch on
the same inputs. Shapes and values are drawn by Hypothesis (the project profile: derandomized,
15 examples), small.

The emitter's ``build`` reads the graph's signature, which capture makes; these graphs have
none, so :func:`emit_function` does what ``_Emitter._body`` does for placeholders, constants and
ops (``_Emitter.const`` and ``_Emitter.op``, the registry lookup) and names the outputs out0, ...

Tolerances, as tests/test_coreml_exec.py argues them for the executor (an op computes in float32
and rounds once): data movement, casts, add / sub / mul / div and comparisons are exact (the
torch reference runs in float64 on the fp16 values and is rounded once to fp16: the correctly
rounded result); a transcendental op is within one fp16 ulp (gelu plus the float32 cancellation
in 1 + erf); a sum of K terms (matmul, conv, reduce_sum, softmax's normaliser) adds
K * 2^-24 * sum|terms|; layer_norm adds the float32 cancellation in x - mean.

Then: one test per refused argument (the error names the node, its op and its module), an op
without a translator, the registry against core/ops.py's vocabulary, and the checker's
unsupported_op rule on a planted op.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st

from anefx.core import rules
from anefx.core.ops import EMITTABLE, KV_WRITE, LAYER_NORM
from anefx.errors import AnefxGraphError
from anefx.lowering.checker import check_graph
from anefx.lowering.shape_prop import propagate_shapes
from anefx.targets import op_registry
from anefx.targets.coreml import _Emitter, convert_program
from anefx.targets.coreml_exec import load_package

os.environ.setdefault("TQDM_DISABLE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

aten = torch.ops.aten
MODULE = "model.layers.0.test"  # the source module every test node claims

# the ops each property test's graph holds; together, every registry entry
FAMILIES = {
    "elementwise": {
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.eq.Tensor,
        aten.gt.Tensor,
        aten.gt.Scalar,
        aten.lt.Tensor,
        aten.lt.Scalar,
        aten.ge.Scalar,
        aten.le.Scalar,
        aten.rsub.Scalar,
        aten.neg.default,
    },
    "activations": {
        aten.silu.default,
        aten.sigmoid.default,
        aten.relu.default,
        aten.tanh.default,
        aten.exp.default,
        aten.softplus.default,
        aten.gelu.default,
        aten.softmax.int,
        aten._softmax.default,
    },
    "products": {aten.matmul.default, aten.transpose.int, aten.conv2d.default},
    "movement": {
        aten.reshape.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.permute.default,
        aten.transpose.int,
        aten.cat.default,
        aten.slice.Tensor,
        aten.expand.default,
        aten.embedding.default,
        aten._to_copy.default,
    },
    "reductions": {aten.sum.dim_IntList, aten.amax.default, aten.argmax.default},
    "layer_norm": {LAYER_NORM},
    "kv_write": {KV_WRITE},
}


# ---------------------------------------------------------------------------------------------
# graphs, emission, references


class G:
    """A hand-built fx graph: inputs with example values, constants, ops, outputs."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.feeds: dict[str, np.ndarray] = {}
        self.outs: list[fx.Node] = []
        # changes made after shape propagation (torch's own checks would refuse them first)
        self.later: list[Callable[[], None]] = []

    def input(self, value: np.ndarray) -> fx.Node:
        name = f"x{len(self.feeds)}"
        node = self.graph.placeholder(name)
        node.meta["val"] = torch.from_numpy(value).to("meta")
        self.feeds[name] = value
        return node

    def const(self, value: np.ndarray) -> fx.Node:
        name = f"c{len(self.root._buffers)}"
        self.root.register_buffer(name, torch.from_numpy(value))
        return self.graph.get_attr(name)

    def op(self, target, *args, name: str | None = None, out: bool = True, **kwargs) -> fx.Node:
        node = self.graph.create_node("call_function", target, args, kwargs, name=name)
        node.meta["anefx_module"] = MODULE
        if out:
            self.outs.append(node)
        return node

    def module(self) -> fx.GraphModule:
        self.graph.output(tuple(self.outs))
        gm = fx.GraphModule(self.root, self.graph)
        propagate_shapes(gm)
        return gm


def emit_function(gm: fx.GraphModule):
    """GM as a MIL function, translated by the emitter (its outputs named out0, out1, ...)."""
    em = _Emitter(gm)
    placeholders = {
        n.name: mb.placeholder(
            shape=list(n.meta["val"].shape),
            dtype=types.fp16 if n.meta["val"].dtype == torch.float16 else types.int32,
        )
        for n in gm.graph.nodes
        if n.op == "placeholder"
    }
    func = Function(placeholders, opset_version=ct.target.iOS18)
    with func:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                em.env[node] = func.inputs[node.name]
            elif node.op == "get_attr":
                em.env[node] = em.const(getattr(gm, node.target), node.name)
            elif node.op == "call_function":
                em.env[node] = em.op(node)
            elif node.op == "output":
                outs = [em.env[o] for o in node.args[0]]
                func.set_outputs([mb.identity(x=v, name=f"out{i}") for i, v in enumerate(outs)])
    return func


def run_package(gm: fx.GraphModule, feeds: dict[str, np.ndarray]):
    """Emit GM, convert and save it, load the package and run it: (outputs, the program)."""
    prog = Program()
    prog.add_function("main", emit_function(gm))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.mlpackage"
        convert_program(prog, package_dir=path)
        loaded = load_package(path)
        outs, _ = loaded.run("main", feeds)
    n = len(gm.graph.output_node().args[0])
    return [outs[f"out{i}"] for i in range(n)], loaded


def run_torch(gm: fx.GraphModule, feeds: dict, wide: bool = False, absolute: bool = False):
    """GM run by torch on FEEDS: float tensors widened to float64 (WIDE), absolute values
    (ABSOLUTE: the bound sum|x*y| of a sum of products); constants alike."""

    def prep(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t = t.abs() if absolute else t
            t = t.double() if wide else t
        return t

    m = copy.deepcopy(gm)
    for name, buf in list(m.named_buffers()):
        m.register_buffer(name, prep(buf))
    with torch.no_grad():
        out = m(*[prep(torch.from_numpy(v)) for v in feeds.values()])
    return [o.numpy() for o in out]


def assert_close(got: np.ndarray, ref: np.ndarray, ulps: int = 0, atol=0.0, what: str = ""):
    """GOT equals REF rounded to GOT's dtype; for fp16, within ULPS fp16 ulps + ATOL."""
    ref_r = np.asarray(ref).astype(got.dtype)
    assert got.shape == ref_r.shape, (what, got.shape, ref_r.shape)
    if got.dtype != np.float16 or (ulps == 0 and np.all(np.asarray(atol) == 0)):
        np.testing.assert_array_equal(got, ref_r, err_msg=what)
        return
    g, r = got.astype(np.float64), ref_r.astype(np.float64)
    with np.errstate(over="ignore"):
        allowed = ulps * np.spacing(np.abs(ref_r)).astype(np.float64) + atol
    ok = (g == r) | (np.abs(g - r) <= allowed) | (np.isnan(g) & np.isnan(r))
    assert ok.all(), f"{what}: excess {np.max(np.abs(g - r) - allowed)} at {np.argwhere(~ok)[:3]}"


def ops_of(gm: fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


# ---------------------------------------------------------------------------------------------
# strategies

dims = st.integers(1, 4)
seeds = st.integers(0, 2**32 - 1)


def shapes(min_rank: int = 1, max_rank: int = 4):
    return st.lists(dims, min_size=min_rank, max_size=max_rank).map(tuple)


@st.composite
def broadcast_pair(draw, min_rank: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A shape and one that broadcasts against it (axes kept or 1, maybe fewer of them)."""
    shape = draw(shapes(min_rank))
    keep = draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
    other = tuple(s if k else 1 for s, k in zip(shape, keep, strict=True))
    return shape, other[draw(st.integers(0, len(shape) - 1)) :]


def fp16(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float16)


def axis(draw, rank: int) -> int:
    """An axis of RANK, maybe written negative."""
    return draw(st.integers(-rank, rank - 1))


# fp16-exact scalars: the emitter writes a Python scalar as an fp16 const
SCALARS = st.sampled_from([0.5, -1.5, 2.0, 3.0, -0.25, 1.0])


# ---------------------------------------------------------------------------------------------
# op by op against torch


@given(pair=broadcast_pair(), c=SCALARS, k=st.integers(-3, 3), seed=seeds)
def test_elementwise_and_comparisons_are_exact(pair, c: float, k: int, seed: int) -> None:
    (shape, other), rng = pair, np.random.default_rng(seed)
    g = G()
    x = g.input(fp16(rng, shape, 3))
    y0 = fp16(rng, other, 3)
    y = g.input(np.where(np.abs(y0) < 0.25, np.float16(0.5), y0))  # a divisor away from 0
    # half-integers: comparisons meet equal values
    xq = g.input((rng.integers(-2, 3, shape) / 2).astype(np.float16))
    yq = g.input((rng.integers(-2, 3, other) / 2).astype(np.float16))
    xi = g.input(rng.integers(-3, 4, shape).astype(np.int32))
    yi = g.input(rng.integers(-3, 4, other).astype(np.int32))
    for target, a, b in [
        (aten.add.Tensor, x, y),
        (aten.sub.Tensor, x, y),
        (aten.mul.Tensor, x, y),
        (aten.div.Tensor, x, y),
        (aten.add.Tensor, x, c),  # a Python scalar in the Tensor form, as the capture writes it
        (aten.sub.Tensor, y, k),
        (aten.mul.Tensor, c, x),
        (aten.div.Tensor, x, c),
        (aten.add.Tensor, xi, yi),
        (aten.sub.Tensor, xi, k),
        (aten.mul.Tensor, xi, yi),
        (aten.eq.Tensor, xq, yq),
        (aten.eq.Tensor, xi, yi),
        (aten.gt.Tensor, xq, yq),
        (aten.lt.Tensor, xi, yi),
        (aten.gt.Scalar, x, c),
        (aten.lt.Scalar, xi, k),
        (aten.ge.Scalar, xq, c),
        (aten.le.Scalar, xi, k),
        (aten.rsub.Scalar, x, c),
        (aten.rsub.Scalar, xi, k),
    ]:
        g.op(target, a, b)
    g.op(aten.add.Tensor, x, y, alpha=1)  # a default given explicitly is accepted
    g.op(aten.neg.default, x)
    g.op(aten.neg.default, xi)
    gm = g.module()
    assert ops_of(gm) == FAMILIES["elementwise"]
    got, _ = run_package(gm, g.feeds)
    refs = run_torch(gm, g.feeds, wide=True)
    for i, (out, ref) in enumerate(zip(got, refs, strict=True)):
        assert_close(out, ref, what=f"out{i}")


@given(shape=shapes(), data=st.data(), scale=st.sampled_from([1.0, 4.0, 8.0]), seed=seeds)
def test_activations_and_softmax_within_an_ulp(shape, data, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = G()
    xv = fp16(rng, shape, scale)
    x = g.input(xv)
    for target in (aten.silu.default, aten.sigmoid.default, aten.tanh.default):
        g.op(target, x)
    g.op(aten.relu.default, x)
    g.op(aten.gelu.default, x)
    g.op(aten.gelu.default, x, approximate="tanh")
    d0, d1 = axis(data.draw, len(shape)), axis(data.draw, len(shape))
    g.op(aten.softmax.int, x, d0)
    g.op(aten._softmax.default, x, d1, False)
    # exp of what a delta rule exponentiates (values <= 0: the decays), softplus of anything
    g.op(aten.exp.default, g.input(-np.abs(xv)))
    g.op(aten.softplus.default, x)
    gm = g.module()
    assert ops_of(gm) == FAMILIES["activations"]
    got, _ = run_package(gm, g.feeds)
    refs = run_torch(gm, g.feeds, wide=True)
    names = ["silu", "sigmoid", "tanh", "relu", "gelu", "gelu_tanh", "softmax", "_softmax"]
    names += ["exp", "softplus"]
    x64 = xv.astype(np.float64)
    for name, out, ref in zip(names, got, refs, strict=True):
        if name == "relu":
            assert_close(out, ref, what=name)
            continue
        atol = 0.0
        if name.startswith("gelu"):  # 1 + erf(..) / 1 + tanh(..) cancels at negative x
            atol = np.abs(x64) * 2.0**-23
        if name.endswith("softmax"):  # the float32 normaliser: a sum of K exps, one division
            k = shape[(d0 if name == "softmax" else d1) % len(shape)]
            atol = (k + 2) * 2.0**-24 * np.abs(ref)
        assert_close(out, ref, 1, atol, what=name)


@st.composite
def products_case(draw) -> dict:
    m, k, n, p = (draw(dims) for _ in range(4))
    batch_a, batch_b = draw(broadcast_pair()) if draw(st.booleans()) else ((), ())
    h, w = draw(dims), draw(dims)
    return {
        "mkn": (m, k, n, p),
        "batch": (batch_a[-2:], batch_b[-2:]),
        "conv": (draw(st.integers(1, 2)), draw(dims), draw(dims), h, w),
        "kernel": (draw(st.integers(1, h)), draw(st.integers(1, w))),
        "bias": draw(st.booleans()),
        "seed": draw(seeds),
    }


@given(case=products_case())
def test_matmul_transpose_fold_and_conv_within_the_sum_bound(case: dict) -> None:
    (m, k, n, p), (ba, bb) = case["mkn"], case["batch"]
    (batch, cin, cout, h, w), (kh, kw) = case["conv"], case["kernel"]
    rng = np.random.default_rng(case["seed"])
    g = G()
    a, b = g.input(fp16(rng, (*ba, m, k))), g.input(fp16(rng, (*bb, k, n)))
    at, bt = g.input(fp16(rng, (*ba, k, m))), g.input(fp16(rng, (*bb, n, k)))
    c3, d = g.input(fp16(rng, (p, m, k))), g.input(fp16(rng, (k, n)))
    x4 = g.input(fp16(rng, (batch, cin, h, w)))
    g.op(aten.matmul.default, a, b)
    # transposes of the last two axes fold into matmul's transpose_x / transpose_y
    g.op(aten.matmul.default, g.op(aten.transpose.int, at, -2, -1, out=False), b)
    rank = len(bb) + 2
    g.op(aten.matmul.default, a, g.op(aten.transpose.int, bt, rank - 1, rank - 2, out=False))
    # another transpose must not: it is written as a transpose op
    g.op(aten.matmul.default, g.op(aten.transpose.int, c3, 0, 1, out=False), d)
    w1 = g.const(fp16(rng, (cout, cin, 1, 1), 0.5))
    bias = g.const(fp16(rng, (cout,))) if case["bias"] else None
    g.op(aten.conv2d.default, x4, w1, bias)
    wk = g.const(fp16(rng, (cout, cin, kh, kw), 0.5))
    g.op(aten.conv2d.default, x4, wk, None, [1, 1], [0, 0], [1, 1], 1)  # the defaults, given
    # depthwise (a linear-attention layer's causal conv, conv1d_to_conv2d): one group per
    # channel, each its own (1, kh, kw) kernel
    wd = g.const(fp16(rng, (cin, 1, kh, kw), 0.5))
    g.op(aten.conv2d.default, x4, wd, bias if cout == cin else None, [1, 1], [0, 0], [1, 1], cin)
    gm = g.module()
    assert ops_of(gm) == FAMILIES["products"]
    got, prog = run_package(gm, g.feeds)
    assert [op.type for op in prog.functions["main"].ops].count("transpose") == 1
    refs = run_torch(gm, g.feeds, wide=True)
    bounds = run_torch(gm, g.feeds, wide=True, absolute=True)
    terms = max(k, cin * kh * kw) + 1  # the longest sum (with a bias)
    for i, (out, ref, bound) in enumerate(zip(got, refs, bounds, strict=True)):
        assert_close(out, ref, 1, terms * 2.0**-24 * bound, what=f"out{i}")


@st.composite
def movement_case(draw) -> dict:
    shape = draw(shapes(2))
    rank = len(shape)
    perm = draw(st.permutations(range(rank)))
    dim = axis(draw, rank)
    size = shape[dim % rank]
    start = draw(st.integers(0, size - 1))
    stop = draw(st.integers(start + 1, size))
    # the forms a graph writes: None, negative, past the end
    start_arg = draw(st.sampled_from([start, start - size] + ([None] if start == 0 else [])))
    stop_arg = draw(
        st.sampled_from(
            [stop] + ([None, 2**63 - 1] if stop == size else [stop - size]),
        )
    )
    return {
        "shape": shape,
        "perm": [q - rank if draw(st.booleans()) else q for q in perm],
        "swap": (axis(draw, rank), axis(draw, rank)),
        "cat": (axis(draw, rank), draw(dims)),
        "slice": (dim, start_arg, stop_arg, draw(st.integers(1, 3))),
        "ones": draw(st.lists(st.booleans(), min_size=rank, max_size=rank)),
        "table": (draw(st.integers(1, 6)), draw(dims), draw(dims)),
        "seed": draw(seeds),
    }


@given(case=movement_case())
def test_data_movement_and_casts_are_exact(case: dict) -> None:
    shape, rng = case["shape"], np.random.default_rng(case["seed"])
    rank = len(shape)
    g = G()
    xv = fp16(rng, shape, 8)
    x, xi = g.input(xv), g.input(rng.integers(-50, 50, shape).astype(np.int32))
    g.op(aten.reshape.default, x, [-1, shape[-1]])
    g.op(aten.view.default, x, [int(np.prod(shape))])
    g.op(aten._unsafe_view.default, xi, list(reversed(shape)))
    g.op(aten.permute.default, x, case["perm"])
    g.op(aten.permute.default, xi, case["perm"])
    g.op(aten.transpose.int, x, *case["swap"])
    cat_dim, extra = case["cat"]
    other = list(shape)
    other[cat_dim % rank] = extra
    g.op(aten.cat.default, [x, g.input(fp16(rng, other)), x], cat_dim)
    g.op(aten.cat.default, [xi, xi])  # dim 0 by default
    g.op(aten.slice.Tensor, x, *case["slice"])
    g.op(aten.slice.Tensor, xi, case["slice"][0])  # the whole axis
    small = tuple(1 if one else s for s, one in zip(shape, case["ones"], strict=True))
    size = [-1 if s == t else t for s, t in zip(small, shape, strict=True)]
    g.op(aten.expand.default, g.input(fp16(rng, small)), size)
    vocab, width, seq = case["table"]
    table = g.const(fp16(rng, (vocab, width)))
    g.op(aten.embedding.default, table, g.input(rng.integers(0, vocab, (1, seq)).astype(np.int32)))
    for src, dtype in [(x, torch.int32), (x, torch.bool), (xi, torch.float16), (x, torch.float32)]:
        g.op(aten._to_copy.default, src, dtype=dtype)
    positive = g.op(aten.gt.Scalar, x, 0, out=False)
    g.op(aten._to_copy.default, positive, dtype=torch.float16)
    g.op(  # the kwargs a capture on the CPU writes: accepted
        aten._to_copy.default,
        x,
        dtype=torch.float16,
        layout=torch.strided,
        device=torch.device("cpu"),
        pin_memory=False,
        non_blocking=False,
        memory_format=torch.contiguous_format,
    )
    gm = g.module()
    assert FAMILIES["movement"] <= ops_of(gm)
    got, _ = run_package(gm, g.feeds)
    for i, (out, ref) in enumerate(zip(got, run_torch(gm, g.feeds), strict=True)):
        assert_close(out, ref, what=f"out{i} {gm.graph.output_node().args[0][i]}")


@given(shape=shapes(), data=st.data(), keep=st.booleans(), seed=seeds)
def test_reductions(shape, data, keep: bool, seed: int) -> None:
    rank, rng = len(shape), np.random.default_rng(seed)
    axes = data.draw(st.sets(st.integers(0, rank - 1), min_size=1).map(sorted))
    dims = [a - rank if data.draw(st.booleans()) else a for a in axes]
    g = G()
    xv = fp16(rng, shape, 4)
    x, xi = g.input(xv), g.input(rng.integers(-100, 100, shape).astype(np.int32))
    # distinct values: argmax without ties
    n = int(np.prod(shape))
    xd = g.input((rng.permutation(n).reshape(shape) / 4 - 8).astype(np.float16))
    g.op(aten.sum.dim_IntList, x, dims, keep)
    g.op(aten.sum.dim_IntList, x, dims, dtype=torch.float16)  # the input's dtype: accepted
    g.op(aten.sum.dim_IntList, xi, dims, keep)
    g.op(aten.amax.default, x, dims, keep)
    g.op(aten.amax.default, xi, [dims[0]])
    g.op(aten.argmax.default, xd, dims[-1], keep)
    gm = g.module()
    assert ops_of(gm) == FAMILIES["reductions"]
    got, _ = run_package(gm, g.feeds)
    refs = run_torch(gm, g.feeds, wide=True)
    bounds = run_torch(gm, g.feeds, wide=True, absolute=True)
    k = int(np.prod([shape[a] for a in axes]))
    for i, (out, ref) in enumerate(zip(got, refs, strict=True)):
        if i < 2:  # an fp16 sum: float32 accumulation, one rounding
            assert_close(out, ref, 1, k * 2.0**-24 * bounds[i], what=f"sum {dims} {keep}")
        else:
            assert_close(out, ref, what=f"out{i} {dims} {keep}")


@given(shape=shapes(), data=st.data(), eps=st.sampled_from([1e-5, 1e-6]), seed=seeds)
def test_layer_norm(shape, data, eps: float, seed: int) -> None:
    rank, rng = len(shape), np.random.default_rng(seed)
    ax, ax2 = axis(data.draw, rank), axis(data.draw, rank)
    eps16 = float(np.float16(eps))  # the emitter's epsilon is an fp16 const
    g = G()
    xv = fp16(rng, shape, 2)
    x = g.input(xv)
    weight = g.const(fp16(rng, (shape[ax],)))
    g.op(LAYER_NORM, x, weight, ax, eps16)
    g.op(LAYER_NORM, x, None, ax2, eps16)
    gm = g.module()
    assert ops_of(gm) == FAMILIES["layer_norm"]
    got, _ = run_package(gm, g.feeds)
    refs = run_torch(gm, g.feeds, wide=True)
    gains = [np.abs(getattr(gm, weight.target).double().numpy()), np.ones(shape[ax2])]
    for a, gain, out, ref in zip((ax, ax2), gains, got, refs, strict=True):
        a %= rank
        x64 = xv.astype(np.float64)
        k = shape[a]
        std = np.sqrt(x64.var(axis=a, keepdims=True) + eps16)
        # float32: the mean is K * 2^-24 * max|x| off, then divided by std; a few roundings
        norm = [shape[a] if i == a else 1 for i in range(rank)]
        cancel = k * 2.0**-24 * np.abs(x64).max(axis=a, keepdims=True) / std
        atol = cancel * np.reshape(gain, norm) + (k + 4) * 2.0**-24 * np.abs(ref)
        assert_close(out, ref, 1, atol, what=f"axis {a}")


@given(
    heads=st.integers(1, 3),
    dim=st.integers(1, 4),
    slots=st.integers(1, 12),
    data=st.data(),
    seed=seeds,
)
def test_kv_write_writes_the_rows_at_the_first_position(heads, dim, slots, data, seed) -> None:
    """anefx::kv_write -> slice_update at [0, 0, 0, p], p read at run time from the positions:
    exactly the cache with S rows replaced, as torch's op computes (a plain tensor, no state)."""
    rng = np.random.default_rng(seed)
    width = data.draw(st.integers(1, slots))
    start = data.draw(st.integers(0, slots - width))
    g = G()
    cache = g.input(fp16(rng, (1, heads, dim, slots)))
    rows = g.input(fp16(rng, (1, heads, dim, width)))
    # the positions of a padded call: the real ones from START, then pads (any value)
    pos = np.full((1, width), slots, np.int32)
    real = data.draw(st.integers(1, width))
    pos[0, :real] = np.arange(start, start + real)
    positions = g.input(pos)
    g.op(KV_WRITE, cache, rows, positions)
    gm = g.module()
    assert ops_of(gm) == FAMILIES["kv_write"]
    got, _ = run_package(gm, g.feeds)
    (ref,) = run_torch(gm, g.feeds)
    assert_close(got[0], ref)
    # only the S slots from START changed
    keep = np.ones(slots, bool)
    keep[start : start + width] = False
    np.testing.assert_array_equal(got[0][..., keep], g.feeds["x0"][..., keep])


def test_kv_write_past_the_end_is_an_error_not_a_clipped_write() -> None:
    """A call whose slots would pass the end of the cache: torch's op and the executor both
    refuse it, nothing written (the runtime starts such a call earlier: generation.Session)."""
    from anefx.targets.coreml_exec import ExecError

    g = G()
    cache = g.input(np.zeros((1, 1, 2, 8), np.float16))
    rows = g.input(np.ones((1, 1, 2, 3), np.float16))
    positions = g.input(np.array([[6, 7, 8]], np.int32))  # 6 + 3 > 8
    g.op(KV_WRITE, cache, rows, positions)
    gm = g.module()
    with pytest.raises(IndexError, match=r"rows \[6, 9\) are outside the cache's 8 slots"):
        run_torch(gm, g.feeds)
    with pytest.raises(ExecError, match="slice_update.*outside"):
        run_package(gm, g.feeds)


# ---------------------------------------------------------------------------------------------
# refusals: every argument a translator does not translate names the node


def _fp16_input(g: G, *shape: int) -> fx.Node:
    return g.input(np.zeros(shape, np.float16))


def _int_input(g: G, *shape: int) -> fx.Node:
    return g.input(np.zeros(shape, np.int32))


def _conv(**kwargs) -> Callable[[G], None]:
    def build(g: G) -> None:
        groups = kwargs.get("groups", 1)
        weight = g.const(np.zeros((4, 4 // groups, 3, 3), np.float16))
        g.op(aten.conv2d.default, _fp16_input(g, 1, 4, 8, 8), weight, name="bad", **kwargs)

    return build


def _later(
    target, args: Callable[[G], tuple], change: Callable[[fx.Node], None]
) -> Callable[[G], None]:
    """A node CHANGE rewrites after shape propagation (torch would refuse it first): whatever
    made the graph, the emitter must refuse it too."""

    def build(g: G) -> None:
        node = g.op(target, *args(g), name="bad")
        g.later.append(lambda: change(node))

    return build


def _set_kwarg(key: str, value) -> Callable[[fx.Node], None]:
    def change(node: fx.Node) -> None:
        node.kwargs = {**node.kwargs, key: value}

    return change


def _runtime_dim0(node: fx.Node) -> None:
    node.update_arg(1, node.args[0])  # a value of the graph where transpose needs a constant


REFUSED: dict[str, tuple[Callable[[G], None], str]] = {
    "conv_stride": (_conv(stride=[2, 2]), r"stride=\[2, 2\] is not translated"),
    "conv_padding": (_conv(padding=[1, 1]), r"padding=\[1, 1\] is not translated"),
    "conv_dilation": (_conv(dilation=[2, 2]), r"dilation=\[2, 2\] is not translated"),
    # a grouped conv is translated (test_matmul_transpose_fold_and_conv...); groups that do not
    # fit the channels (torch's own check refuses them first) are not
    "conv_groups": (
        _later(
            aten.conv2d.default,
            lambda g: (
                _fp16_input(g, 1, 4, 8, 8),
                g.const(np.zeros((4, 4, 3, 3), np.float16)),
                None,
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            ),
            lambda node: node.update_arg(6, 3),
        ),
        r"groups=3 does not fit input channels 4 and weight \(4, 4, 3, 3\)",
    ),
    "conv_unbatched": (
        lambda g: g.op(
            aten.conv2d.default,
            _fp16_input(g, 4, 8, 8),
            g.const(np.zeros((2, 4, 1, 1), np.float16)),
            name="bad",
        ),
        r"input rank 3",
    ),
    "slice_empty": (
        lambda g: g.op(aten.slice.Tensor, _fp16_input(g, 2, 6), 1, 4, 2, name="bad"),
        r"empty slice \[4:2\] of axis 1",
    ),
    "slice_step": (
        _later(
            aten.slice.Tensor,
            lambda g: (_fp16_input(g, 2, 6), 1, 0, 6, 1),
            lambda node: node.update_arg(4, 0),
        ),
        r"step 0: slice_by_index is written for a positive step",
    ),
    "softmax_dtype": (
        lambda g: g.op(aten.softmax.int, _fp16_input(g, 2, 3), 1, torch.float32, name="bad"),
        r"dtype=torch.float32 is not translated",
    ),
    "softmax_half_to_float": (
        lambda g: g.op(aten._softmax.default, _fp16_input(g, 2, 3), 1, True, name="bad"),
        r"half_to_float=True is not translated",
    ),
    "gelu_approximate": (
        _later(
            aten.gelu.default, lambda g: (_fp16_input(g, 3),), _set_kwarg("approximate", "sigmoid")
        ),
        r"approximate='sigmoid' is not translated",
    ),
    "to_copy_no_dtype": (
        lambda g: g.op(aten._to_copy.default, _fp16_input(g, 3), name="bad"),
        r"dtype=None: a copy without a dtype change",
    ),
    "to_copy_dtype": (
        lambda g: g.op(aten._to_copy.default, _int_input(g, 3), dtype=torch.int64, name="bad"),
        r"dtype=torch.int64: a cast to torch.int64 is not translated",
    ),
    "to_copy_fp64": (
        lambda g: g.op(aten._to_copy.default, _fp16_input(g, 3), dtype=torch.float64, name="bad"),
        r"result dtype torch.float64 has no Core ML form",
    ),
    "to_copy_layout": (
        _later(
            aten._to_copy.default,
            lambda g: (_fp16_input(g, 3),),
            lambda node: setattr(
                node, "kwargs", {"dtype": torch.int32, "layout": torch.sparse_coo}
            ),
        ),
        r"layout=torch.sparse_coo is not translated",
    ),
    "to_copy_device": (
        lambda g: g.op(
            aten._to_copy.default,
            _fp16_input(g, 3),
            dtype=torch.float16,
            device=torch.device("cuda"),
            name="bad",
        ),
        r"device=device\(type='cuda'\) is not translated",
    ),
    "to_copy_memory_format": (
        lambda g: g.op(
            aten._to_copy.default,
            _fp16_input(g, 1, 2, 3, 4),
            dtype=torch.float16,
            memory_format=torch.channels_last,
            name="bad",
        ),
        r"memory_format=torch.channels_last is not translated",
    ),
    "to_copy_pin_memory": (
        _later(
            aten._to_copy.default,
            lambda g: (_fp16_input(g, 3),),
            lambda node: setattr(node, "kwargs", {"dtype": torch.float16, "pin_memory": True}),
        ),
        r"pin_memory=True is not translated",
    ),
    "sum_dtype": (
        lambda g: g.op(
            aten.sum.dim_IntList, _int_input(g, 2, 3), [1], dtype=torch.float16, name="bad"
        ),
        r"dtype=torch.float16 would cast the torch.int32 input",
    ),
    "sum_every_axis": (
        lambda g: g.op(aten.sum.dim_IntList, _fp16_input(g, 2, 3), None, name="bad"),
        r"dim=None: a reduction over every axis",
    ),
    "amax_every_axis": (
        lambda g: g.op(aten.amax.default, _fp16_input(g, 2, 3), name="bad"),
        r"dim=\[\]: a reduction over every axis",
    ),
    "argmax_flattened": (
        lambda g: g.op(aten.argmax.default, _fp16_input(g, 2, 3), name="bad"),
        r"dim=None: the argmax of the flattened tensor",
    ),
    "add_alpha": (
        lambda g: g.op(aten.add.Tensor, *[_fp16_input(g, 3)] * 2, alpha=2, name="bad"),
        r"alpha=2 is not translated",
    ),
    "rsub_alpha": (
        lambda g: g.op(aten.rsub.Scalar, _fp16_input(g, 3), 1.0, 2, name="bad"),
        r"alpha=2 is not translated",
    ),
    "mixed_dtypes": (
        lambda g: g.op(aten.add.Tensor, _int_input(g, 3), 0.5, name="bad"),
        r"operands int32 and fp16, result fp16: Core ML's add does not promote",
    ),
    "integer_division": (
        lambda g: g.op(aten.div.Tensor, _int_input(g, 3), _int_input(g, 3), name="bad"),
        r"operands int32 and int32, result fp16",
    ),
    "scalar_overflow": (
        lambda g: g.op(aten.mul.Tensor, _fp16_input(g, 3), 1e6, name="bad"),
        r"other=1000000.0 overflows fp16",
    ),
    "int_activation": (
        lambda g: g.op(aten.relu.default, _int_input(g, 3), name="bad"),
        r"self is torch.int32; the Core ML op takes fp16",
    ),
    "expand_leading_axes": (
        lambda g: g.op(aten.expand.default, _fp16_input(g, 3), [2, 3], name="bad"),
        r"expand adds leading axes",
    ),
    "unknown_kwarg": (
        _later(aten.relu.default, lambda g: (_fp16_input(g, 3),), _set_kwarg("inplace", True)),
        r"unknown kwarg inplace=True",
    ),
    "runtime_dim": (
        _later(aten.transpose.int, lambda g: (_fp16_input(g, 2, 3), 0, 1), _runtime_dim0),
        r"dim0 is a value computed in the graph",
    ),
    "no_translator": (
        lambda g: g.op(aten.sin.default, _fp16_input(g, 3), name="bad"),
        r"no Core ML translation for this op",
    ),
}


def _refusal(build: Callable[[G], None]) -> str:
    """The error the emitter raises on the graph BUILD makes."""
    gm = _graph(build)
    with pytest.raises(AnefxGraphError) as err:
        emit_function(gm)
    return str(err.value)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_argument_it_does_not_translate_is_refused_naming_the_node(case: str) -> None:
    build, why = REFUSED[case]
    message = _refusal(build)
    assert message.startswith("cannot emit node bad (") and f") from {MODULE}: " in message
    bad_op = message.split("(", 1)[1].split(")", 1)[0]
    assert bad_op.startswith(("aten.", "anefx.")), message
    assert re.search(why, message), message


def test_an_argument_no_translator_reads_is_refused(monkeypatch) -> None:
    """The safety net: a translator that forgets an argument cannot drop it silently."""

    def forgetful(c: op_registry.Call):
        return c.mb.conv(x=c.tensor("input"), weight=c.tensor("weight"), name=c.name)

    monkeypatch.setitem(op_registry.TRANSLATORS, aten.conv2d.default, forgetful)
    message = _refusal(_conv(stride=[2, 2]))
    assert "cannot emit node bad (aten.conv2d.default)" in message
    assert "argument stride=[2, 2] is not translated" in message
    # defaults are not a drop: the same forgetful translator emits a plain conv
    emit_function(_graph(_conv()))


def _graph(build: Callable[[G], None]) -> fx.GraphModule:
    """The graph BUILD makes, shapes propagated, then its later changes made."""
    g = G()
    build(g)
    gm = g.module()
    for change in g.later:
        change()
    return gm


# ---------------------------------------------------------------------------------------------
# the vocabulary and the checker


def test_the_registry_is_the_vocabulary_the_checker_reads() -> None:
    names = [str(op) for op in op_registry.TRANSLATORS]
    assert len(set(names)) == len(names)
    assert set(names) == EMITTABLE
    assert set().union(*FAMILIES.values()) == set(op_registry.TRANSLATORS)


def test_unsupported_op_is_a_checker_error_on_lowered_graphs_only(tmp_path: Path) -> None:
    import anefx
    from anefx.targets.coreml import emit

    low = anefx.lower("preset:qwen3-tiny", seq_len=8, dtype=torch.float16)
    assert not low.report.errors and "unsupported_op" not in low.report.counts()
    gm = low.graph_module
    anchor = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)

    def plant(target, *args, name: str) -> None:
        with gm.graph.inserting_after(anchor):
            node = gm.graph.call_function(target, (anchor, *args), name=name)
        node.meta["anefx_module"] = "planted.module"
        propagate_shapes(gm)

    plant(aten.sin.default, name="planted_sin")
    low.report = check_graph(gm, "lowered")
    (v,) = low.report.errors
    assert (v.rule, v.severity, v.node) == ("unsupported_op", "error", "planted_sin")
    assert (v.op, v.module, v.shape) == ("aten.sin.default", "planted.module", [1, 128, 1, 8])
    # refused before conversion starts, naming the node; nothing is written
    with pytest.raises(AnefxGraphError, match="first: unsupported_op at planted_sin"):
        emit(low, tmp_path / "m.mlpackage")
    assert not list(tmp_path.iterdir())
    # an op another rule reports keeps that rule: the new one adds to it
    plant(aten.cumsum.default, 1, name="planted_cumsum")
    rules_at = {(x.node, x.rule) for x in check_graph(gm, "lowered").violations}
    assert {("planted_cumsum", "routing"), ("planted_cumsum", "unsupported_op")} <= rules_at
    # a part of a split model is a lowered graph too; a captured graph has its own rules
    assert check_graph(gm, "lowered:01_layers").counts()["unsupported_op"] == 2
    assert "unsupported_op" not in check_graph(gm, "captured").counts()
    assert rules.RULES_BY_ID["unsupported_op"].severity == "error"
