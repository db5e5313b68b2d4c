"""Property tests for the passes that lower Qwen3.5's hybrid layers (Gated DeltaNet linear
attention beside gated full attention).

Each pass runs on small modules exported as capture exports a model, written with transformers'
own Qwen3.5 functions where they exist (causal_conv1d_fn, l2norm, the norms), on random shapes:
  * the rewritten graph computes the same as the graph the pass received (fp32, tight), on
    random inputs, some of large mean; its postcondition holds; a second run changes nothing;
  * pass-specific structure holds (no conv1d, one layer_norm per norm, rank <= 4, ...);
  * a pattern the pass cannot lower is left in the graph, and the checker's violation for it
    says which pass left it and why.
The L2-norm identity is checked on its own in float64. Then the stock tiny Qwen3.5 hybrid end
to end: the report, parity with transformers (fp32 and fp16), and the stateful graphs (prefill
after a state, decode) chained against transformers' own cache.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx as fx
from _graphs import count, export_graph, fresh, max_rank, run
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from anefx.core.ops import EMITTABLE, LAYER_NORM
from anefx.core.rules import MAX_RANK
from anefx.lowering.checker import check_graph
from anefx.lowering.shape_prop import propagate_shapes
from anefx.passes import (
    conv1d_to_conv2d,
    dilated_conv_to_taps,
    fold_constants,
    l2_norm_to_layer_norm,
    mean_to_sum,
    merge_concatenated_linears,
    pad_to_cat,
    remove_noop_nodes,
    repeat_interleave_to_expand,
    repeat_to_cat,
    rms_norm_to_layer_norm,
    sdpa_to_matmul,
    split_sliced_linears,
    split_to_slices,
    unflatten_rows,
    views_to_reshape,
)
from anefx.passes._util import PassResult, is_op

transformers = pytest.importorskip("transformers")
qwen35 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

aten = torch.ops.aten
TOL = 1e-5  # fp32: max |after - before| relative to the largest |before|
seeds = st.integers(0, 2**16)
# exports cost ~0.2 s each: fewer examples than the profile's 15 keep the file under a minute,
# and no shrinking (each shrink step is an export): a failing example is printed as found
FEW = settings(max_examples=6, phases=[Phase.explicit, Phase.generate])


# -- helpers ----------------------------------------------------------------------------------


def randn(shape, seed: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * std + mean


def apply(pass_fn, gm: fx.GraphModule) -> PassResult:
    """PASS_FN on a copy of GM, shapes recomputed (as the pass manager does)."""
    res = pass_fn(fresh(gm))
    res.graph_module.recompile()
    res.graph_module.graph.lint()
    propagate_shapes(res.graph_module)
    return res


def chain(gm: fx.GraphModule, *passes) -> fx.GraphModule:
    for p in passes:
        gm = apply(p, gm).graph_module
    return gm


def assert_same(after: torch.Tensor, before: torch.Tensor, tol: float = TOL, what: str = ""):
    assert after.shape == before.shape, f"{what}: shape {tuple(after.shape)} != {before.shape}"
    assert torch.isfinite(before).all(), f"{what}: reference is not finite"
    scale = before.abs().max().item() or 1.0
    err = (after.double() - before.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def assert_idempotent(pass_fn, gm: fx.GraphModule):
    code = gm.code
    again = apply(pass_fn, gm)
    assert not again.modified, "a second run reported modified=True"
    assert again.graph_module.code == code, "a second run changed the graph"


def left_by(gm: fx.GraphModule, name: str) -> list[str]:
    """The lowered-graph checker's messages that say pass NAME left their op."""
    report = check_graph(gm, "lowered")
    return [v.message for v in report.errors if f"(left by {name}:" in v.message]


def clean(module: torch.nn.Module, *args: torch.Tensor) -> fx.GraphModule:
    """MODULE exported and cleaned as the pipeline's first pass cleans a capture."""
    return apply(remove_noop_nodes.remove_noop_nodes, export_graph(module, *args)).graph_module


class Fn(torch.nn.Module):
    """A module computing FN(*inputs, *params): parameters become the graph's constants."""

    def __init__(self, fn, *params: torch.Tensor):
        super().__init__()
        self.fn = fn
        self.params = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.params)


# -- l2_norm_to_layer_norm --------------------------------------------------------------------


@given(
    dim=st.integers(1, 256),
    rows=st.integers(1, 6),
    eps=st.sampled_from([1e-6, 1e-3, 0.5]),
    scale=st.sampled_from([0.0, 1e-4, 1.0, 300.0]),
    seed=seeds,
)
def test_l2_identity_is_exact(dim: int, rows: int, eps: float, scale: float, seed: int) -> None:
    """x / sqrt(sum(x^2) + eps) = layer_norm(cat[sqrt(D) x, -sqrt(D) x], gamma 1/sqrt(D),
    eps)[:D], in float64, for any D, eps and scale (a zero row included)."""
    x = randn((rows, dim), seed, mean=scale, std=scale).double()
    ref = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
    z = x * math.sqrt(dim)
    gamma = torch.full((2 * dim,), 1 / math.sqrt(dim), dtype=torch.float64)
    got = LAYER_NORM(torch.cat([z, -z], -1), gamma, -1, eps)[..., :dim]
    assert (got - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())


@FEW
@given(
    shape=st.sampled_from([(3, 8, 16), (1, 5, 2, 24), (2, 1, 128), (4, 7, 1)]),
    eps=st.sampled_from([1e-6, 1e-3]),
    mean=st.sampled_from([0.0, 5.0, -40.0]),
    seed=seeds,
)
def test_l2_norm_rewrite(shape, eps: float, mean: float, seed: int) -> None:
    """transformers' l2norm (the delta rule's q/k norm) becomes one layer_norm, equal to it."""
    x = randn(shape, seed, mean=mean)
    gm = clean(Fn(lambda x: qwen35.l2norm(x, eps=eps) * 0.5), x)
    res = apply(l2_norm_to_layer_norm.l2_norm_to_layer_norm, gm)
    after = res.graph_module
    assert res.modified
    assert count(after, LAYER_NORM) == 1 and count(after, aten.rsqrt) == 0
    assert l2_norm_to_layer_norm.postcondition(after) == []
    for k in range(2):
        xk = randn(shape, seed + k + 1, mean=mean)
        xd = xk.double()
        ref = 0.5 * xd * torch.rsqrt((xd * xd).sum(-1, keepdim=True) + eps)
        assert_same(run(after, xk).double(), ref)
    assert_idempotent(l2_norm_to_layer_norm.l2_norm_to_layer_norm, after)


def test_l2_norm_over_another_axis_is_left_and_reported() -> None:
    def over_rows(x):
        return x * torch.rsqrt((x * x).sum(-2, keepdim=True) + 1e-6)

    gm = clean(Fn(over_rows), randn((2, 5, 8), 0))
    res = apply(l2_norm_to_layer_norm.l2_norm_to_layer_norm, gm)
    assert count(res.graph_module, aten.rsqrt) == 1 and count(res.graph_module, LAYER_NORM) == 0
    assert l2_norm_to_layer_norm.postcondition(res.graph_module) == []
    assert_same(run(res.graph_module, randn((2, 5, 8), 1)), run(gm, randn((2, 5, 8), 1)))
    messages = left_by(res.graph_module, "l2_norm_to_layer_norm")
    assert messages and "another axis" in messages[0], messages


# -- rms_norm_to_layer_norm on Qwen3.5's norms (after fold_constants) ---------------------------


@FEW
@given(dim=st.sampled_from([8, 24, 64]), mean=st.sampled_from([0.0, 30.0]), seed=seeds)
def test_qwen35_norms_become_layer_norm(dim: int, mean: float, seed: int) -> None:
    """The zero-centred RMSNorm x_hat * (1 + w) (its weight folded to a constant first) and the
    gated norm w * rmsnorm(x) * silu(z): one layer_norm each, the weight in its gamma."""
    torch.manual_seed(seed)
    centred = qwen35.Qwen3_5RMSNorm(dim, eps=1e-6)
    gated = qwen35.Qwen3_5RMSNormGated(dim, eps=1e-6)
    with torch.no_grad():
        centred.weight.normal_(0, 0.3)
        gated.weight.normal_(1, 0.3)

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.centred, self.gated = centred, gated

        def forward(self, x, y, z):
            return self.centred(x) + self.gated(y, z)

    xs = tuple(randn((1, 5, dim), seed + i, mean=mean) for i in range(3))
    gm = clean(Both(), *xs)
    after = chain(gm, fold_constants.fold_constants, rms_norm_to_layer_norm.rms_norm_to_layer_norm)
    assert count(after, LAYER_NORM) == 2
    assert count(after, aten.rsqrt, aten.pow, aten.type_as) == 0
    # (1 + w) is in the gamma: no add is left beside the sum of the two norms
    assert count(after, aten.add) == 1
    assert_same(run(after, *xs), run(gm, *xs))


def test_type_as_is_the_cast_it_stands_for() -> None:
    def norm_like(x):
        return (x.float() * 3.0).type_as(x) + x.type_as(x)

    x = randn((2, 6), 0).half()
    gm = export_graph(Fn(norm_like), x)
    assert count(gm, aten.type_as) > 0
    after = apply(remove_noop_nodes.remove_noop_nodes, gm).graph_module
    assert count(after, aten.type_as) == 0
    assert remove_noop_nodes.postcondition(after) == []
    casts = [n for n in after.graph.nodes if is_op(n, aten._to_copy)]
    assert [n.kwargs["dtype"] for n in casts if n.kwargs.get("dtype") == torch.float16]
    assert torch.equal(run(after, x), run(gm, x))


# -- fold_constants ---------------------------------------------------------------------------


@FEW
@given(
    heads=st.integers(1, 4),
    dk=st.integers(1, 9),
    dv=st.integers(1, 9),
    seq=st.integers(1, 6),
    seed=seeds,
)
def test_fold_constants(heads: int, dk: int, dv: int, seq: int, seed: int) -> None:
    """-exp(A_log), 1 + w and a conv weight's squeeze/unsqueeze become constants; a delta
    rule's zero state is dropped from every sum and product it meets."""

    def layer(q, k, u, a, a_log, w, conv_w):
        g = -a_log.float().exp() * torch.nn.functional.softplus(a)  # (1, S, H)
        state = torch.zeros(heads, dk, dv)
        o = q @ state + (q @ k.transpose(-1, -2)) @ u  # (H, S, dv)
        new = u - k @ state
        late = state - k.transpose(-1, -2) @ new  # 0 - b: a negation
        weight = conv_w.squeeze(1).unsqueeze(1) * 1.0
        return o * (1.0 + w) + new, g, late, weight.sum()

    params = (randn((heads,), seed), randn((dv,), seed + 1), randn((3, 1, 4), seed + 2))
    inputs = (
        randn((heads, seq, dk), seed + 3),
        randn((heads, seq, dk), seed + 4),
        randn((heads, seq, dv), seed + 5),
        randn((1, seq, heads), seed + 6),
    )
    gm = clean(Fn(layer, *params), *inputs)
    res = apply(fold_constants.fold_constants, gm)
    after = res.graph_module
    assert res.modified
    assert fold_constants.postcondition(after) == []
    assert count(after, aten.zeros, aten.exp, aten.squeeze, aten.unsqueeze) == 0
    # (q @ k^T) @ u and k^T @ new are left: the products with the state are gone
    assert count(after, aten.matmul) == 3
    assert count(after, aten.neg) == 1  # state - b
    stored = [getattr(after, n.target) for n in after.graph.nodes if n.op == "get_attr"]
    assert not any(not t.any() for t in stored), "a zero state is stored, not dropped"
    for before, got in zip(run(gm, *inputs), run(after, *inputs), strict=True):
        assert_same(got, before)
    assert_idempotent(fold_constants.fold_constants, after)


def test_fold_constants_leaves_broadcast_copies() -> None:
    """An expand of a constant is left: folding would store the broadcast copy."""

    def widen(x, eye):
        return x @ eye.expand(3, 4, 4)

    gm = clean(Fn(widen, torch.eye(4)), randn((3, 2, 4), 0))
    res = apply(fold_constants.fold_constants, gm)
    assert not res.modified and count(res.graph_module, aten.expand) == 1
    assert fold_constants.postcondition(res.graph_module) == []


# -- split_to_slices --------------------------------------------------------------------------


@FEW
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    chunks=st.integers(1, 4),
    index=st.integers(-3, 2),
    seed=seeds,
)
def test_split_to_slices(sizes: list[int], chunks: int, index: int, seed: int) -> None:
    """split_with_sizes, chunk, unbind and integer indexing: slices and reshapes, equal."""
    width = sum(sizes)

    def parts(x, y):
        a = torch.split(x, sizes, dim=-1)
        b = torch.chunk(x, chunks, dim=1)
        c = torch.unbind(y, dim=1)
        d = y[0][:, index] + y[0, 1][index]
        return (sum(p.sum(-1) for p in a), sum(p.sum(1) for p in b), sum(c), d)

    x, y = randn((2, 7, width), seed), randn((1, 3, 3), seed + 1)
    gm = clean(Fn(parts), x, y)
    res = apply(split_to_slices.split_to_slices, gm)
    after = res.graph_module
    assert res.modified
    assert split_to_slices.postcondition(after) == []
    assert count(after, aten.split, aten.split_with_sizes, aten.unbind, aten.select) == 0
    assert not any(n.target is operator.getitem for n in after.graph.nodes)
    for before, got in zip(run(gm, x, y), run(after, x, y), strict=True):
        assert torch.equal(got, before)
    assert_idempotent(split_to_slices.split_to_slices, after)


def test_split_read_whole_is_left_and_reported() -> None:
    """A split whose tuple is read as a whole (here: returned) is left, reported."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 6, device="meta")
    parts = g.call_function(aten.split.Tensor, (x, 3, 1))
    g.output(parts)
    gm = fx.GraphModule(torch.nn.Module(), g)
    propagate_shapes(gm)
    res = apply(split_to_slices.split_to_slices, gm)
    assert not res.modified and count(res.graph_module, aten.split) == 1
    assert split_to_slices.postcondition(res.graph_module) == []
    messages = left_by(res.graph_module, "split_to_slices")
    assert messages and "getitem" in messages[0], messages


# -- split_sliced_linears (the gated attention's query / gate) ----------------------------------


def _gated_query(heads: int, head_dim: int):
    """Qwen3_5Attention's q_proj split, verbatim: view (.., H, 2D), chunk, reshape."""

    def proj(x, w, *b):
        y = torch.nn.functional.linear(x, w, b[0] if b else None)
        q, gate = torch.chunk(y.view(*x.shape[:-1], -1, head_dim * 2), 2, dim=-1)
        return q.reshape(*x.shape[:-1], heads, head_dim) * 2.0, torch.sigmoid(
            gate.reshape(*x.shape[:-1], -1)
        )

    return proj


@FEW
@given(
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 8),
    hidden=st.integers(1, 16),
    bias=st.booleans(),
    seed=seeds,
)
def test_split_sliced_linears_gated_query(heads, head_dim, hidden, bias, seed) -> None:
    w = randn((2 * heads * head_dim, hidden), seed)
    params = (w, randn((2 * heads * head_dim,), seed + 1)) if bias else (w,)
    x = randn((1, 5, hidden), seed + 2)
    gm = clean(Fn(_gated_query(heads, head_dim), *params), x)
    gm = chain(gm, split_to_slices.split_to_slices)
    assert count(gm, aten.linear) == 1 and count(gm, aten.slice) == 2
    res = apply(split_sliced_linears.split_sliced_linears, gm)
    after = res.graph_module
    assert res.modified
    assert split_sliced_linears.postcondition(after) == []
    assert count(after, aten.linear) == 2 and count(after, aten.slice) == 0
    widths = sorted(n.meta["val"].shape[-1] for n in after.graph.nodes if is_op(n, aten.linear))
    assert widths == [heads * head_dim] * 2
    for before, got in zip(run(gm, x), run(after, x), strict=True):
        assert_same(got, before)
    assert_idempotent(split_sliced_linears.split_sliced_linears, after)


@FEW
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), seed=seeds)
def test_split_sliced_linears_direct_slices(sizes: list[int], seed: int) -> None:
    """A projection split by sizes (q | k | v) becomes one linear per part."""

    def qkv(x, w):
        return tuple(torch.split(torch.nn.functional.linear(x, w), sizes, -1))

    x = randn((1, 4, 8), seed + 1)
    gm = chain(clean(Fn(qkv, randn((sum(sizes), 8), seed)), x), split_to_slices.split_to_slices)
    res = apply(split_sliced_linears.split_sliced_linears, gm)
    after = res.graph_module
    assert res.modified and count(after, aten.linear) == len(sizes)
    assert count(after, aten.slice) == 0
    for before, got in zip(run(gm, x), run(after, x), strict=True):
        assert_same(got, before)


def test_split_sliced_linears_leaves_overlaps_and_whole_reads() -> None:
    w = randn((10, 4), 0)

    def overlapping(x, w):
        y = torch.nn.functional.linear(x, w)
        return y[..., :6] * 2, y[..., 4:]

    def whole_too(x, w):
        y = torch.nn.functional.linear(x, w)
        return y[..., :5] * 2, y

    x = randn((1, 3, 4), 1)
    for fn in (overlapping, whole_too):
        gm = clean(Fn(fn, w), x)
        res = apply(split_sliced_linears.split_sliced_linears, gm)
        assert not res.modified and res.graph_module.code == gm.code, fn.__name__
        assert split_sliced_linears.postcondition(res.graph_module) == []


# -- merge_concatenated_linears ---------------------------------------------------------------


def _fused_qkvz(key_heads: int, per_key: int, dk: int, dv: int):
    """Qwen3-Next's projection: [q | k | v | z] per key head, q, k, v joined for the conv."""

    def proj(x, w, *b):
        y = torch.nn.functional.linear(x, w, b[0] if b else None)
        y = y.view(*x.shape[:-1], key_heads, 2 * dk + 2 * per_key * dv)
        q, k, v, z = torch.split(y, [dk, dk, per_key * dv, per_key * dv], dim=-1)
        v = v.reshape(*x.shape[:-1], -1, dv)
        q, k, v = (t.reshape(*x.shape[:-1], -1) for t in (q, k, v))
        return torch.cat((q, k, v), dim=-1).transpose(1, 2), z.reshape(*x.shape[:-1], -1, dv)

    return proj


@FEW
@given(
    key_heads=st.integers(1, 3),
    per_key=st.integers(1, 3),
    dk=st.integers(1, 6),
    dv=st.integers(1, 6),
    bias=st.booleans(),
    seed=seeds,
)
def test_merge_concatenated_linears_fused_qkvz(key_heads, per_key, dk, dv, bias, seed) -> None:
    """split_sliced_linears gives q, k, v, z a linear each; the q | k | v the model joins
    become one linear again (z stays apart), the same function."""
    rows = key_heads * (2 * dk + 2 * per_key * dv)
    w = randn((rows, 8), seed)
    params = (w, randn((rows,), seed + 1)) if bias else (w,)
    x = randn((1, 5, 8), seed + 2)
    gm = clean(Fn(_fused_qkvz(key_heads, per_key, dk, dv), *params), x)
    gm = chain(gm, split_to_slices.split_to_slices, split_sliced_linears.split_sliced_linears)
    assert count(gm, aten.linear) == 4 and count(gm, aten.cat) == 1
    res = apply(merge_concatenated_linears.merge_concatenated_linears, gm)
    after = res.graph_module
    assert res.modified and merge_concatenated_linears.postcondition(after) == []
    assert count(after, aten.linear) == 2 and count(after, aten.cat) == 0
    widths = sorted(n.meta["val"].shape[-1] for n in after.graph.nodes if is_op(n, aten.linear))
    assert widths == sorted([key_heads * per_key * dv, key_heads * (2 * dk + per_key * dv)])
    for before, got in zip(run(gm, x), run(after, x), strict=True):
        assert_same(got, before)
    assert_idempotent(merge_concatenated_linears.merge_concatenated_linears, after)


def test_merge_concatenated_linears_leaves_other_concats() -> None:
    """Linears of different inputs, a linear read elsewhere too, a concat on another axis:
    left as they are."""
    wa, wb = randn((3, 4), 0), randn((5, 4), 1)

    def two_inputs(x, wa, wb):
        lin = torch.nn.functional.linear
        return torch.cat((lin(x, wa), lin(x * 2, wb)), -1)

    def read_twice(x, wa, wb):
        lin = torch.nn.functional.linear
        a = lin(x, wa)
        return torch.cat((a, lin(x, wb)), -1), a * 3

    def other_axis(x, wa, wb):
        lin = torch.nn.functional.linear
        return torch.cat((lin(x, wa), lin(x, wa * 1.0 + 1)), 1)

    x = randn((1, 3, 4), 2)
    for fn in (two_inputs, read_twice, other_axis):
        gm = clean(Fn(fn, wa, wb), x)
        res = apply(merge_concatenated_linears.merge_concatenated_linears, gm)
        assert not res.modified and res.graph_module.code == gm.code, fn.__name__
        assert merge_concatenated_linears.postcondition(res.graph_module) == []


# -- sdpa_to_matmul ---------------------------------------------------------------------------


@FEW
@given(
    heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    seq=st.integers(1, 6),
    extra=st.integers(0, 3),
    head_dim=st.integers(1, 8),
    mask=st.booleans(),
    scale=st.sampled_from([None, 0.3]),
    seed=seeds,
)
def test_sdpa_to_matmul(heads_kv, seq, extra, head_dim, mask, scale, seed) -> None:
    """transformers' sdpa attention (key/value heads repeated first, as it does without
    enable_gqa): matmuls, scale, mask, softmax; limit_rank then folds the repeat (rank 4)."""
    heads, kv = heads_kv
    total = seq + extra

    def attend(q, k, v, m):
        k = qwen35.repeat_kv(k, heads // kv)
        v = qwen35.repeat_kv(v, heads // kv)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=m if mask else None, scale=scale
        )

    q = randn((1, heads, seq, head_dim), seed)
    k, v = randn((1, kv, total, head_dim), seed + 1), randn((1, kv, total, head_dim), seed + 2)
    m = torch.where(randn((1, 1, seq, total), seed + 3) > 0, 0.0, -1e4)
    m[..., 0] = 0.0  # every row sees one slot
    gm = clean(Fn(attend), q, k, v, m)
    res = apply(sdpa_to_matmul.sdpa_to_matmul, gm)
    after = res.graph_module
    assert res.modified
    assert sdpa_to_matmul.postcondition(after) == []
    assert count(after, aten.scaled_dot_product_attention) == 0
    assert count(after, aten.matmul) == 2 and count(after, aten._softmax) == 1
    assert_same(run(after, q, k, v, m), run(gm, q, k, v, m))
    assert_idempotent(sdpa_to_matmul.sdpa_to_matmul, after)
    from anefx.passes import limit_rank

    ranked = apply(limit_rank.limit_rank, after).graph_module
    assert max_rank(ranked) <= MAX_RANK
    assert_same(run(ranked, q, k, v, m), run(gm, q, k, v, m))


def test_causal_sdpa_is_left_and_reported() -> None:
    def causal(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = randn((1, 2, 4, 8), 0)
    gm = clean(Fn(causal), q, q, q)
    res = apply(sdpa_to_matmul.sdpa_to_matmul, gm)
    assert not res.modified and count(res.graph_module, aten.scaled_dot_product_attention) == 1
    assert sdpa_to_matmul.postcondition(res.graph_module) == []
    messages = left_by(res.graph_module, "sdpa_to_matmul")
    assert messages and "causal" in messages[0], messages


# -- repeat_interleave_to_expand and views_to_reshape -----------------------------------------


@FEW
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    repeats=st.integers(1, 3),
    data=st.data(),
    seed=seeds,
)
def test_repeat_interleave_to_expand(shape, repeats: int, data, seed: int) -> None:
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = randn(shape, seed)
    gm = clean(Fn(lambda x: x.repeat_interleave(repeats, dim=dim) * 2.0), x)
    res = apply(repeat_interleave_to_expand.repeat_interleave_to_expand, gm)
    after = res.graph_module
    assert res.modified and count(after, aten.repeat_interleave) == 0
    assert repeat_interleave_to_expand.postcondition(after) == []
    assert max_rank(after) <= MAX_RANK
    assert torch.equal(run(after, x), run(gm, x))


# -- mean_to_sum and repeat_to_cat (Qwen4-Exp's hyper-connections) ----------------------------


@FEW
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    keepdim=st.booleans(),
    data=st.data(),
    seed=seeds,
)
def test_mean_to_sum(shape, keepdim: bool, data, seed: int) -> None:
    """A mean over random axes equals the sum over them times 1 / n (fp32, rounding level)."""
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    x = randn(shape, seed)
    gm = clean(Fn(lambda x: x.mean(dim=axes, keepdim=keepdim) + 1.0), x)
    res = apply(mean_to_sum.mean_to_sum, gm)
    after = res.graph_module
    assert res.modified and count(after, aten.mean) == 0
    assert mean_to_sum.postcondition(after) == []
    torch.testing.assert_close(run(after, x), run(gm, x), rtol=1e-6, atol=1e-6)


@FEW
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    data=st.data(),
    seed=seeds,
)
def test_repeat_to_cat(shape, data, seed: int) -> None:
    """Tensor.repeat with random counts per axis equals the concatenations of copies."""
    counts = data.draw(st.lists(st.integers(1, 4), min_size=len(shape), max_size=len(shape)))
    x = randn(shape, seed)
    gm = clean(Fn(lambda x: x.repeat(*counts) * 2.0), x)
    res = apply(repeat_to_cat.repeat_to_cat, gm)
    after = res.graph_module
    assert count(after, aten.repeat) == 0 and repeat_to_cat.postcondition(after) == []
    assert set(str(n.target) for n in after.graph.nodes if n.op == "call_function") <= EMITTABLE
    assert torch.equal(run(after, x), run(gm, x))


@FEW
@given(
    channels=st.integers(1, 6),
    length=st.integers(1, 12),
    taps=st.integers(1, 4),
    dilation=st.integers(2, 4),
    padding=st.integers(0, 6),
    seed=seeds,
)
def test_dilated_conv_to_taps(channels, length, taps, dilation, padding, seed: int) -> None:
    """A dilated depthwise conv1d with random shapes equals its weighted shifted slices."""
    if length + 2 * padding - dilation * (taps - 1) < 1:
        return  # no output column
    x = randn((1, channels, length), seed)
    w = randn((channels, 1, taps), seed + 1)

    def conv(x):
        return torch.nn.functional.conv1d(
            x, w, padding=padding, dilation=dilation, groups=channels
        ).sigmoid()

    gm = clean(Fn(conv), x)
    res = apply(dilated_conv_to_taps.dilated_conv_to_taps, gm)
    after = res.graph_module
    assert res.modified and count(after, aten.conv1d) == 0
    assert dilated_conv_to_taps.postcondition(after) == []
    torch.testing.assert_close(run(after, x), run(gm, x), rtol=1e-5, atol=1e-6)


@FEW
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    data=st.data(),
    value=st.sampled_from([0.0, -1.5]),
    seed=seeds,
)
def test_pad_to_cat(shape, data, value: float, seed: int) -> None:
    """A constant pad of random widths on random trailing axes equals the concatenations."""
    pairs = data.draw(st.integers(1, len(shape)))
    pads = data.draw(st.lists(st.integers(0, 3), min_size=2 * pairs, max_size=2 * pairs))
    x = randn(shape, seed)
    gm = clean(Fn(lambda x: torch.nn.functional.pad(x, pads, value=value) * 2.0), x)
    res = apply(pad_to_cat.pad_to_cat, gm)
    after = res.graph_module
    assert count(after, aten.pad) == count(after, aten.constant_pad_nd) == 0
    assert pad_to_cat.postcondition(after) == []
    assert torch.equal(run(after, x), run(gm, x))


def test_repeat_interleave_by_a_tensor_is_left_and_reported() -> None:
    def ragged(x, counts):
        return x.repeat_interleave(counts, dim=0, output_size=6)

    counts = torch.tensor([1, 2, 3])
    g = fx.Graph()
    x = g.placeholder("x")
    c = g.placeholder("counts")
    x.meta["val"], c.meta["val"] = torch.empty(3, 4, device="meta"), counts.to("meta")
    g.output(g.call_function(aten.repeat_interleave.self_Tensor, (x, c, 0), {"output_size": 6}))
    gm = fx.GraphModule(torch.nn.Module(), g)
    propagate_shapes(gm)
    res = apply(repeat_interleave_to_expand.repeat_interleave_to_expand, gm)
    assert not res.modified
    assert repeat_interleave_to_expand.postcondition(res.graph_module) == []
    assert left_by(res.graph_module, "repeat_interleave_to_expand")
    xs = randn((3, 4), 0)
    assert torch.equal(run(res.graph_module, xs, counts), ragged(xs, counts))


@FEW
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple), seed=seeds)
def test_views_to_reshape(shape, seed: int) -> None:
    def views(x, eye):
        y = x.unsqueeze(0).squeeze(0).unsqueeze(-1) * 2.0
        return y.squeeze(-1), (eye.unsqueeze(1).squeeze(1) + 0.5).expand(2, *eye.shape) * 3.0

    x = randn(shape, seed)
    gm = clean(Fn(views, randn((3, 3), seed + 1)), x)
    res = apply(views_to_reshape.views_to_reshape, gm)
    after = res.graph_module
    assert res.modified and views_to_reshape.postcondition(after) == []
    assert count(after, aten.squeeze, aten.unsqueeze) == 0
    for before, got in zip(run(gm, x), run(after, x), strict=True):
        assert torch.equal(got, before)


# -- conv1d_to_conv2d (the causal depthwise conv) ---------------------------------------------


def _stateless(x, w):
    """The prefill without a cache: transformers' causal_conv1d_fn (padding K-1, first S)."""
    return qwen35.causal_conv1d_fn(x, w.squeeze(1), None, activation="silu")


def _after_state(x, state, w):
    """The prefill after a state: the conv input is cat[state, x] (the cache's update), then
    causal_conv1d_fn, then the layer keeps the last S columns."""
    full = torch.cat([state, x], dim=-1)
    return qwen35.causal_conv1d_fn(full, w.squeeze(1), None, activation="silu")[
        :, :, -x.shape[-1] :
    ]


def _decode(x, state, w):
    """A decode step: transformers' causal_conv1d_update (cat[state, x], no padding, last S);
    its in-place write of the new window goes to a copy here."""
    return qwen35.causal_conv1d_update(x, state.clone(), w.squeeze(1), None, "silu")


def _plain(x, w, b, padding: int, groups: int):
    """Any other rank-3 conv1d: grouped or not, biased, a symmetric padding, read whole."""
    return torch.nn.functional.conv1d(x, w, b, padding=padding, groups=groups) * 2.0


@FEW
@example(form="stateless", channels=6, kernel=4, seq=5, padding=0, depthwise=True, seed=0)
@example(form="after_state", channels=6, kernel=4, seq=5, padding=0, depthwise=True, seed=1)
@example(form="decode", channels=6, kernel=4, seq=1, padding=0, depthwise=True, seed=2)
@example(form="plain", channels=4, kernel=3, seq=6, padding=2, depthwise=False, seed=3)
@given(
    form=st.sampled_from(["stateless", "after_state", "decode", "plain"]),
    channels=st.integers(1, 12),
    kernel=st.integers(1, 5),
    seq=st.integers(1, 9),
    padding=st.integers(0, 3),
    depthwise=st.booleans(),
    seed=seeds,
)
def test_conv1d_to_conv2d(form, channels, kernel, seq, padding, depthwise, seed) -> None:
    """Every form the Qwen3.5 layer writes (and a plain conv1d) becomes one conv2d on
    (B, C, 1, L) with no padding, computing exactly the columns the graph reads."""
    if form == "decode":
        seq = 1
    w = randn((channels, 1, kernel), seed)
    x = randn((1, channels, seq), seed + 1, mean=2.0)
    state = randn((1, channels, kernel - 1), seed + 2)
    if form == "stateless":
        module, args = Fn(_stateless, w), (x,)
    elif form == "after_state":
        module, args = Fn(_after_state, w), (x, state)
    elif form == "decode":
        module, args = Fn(_decode, w), (x, torch.cat([state, randn((1, channels, 2), 9)], -1))
    else:
        seq = max(seq, kernel)  # an input at least as long as the kernel
        groups = channels if depthwise else 1
        w = randn((channels, channels // groups, kernel), seed)
        x = randn((1, channels, seq), seed + 1)
        fn = lambda x, w, b: _plain(x, w, b, padding, groups)  # noqa: E731
        module, args = Fn(fn, w, randn((channels,), seed + 3)), (x,)
    gm = chain(clean(module, *args), fold_constants.fold_constants)
    assert count(gm, aten.conv1d, aten.convolution) == 1
    res = apply(conv1d_to_conv2d.conv1d_to_conv2d, gm)
    after = res.graph_module
    assert res.modified
    assert conv1d_to_conv2d.postcondition(after) == []
    assert count(after, aten.conv1d, aten.convolution) == 0
    (conv,) = [n for n in after.graph.nodes if is_op(n, aten.conv2d)]
    assert list(conv.args[4]) == [0, 0]  # no padding: the zeros it needs are in its input
    # the columns computed are the columns read: S for the layer's forms
    width = conv.meta["val"].shape[-1]
    if form != "plain":
        assert width == seq
    else:
        assert width == seq + 2 * padding - kernel + 1
    assert_same(run(after, *args), run(gm, *args))
    assert_idempotent(conv1d_to_conv2d.conv1d_to_conv2d, after)


def test_strided_conv1d_is_left_and_reported() -> None:
    w = randn((4, 1, 3), 0)
    fn = lambda x, w: torch.nn.functional.conv1d(x, w, stride=2, groups=4)  # noqa: E731
    x = randn((1, 4, 9), 1)
    gm = clean(Fn(fn, w), x)
    res = apply(conv1d_to_conv2d.conv1d_to_conv2d, gm)
    assert not res.modified and count(res.graph_module, aten.conv1d) == 1
    assert conv1d_to_conv2d.postcondition(res.graph_module) == []
    messages = left_by(res.graph_module, "conv1d_to_conv2d")
    assert messages and "stride" in messages[0], messages
    assert_same(run(res.graph_module, x), run(gm, x))


# -- the stock Qwen3.5 hybrid, end to end ------------------------------------------------------

# ops that must not survive the pipeline on the hybrid: what the passes above lower, what the
# capture's substitutions remove, and the position arithmetic fold_position_tables folds
GONE = (
    aten.conv1d,
    aten.convolution,
    aten.rsqrt,
    aten.pow,
    aten.split,
    aten.split_with_sizes,
    aten.select,
    aten.repeat_interleave,
    aten.scaled_dot_product_attention,
    aten.zeros,
    aten.type_as,
    aten.squeeze,
    aten.unsqueeze,
    aten.select_scatter,
    aten.slice_scatter,
    aten.cos,
    aten.sin,
)


def _hybrid(attention: str | None = None, **fields) -> torch.nn.Module:
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        layer_types=["linear_attention"] * 2 + ["full_attention", "linear_attention"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 2],
            "mrope_interleaved": True,
        },
    )
    cfg = transformers.Qwen3_5TextConfig(**(base | fields))
    if attention:
        cfg._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.Qwen3_5ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hybrid() -> torch.nn.Module:
    """The issue's stock tiny hybrid: Hv = 2 Hk, dk != dv, partial rotary 0.25 with text-mode
    mrope, transformers' default (sdpa) attention."""
    return _hybrid()


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    rmse = (ref.double() - out.double()).pow(2).mean().sqrt().item()
    return float("inf") if rmse == 0 else 20 * math.log10(ref.abs().max().item() / rmse)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stock_hybrid_lowers_clean_and_matches(hybrid, dtype) -> None:
    import anefx

    low = anefx.lower(hybrid, seq_len=8, dtype=dtype, repeat=False)
    # nothing but the fp16 rule (an fp32 parity graph is fp32 by design)
    errors = [v for v in low.report.errors if not (dtype == torch.float32 and v.rule == "fp16")]
    assert not errors, low.report.render()
    gm = low.graph_module
    assert count(gm, *GONE) == 0
    assert {str(n.target) for n in gm.graph.nodes if n.op == "call_function"} <= EMITTABLE
    # provenance: the depthwise convs, the L2 norms and the query/gate split, where expected
    linear = [f"model.layers.{i}.linear_attn" for i in (0, 1, 3)]
    grouped = [n for n in gm.graph.nodes if is_op(n, aten.conv2d) and len(n.args) > 6]
    assert sorted(n.meta["anefx_module"] for n in grouped) == linear
    assert {n.meta["anefx_pass"] for n in grouped} == {"conv1d_to_conv2d"}
    l2 = [n for n in gm.graph.nodes if n.meta.get("anefx_pass") == "l2_norm_to_layer_norm"]
    assert sorted({n.meta["anefx_module"] for n in l2 if n.target is LAYER_NORM}) == linear
    assert sum(n.target is LAYER_NORM for n in l2) == 2 * len(linear)  # q and k
    q_proj = [n for n in gm.graph.nodes if n.meta.get("anefx_module", "").endswith("q_proj")]
    assert sum(is_op(n, aten.conv2d) for n in q_proj) == 2  # the query and the gate
    ids = _ids(8)
    with torch.no_grad():
        ref = hybrid(input_ids=ids, use_cache=False).logits
    out = low.run(ids).float()
    if dtype == torch.float32:
        assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    else:
        assert psnr(ref, out) >= 60.0


def test_another_hybrid_shape_matches() -> None:
    """Eager attention, a kernel of 3, as many key as value heads, head_dim 16 with half of it
    rotated, a short prompt padded into the captured length."""
    import anefx

    model = _hybrid(
        "eager",
        linear_conv_kernel_dim=3,
        linear_num_value_heads=2,
        linear_value_head_dim=8,
        head_dim=16,
        layer_types=["full_attention", "linear_attention"],
        num_hidden_layers=2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
            "mrope_section": [1, 1, 2],
            "mrope_interleaved": True,
        },
    )
    low = anefx.lower(model, seq_len=7, dtype=torch.float32, repeat=False)
    assert not [v for v in low.report.errors if v.rule != "fp16"], low.report.render()
    ids = _ids(5, seed=3)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    out = low.run(ids)
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_stateful_graphs_chain_like_transformers_cache(hybrid) -> None:
    """The stateful graphs (conv input cat[state, x] in prefill, causal_conv1d_update's form in
    decode): prefill 8 from empty states, prefill 8 more after them, then two decode steps,
    states carried, against transformers with its own cache."""
    import anefx
    from anefx.models.capture import context_mask

    context = 32
    pre = anefx.lower(hybrid, seq_len=8, dtype=torch.float32, repeat=False, context=context)
    dec = anefx.lower(hybrid, seq_len=1, dtype=torch.float32, repeat=False, context=context)
    for low, width in ((pre, 8), (dec, 1)):
        assert count(low.graph_module, *GONE) == 0
        # the depthwise convs compute the S columns the layer keeps, no more
        grouped = [n for n in low.graph_module.graph.nodes if is_op(n, aten.conv2d) and n.args[6:]]
        assert grouped and {n.meta["val"].shape[-1] for n in grouped} == {width}
    states = [torch.zeros(s.shape) for s in pre.states]

    def call(low, ids: torch.Tensor, start: int) -> torch.Tensor:
        nonlocal states
        pos = torch.arange(start, start + ids.shape[1], dtype=torch.int32)[None]
        with torch.no_grad():
            out = list(
                low.graph_module(ids.to(torch.int32), pos, context_mask(pos, context), *states)
            )
        k = len(out) - len(states)
        states = out[k:]
        return low.logits(out[:k])

    ids = _ids(18, seed=5)
    got = [call(pre, ids[:, :8], 0), call(pre, ids[:, 8:16], 8)]
    got += [call(dec, ids[:, t : t + 1], t) for t in (16, 17)]
    cache = transformers.DynamicCache(config=hybrid.config)
    ref = []
    with torch.no_grad():
        for a, b in ((0, 8), (8, 16), (16, 17), (17, 18)):
            ref.append(hybrid(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits)
    got_all, ref_all = torch.cat(got, 1), torch.cat(ref, 1)
    assert (got_all - ref_all).abs().max().item() < 1e-4 * ref_all.abs().max().item()


# -- unflatten_rows (the gated norm's (tokens x heads) rows) ------------------------------------


@FEW
@given(
    seq=st.integers(2, 6),  # one token or one head: rows that mix nothing, left as they are
    heads=st.integers(2, 4),
    dv=st.integers(1, 12),
    mean=st.sampled_from([0.0, 20.0]),
    seed=seeds,
)
def test_unflatten_rows_gated_norm(seq: int, heads: int, dv: int, mean: float, seed: int) -> None:
    """Qwen3_5GatedDeltaNet's output path, verbatim: o and z flattened into (S*H, dv) rows,
    the gated norm, back to (1, S, H*dv). After the norm rewrite the rows stay unflattened."""
    torch.manual_seed(seed)
    norm = qwen35.Qwen3_5RMSNormGated(dv, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)

    class Out(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm

        def forward(self, o, z):
            rows = self.norm(o.reshape(-1, dv), z.reshape(-1, dv))
            return rows.reshape(1, seq, -1) * 2.0

    o, z = randn((1, seq, heads, dv), seed, mean=mean), randn((1, seq, heads * dv), seed + 1)
    gm = chain(
        clean(Out(), o, z),
        fold_constants.fold_constants,
        rms_norm_to_layer_norm.rms_norm_to_layer_norm,
    )
    res = apply(unflatten_rows.unflatten_rows, gm)
    after = res.graph_module
    assert res.modified and unflatten_rows.postcondition(after) == []
    ranks = {n.meta["val"].dim() for n in after.graph.nodes if n.op == "call_function"}
    assert 2 not in ranks, "a value is still (tokens x heads) rows"
    assert_same(run(after, o, z), run(gm, o, z))
    assert_idempotent(unflatten_rows.unflatten_rows, after)


def test_unflatten_rows_leaves_ops_mixing_rows() -> None:
    def mixing(o):
        rows = o.reshape(-1, 4)
        return (rows * torch.softmax(rows, dim=0)).reshape(1, 3, 8)

    def one_token(o):  # decode: (1, 1, H, D) -> (H, D) merges no two axes
        return (torch.sigmoid(o.reshape(-1, 4)) * 3.0).reshape(1, 1, 8)

    for fn, o in ((mixing, randn((1, 3, 2, 4), 0)), (one_token, randn((1, 1, 2, 4), 0))):
        gm = clean(Fn(fn), o)
        res = apply(unflatten_rows.unflatten_rows, gm)
        assert not res.modified and res.graph_module.code == gm.code
        assert unflatten_rows.postcondition(res.graph_module) == []
