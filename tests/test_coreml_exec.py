"""The reference executor (targets/coreml_exec.py) against coremltools' documented semantics.

Each op test builds a small MIL program with the builder (several cases of one op family as
the outputs of one program, to convert once), converts and saves it as anefx does, loads the
saved package with the executor and runs it. The oracle is coremltools' own ``value_inference``
(the same op built on const inputs; its ``.val``) where the op has one, else a numpy / torch
reference written from the op's documentation. Oracles get the fp16 inputs widened to float32
(float64 where said) and their result is rounded to fp16 once.

Tolerances: the executor computes every fp16 op in float32 and rounds once. For add, sub, mul,
real_div, comparisons, casts and data movement that is exactly the fp16 result: equality is
required. For a transcendental op the float32 value is within an fp32 ulp or two of the exact
one, so after rounding the two differ by at most one fp16 ulp (plus, for gelu, the fp32
cancellation in 1 + erf / 1 + tanh at negative x). For a sum of K products (matmul, conv) the
float32 accumulation error is at most K * 2^-24 * sum|x*y|, added to that one ulp; layer_norm
adds the float32 cancellation error of x - mean.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from anefx.errors import AnefxInputError
from anefx.targets.coreml import convert_program
from anefx.targets.coreml_exec import IMPLEMENTED_OPS, ExecError, load_package

os.environ.setdefault("TQDM_DISABLE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types
    from coremltools.converters.mil.mil import Program as MilProgram
    from coremltools.converters.mil.mil.types.type_mapping import numpy_type_to_builtin_type

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# helpers


def build(
    tmp_path: Path,
    inputs: dict[str, np.ndarray],
    body: Callable[[dict], object],
    states: dict[str, tuple[tuple[int, ...], object]] | None = None,
):
    """A saved one-function iOS18 program: runtime inputs shaped like INPUTS, BODY's outputs
    named out0, out1, ... (converted as anefx's emitter converts: fp16, no graph passes)."""
    placeholders = {
        k: mb.placeholder(shape=v.shape, dtype=numpy_type_to_builtin_type(v.dtype.type))
        for k, v in inputs.items()
    }
    for k, (shape, dtype) in (states or {}).items():
        placeholders[k] = mb.state_tensor_placeholder(shape=shape, dtype=dtype)
    func = Function(placeholders, opset_version=ct.target.iOS18)
    with func:
        out = body(func.inputs)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        func.set_outputs([mb.identity(x=o, name=f"out{i}") for i, o in enumerate(outs)])
    prog = MilProgram()
    prog.add_function("main", func)
    model = convert_program(prog)
    path = tmp_path / f"m{len(list(tmp_path.glob('*.mlpackage')))}.mlpackage"
    model.save(str(path))
    return load_package(path)


Case = tuple[str, dict[str, np.ndarray], dict]  # op, runtime inputs, const parameters


def run_cases(tmp_path: Path, cases: list[Case]):
    """Every case as one output of one program: (program, the outputs in case order)."""
    inputs = {f"c{i}_{k}": v for i, (_, ins, _) in enumerate(cases) for k, v in ins.items()}

    def body(v):
        return [
            getattr(mb, op)(**{k: v[f"c{i}_{k}"] for k in ins}, **params, name=f"case{i}")
            for i, (op, ins, params) in enumerate(cases)
        ]

    prog = build(tmp_path, inputs, body)
    outs, _ = prog.run("main", inputs)
    return prog, [outs[f"out{i}"] for i in range(len(cases))]


def declared(prog, op_name: str) -> np.dtype:
    """The dtype the program declares for an op's result."""
    (op,) = [op for op in prog.functions["main"].ops if op.name == op_name]
    return op.outputs[0][2]


def oracle(op: str, inputs: dict[str, np.ndarray], wide=np.float32, **params):
    """coremltools' value_inference of OP on const inputs, fp16 arrays and scalars widened."""

    def widen(v):
        is_fp16 = isinstance(v, (np.ndarray, np.generic)) and v.dtype == np.float16
        return v.astype(wide) if is_fp16 else v

    consts = {k: widen(v) for k, v in {**inputs, **params}.items()}
    with Function({}, opset_version=ct.target.iOS18):
        val = getattr(mb, op)(**consts).val
    assert val is not None, f"{op} has no value_inference"
    return np.asarray(val)


def fp16(*shape, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float16)


def assert_fp16(got: np.ndarray, ref, ulps: int = 0, atol=0.0, what: str = "") -> None:
    """GOT is float16 and equals REF rounded to fp16, within ULPS fp16 ulps + ATOL."""
    assert got.dtype == np.float16, (what, got.dtype)
    ref16 = np.asarray(ref, np.float64).astype(np.float16)
    assert got.shape == ref16.shape, (what, got.shape, ref16.shape)
    if ulps == 0 and np.all(np.asarray(atol) == 0):
        np.testing.assert_array_equal(got, ref16, err_msg=what)
        return
    g, r = got.astype(np.float64), ref16.astype(np.float64)
    with np.errstate(over="ignore"):  # the spacing at 65504 is inf
        allowed = ulps * np.spacing(np.abs(ref16)).astype(np.float64) + atol
    ok = (g == r) | (np.abs(g - r) <= allowed)
    assert ok.all(), f"{what}: excess {np.max(np.abs(g - r) - allowed)} at {np.argwhere(~ok)[:3]}"


# ---------------------------------------------------------------------------------------------
# elementwise


def test_binary_fp16_is_exact_fp16_arithmetic(tmp_path: Path) -> None:
    ieee = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide}
    shapes = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (3, 1)), ((1, 4), (5, 1, 1)), ((3,), (1,))]
    cases, refs = [], []
    for op in ieee:
        for xs, ys in shapes:
            x, y = fp16(*xs, scale=3), fp16(*ys, scale=3)
            if op == "real_div":
                y = np.where(np.abs(y) < 0.1, np.float16(0.5), y)
            cases.append((op, {"x": x, "y": y}, {}))
            refs.append((oracle(op, {"x": x, "y": y}), ieee[op](x, y)))
        # a scalar const operand, as the emitter writes -x and 1 - x
        x = fp16(2, 5)
        cases.append((op, {"x": x}, {"y": np.float16(-1.5)}))
        refs.append((oracle(op, {"x": x}, y=np.float16(-1.5)), ieee[op](x, np.float16(-1.5))))
    _, got = run_cases(tmp_path, cases)
    for (op, ins, _), g, (ref, fp16_arith) in zip(cases, got, refs, strict=True):
        what = f"{op} {[v.shape for v in ins.values()]}"
        assert_fp16(g, ref, what=what)
        np.testing.assert_array_equal(g, fp16_arith, err_msg=what)  # IEEE fp16 arithmetic


def test_comparisons_give_bool(tmp_path: Path) -> None:
    cases = []
    for op in ["equal", "greater", "less", "greater_equal", "less_equal"]:
        for dtype in [np.float16, np.float32, np.int32]:
            x = RNG.integers(-3, 3, (2, 5)).astype(dtype)
            y = RNG.integers(-3, 3, (5,)).astype(dtype)
            cases.append((op, {"x": x, "y": y}, {}))
    prog, got = run_cases(tmp_path, cases)
    for i, ((op, ins, _), g) in enumerate(zip(cases, got, strict=True)):
        # a Core ML output cannot be bool: coremltools casts it; the op itself gives bool
        assert declared(prog, f"case{i}") == np.bool_
        np.testing.assert_array_equal(g, oracle(op, ins), err_msg=f"{op} {ins['x'].dtype}")


def test_int32_arithmetic(tmp_path: Path) -> None:
    cases = []
    for op in ["add", "sub", "mul"]:
        x = RNG.integers(-1000, 1000, (3, 4)).astype(np.int32)
        y = RNG.integers(-1000, 1000, (4,)).astype(np.int32)
        cases.append((op, {"x": x, "y": y}, {}))
    _, got = run_cases(tmp_path, cases)
    for (op, ins, _), g in zip(cases, got, strict=True):
        assert g.dtype == np.int32
        np.testing.assert_array_equal(g, oracle(op, ins), err_msg=op)


def test_fp32_inputs_compute_in_fp32(tmp_path: Path) -> None:
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    y = RNG.standard_normal((8, 3)).astype(np.float32)
    _, (got, s) = run_cases(
        tmp_path, [("matmul", {"x": x, "y": y}, {}), ("add", {"x": x}, {"y": np.float32(1e-4)})]
    )
    assert got.dtype == np.float32 and s.dtype == np.float32
    np.testing.assert_allclose(got, x.astype(np.float64) @ y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s, x + np.float32(1e-4))


def test_fp16_rounding_and_overflow(tmp_path: Path) -> None:
    # 1 + 2^-11 is halfway between two fp16 numbers: ties to even (1.0); 300 * 300 overflows
    x = np.array([1.0, 1.0, 300.0, -300.0], np.float16)
    y = np.array([2.0**-11, 3 * 2.0**-11, 300.0, 300.0], np.float16)
    _, (total, prod) = run_cases(
        tmp_path, [("add", {"x": x, "y": y}, {}), ("mul", {"x": x, "y": y}, {})]
    )
    np.testing.assert_array_equal(total[:2], np.array([1.0, 1.0 + 2.0**-9], np.float16))
    assert prod.dtype == np.float16 and np.isposinf(prod[2]) and np.isneginf(prod[3])


def test_precision_model_is_fp32_inside_an_op(tmp_path: Path) -> None:
    # x^2 overflows fp16 (300^2 > 65504); layer_norm's variance, computed in fp32, does not
    x = (fp16(1, 64) * 100 + 300).astype(np.float16)
    _, (got,) = run_cases(tmp_path, [("layer_norm", {"x": x}, {"axes": [1]})])
    assert np.isfinite(got).all()
    assert_fp16(got, oracle("layer_norm", {"x": x}, wide=np.float64, axes=[1]), 1, atol=1e-5)


def test_activations(tmp_path: Path) -> None:
    cases: list[Case] = []
    for shape in [(7,), (2, 3, 5), (1, 4, 1, 16)]:
        for op in ["relu", "sigmoid", "tanh", "silu", "exp", "softplus"]:
            cases.append((op, {"x": fp16(*shape, scale=4)}, {}))
        for mode in ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"]:
            cases.append(("gelu", {"x": fp16(*shape, scale=3)}, {"mode": mode}))
    cases.append(("silu", {"x": np.array([-20, -10, 10, 20, 0, 65504], np.float16)}, {}))
    _, got = run_cases(tmp_path, cases)
    for (op, ins, params), g in zip(cases, got, strict=True):
        x = ins["x"].astype(np.float64)
        if op == "silu":  # no value_inference: x * sigmoid(x), documented in activation.py
            ref = x / (1 + np.exp(-x))
        else:
            ref = oracle(op, ins, wide=np.float64, **params)
        # gelu: 1 + erf(..) / 1 + tanh(..) cancels at negative x: |x| / 2 fp32 ulps of 1
        atol = np.abs(x) * 2.0**-23 if op == "gelu" else 0.0
        assert_fp16(g, ref, 0 if op == "relu" else 1, atol=atol, what=f"{op} {params}")


def test_softmax(tmp_path: Path) -> None:
    masked = fp16(2, 8)
    masked[:, 5:] = np.finfo(np.float16).min  # the causal mask's value
    cases = [("softmax", {"x": fp16(4, 6, 8, scale=5)}, {"axis": a}) for a in (-1, 0, 1)]
    cases.append(("softmax", {"x": masked}, {}))
    _, got = run_cases(tmp_path, cases)
    for (op, ins, params), g in zip(cases, got, strict=True):
        assert_fp16(g, oracle(op, ins, wide=np.float64, **params), 1, what=str(params))
    assert (got[-1][:, 5:] == 0).all()


def test_layer_norm(tmp_path: Path) -> None:
    cases: list[Case] = []
    for shape, axes, affine in [
        ((2, 16), [1], True),
        ((1, 8, 1, 5), [1], True),  # the emitter's RMSNorm: channels of (B, C, 1, S)
        ((2, 3, 4), [-2, -1], True),
        ((3, 8), [0, 1], False),
    ]:
        x = fp16(*shape, scale=2)
        params = {"axes": axes, "epsilon": np.float16(1e-5)}
        if affine:
            norm = [shape[a] for a in sorted(a % len(shape) for a in axes)]
            params["gamma"], params["beta"] = fp16(*norm), fp16(*norm)
        cases.append(("layer_norm", {"x": x}, params))
    _, got = run_cases(tmp_path, cases)
    for (op, ins, params), g in zip(cases, got, strict=True):
        ref = oracle(op, ins, wide=np.float64, **params)
        # fp32 cancellation in x - mean: a few 2^-24 * max|x| / std, well under 1e-5 here
        assert_fp16(g, ref, 1, atol=1e-5, what=str(params["axes"]))


# ---------------------------------------------------------------------------------------------
# matmul and conv


def _dot_tol(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The float32 accumulation bound of x @ y: K * 2^-24 * (|x| @ |y|)."""
    k = x.shape[-1]
    return k * 2.0**-24 * np.matmul(np.abs(x.astype(np.float64)), np.abs(y.astype(np.float64)))


def test_matmul_broadcast_transposes_and_const_weights(tmp_path: Path) -> None:
    cases: list[Case] = []
    for xs, ys, tx, ty in [
        ((4, 8), (8, 5), False, False),
        ((2, 1, 4, 8), (3, 8, 6), False, False),  # batch dims broadcast
        ((2, 8, 4), (2, 6, 8), True, True),
        ((1, 3, 5, 16), (1, 1, 7, 16), False, True),  # attention scores, q @ k^T
        ((8,), (8, 3), False, False),  # rank-1 x: promoted to a row, then dropped
    ]:
        cases.append(
            ("matmul", {"x": fp16(*xs), "y": fp16(*ys)}, {"transpose_x": tx, "transpose_y": ty})
        )
    cases.append(("matmul", {"x": fp16(1, 4, 16)}, {"y": fp16(16, 32)}))  # an fp16 const
    _, got = run_cases(tmp_path, cases)
    for (op, ins, params), g in zip(cases, got, strict=True):
        x, y = ins["x"], ins.get("y", params.get("y"))
        ref = oracle(op, ins, wide=np.float64, **params)
        xt = np.swapaxes(x, -1, -2) if params.get("transpose_x") else x
        yt = np.swapaxes(y, -1, -2) if params.get("transpose_y") else y
        xt = xt[None] if xt.ndim == 1 else xt
        tol = _dot_tol(xt, yt).reshape(ref.shape)
        assert_fp16(g, ref, 1, atol=tol, what=f"{x.shape} @ {y.shape}")


def _conv_ref(x, w, b, strides, pad, dilations, groups) -> np.ndarray:
    """torch's conv2d in float64 (cross-correlation, as MIL's conv documents) after padding."""
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])])
    return torch.nn.functional.conv2d(
        torch.from_numpy(xp),
        torch.from_numpy(w.astype(np.float64)),
        None if b is None else torch.from_numpy(b.astype(np.float64)),
        stride=strides,
        dilation=dilations,
        groups=groups,
    ).numpy()


def test_conv(tmp_path: Path) -> None:
    # conv has no value_inference: torch's conv2d is the reference
    configs = [
        ((1, 16, 1, 8), (24, 16, 1, 1), [1, 1], None, [1, 1], 1, True),  # the emitter's 1x1
        ((2, 8, 3, 5), (4, 8, 1, 1), [1, 1], None, [1, 1], 1, False),
        ((1, 4, 9, 11), (6, 4, 3, 3), [2, 1], [1, 2, 0, 1], [1, 2], 1, True),
        ((1, 6, 7, 7), (4, 3, 2, 3), [1, 2], None, [2, 1], 2, True),
    ]
    cases: list[Case] = []
    for xs, ws, strides, pad, dilations, groups, bias in configs:
        params = {"weight": fp16(*ws, scale=0.3), "strides": strides, "dilations": dilations}
        params.update(groups=groups, pad_type="custom" if pad else "valid")
        if pad:
            params["pad"] = pad
        if bias:
            params["bias"] = fp16(ws[0])
        cases.append(("conv", {"x": fp16(*xs)}, params))
    _, got = run_cases(tmp_path, cases)
    for (_, ins, p), g in zip(cases, got, strict=True):
        x, w, pad = ins["x"], p["weight"], p.get("pad", [0, 0, 0, 0])
        args = (p["strides"], pad, p["dilations"], p["groups"])
        ref = _conv_ref(x, w, p.get("bias"), *args)
        k = w.shape[1] * w.shape[2] * w.shape[3]
        tol = (k + 1) * 2.0**-24 * (_conv_ref(np.abs(x), np.abs(w), None, *args) + 1)
        assert_fp16(g, ref, 1, atol=tol, what=f"conv {x.shape} * {w.shape}")


def test_conv_same_padding_is_refused_not_guessed(tmp_path: Path) -> None:
    x, w = fp16(1, 2, 4, 4), fp16(2, 2, 3, 3)
    prog = build(
        tmp_path, {"x": x}, lambda v: mb.conv(x=v["x"], weight=w, pad_type="same", name="c")
    )
    with pytest.raises(ExecError, match=r"conv c in function main: pad_type 'same'"):
        prog.run("main", {"x": x})


# ---------------------------------------------------------------------------------------------
# data movement, casts, reductions

MOVES = [
    ("reshape", (2, 3, 4), {"shape": [4, -1, 2]}),
    ("reshape", (2, 3, 4), {"shape": [0, 0, 4, 3]}),  # iOS17: 0s match x from the right
    ("reshape", (6, 4), {"shape": [1, 0, -1, 0]}),
    ("transpose", (2, 3, 4, 5), {"perm": [0, 3, 1, 2]}),
    ("tile", (2, 1, 3), {"reps": [1, 4, 2]}),
    ("slice_by_index", (4, 6, 5), {"begin": [1, 0, 4], "end": [3, 6, 0], "stride": [1, 2, -2]}),
    ("slice_by_index", (4, 6), {"begin": [-3, 2], "end": [0, 5], "end_mask": [True, False]}),
    (
        "slice_by_index",
        (4, 6, 3),
        {
            "begin": [2, 1, 0],
            "end": [0, 5, 3],
            "begin_mask": [False, True, False],
            "squeeze_mask": [True, False, False],
        },
    ),
    ("gather", (10, 4), {"indices": np.array([[3, 0], [9, 3]], np.int32), "axis": 0}),
    ("gather", (2, 10, 4), {"indices": np.array([7, 1, 1], np.int32), "axis": -2}),
    ("reduce_sum", (3, 4, 5), {"axes": [1], "keep_dims": True}),
    ("reduce_sum", (3, 4, 5), {"axes": [0, -1], "keep_dims": False}),
    ("reduce_max", (3, 4, 5), {"axes": [2], "keep_dims": False}),
    ("reduce_max", (3, 4, 5), {}),
    ("reduce_argmax", (3, 4, 5), {"axis": 1, "keep_dims": True}),
    ("reduce_argmax", (3, 4, 5), {"axis": -1}),
]


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_data_movement_and_reductions(tmp_path: Path, dtype) -> None:
    cases: list[Case] = []
    for op, shape, params in MOVES:
        x = fp16(*shape, scale=8) if dtype == np.float16 else RNG.integers(-50, 50, shape)
        cases.append((op, {"x": x.astype(dtype)}, params))
    _, got = run_cases(tmp_path, cases)
    for (op, ins, params), g in zip(cases, got, strict=True):
        ref = oracle(op, ins, **params)
        if op == "reduce_sum" and dtype == np.float16:
            assert_fp16(g, ref, 1, what=f"{op} {params}")  # a short fp32 sum, one rounding
            continue
        expect = np.int32 if op == "reduce_argmax" else dtype
        assert g.dtype == expect, (op, params)
        np.testing.assert_array_equal(g, ref.astype(expect), err_msg=f"{op} {params}")


def _interleaved(values: list[np.ndarray], axis: int) -> np.ndarray:
    """concat's documented interleave: output[i::n] along AXIS = values[i]."""
    shape = list(values[0].shape)
    n, axis = len(values), axis % len(shape)
    shape[axis] *= n
    out = np.empty(shape, values[0].dtype)
    for i, v in enumerate(values):
        index = [slice(None)] * len(shape)
        index[axis] = slice(i, None, n)
        out[tuple(index)] = v
    return out


def test_concat(tmp_path: Path) -> None:
    a, b, c = fp16(2, 3, 4), fp16(2, 3, 4), fp16(2, 3, 4)
    doc = (
        np.array([[1, 2], [3, 4], [5, 6]], np.float16),
        np.array([[7, 8], [9, 10], [11, 12]], np.float16),
    )
    combos = [(axis, inter) for axis in (0, 1, -1) for inter in (False, True)]

    def body(v):
        outs = [
            mb.concat(values=[v["a"], v["b"], c], axis=axis, interleave=inter)
            for axis, inter in combos
        ]
        return outs + [mb.concat(values=[v["d0"], v["d1"]], axis=0, interleave=True)]

    prog = build(tmp_path, {"a": a, "b": b, "d0": doc[0], "d1": doc[1]}, body)
    outs, _ = prog.run("main", {"a": a, "b": b, "d0": doc[0], "d1": doc[1]})
    for i, (axis, inter) in enumerate(combos):
        if inter:  # coremltools' value_inference ignores interleave: the documented rule
            ref = _interleaved([a, b, c], axis)
        else:
            with Function({}, opset_version=ct.target.iOS18):
                ref = mb.concat(values=[a, b, c], axis=axis).val
        assert outs[f"out{i}"].dtype == np.float16
        np.testing.assert_array_equal(outs[f"out{i}"], ref, err_msg=f"axis {axis} {inter}")
    # the example in concat's docstring
    expect = [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]]
    np.testing.assert_array_equal(outs[f"out{len(combos)}"], np.array(expect, np.float16))


def test_cast(tmp_path: Path) -> None:
    cases = [
        (np.float16, "int32", [-2.75, -0.5, 0.0, 0.5, 1.99, 300.0]),  # truncation toward zero
        (np.float16, "bool", [-1.0, 0.0, 0.25, 2.0]),
        (np.int32, "fp16", [-7, 0, 2049, 70000]),  # 2049 ties to 2048; 70000 -> inf
        (np.int32, "bool", [0, 3, -1]),
        (np.float32, "fp16", [1.0 + 2.0**-11, 1e-8, 65520.0]),  # ties to even; 0; inf
        (np.float32, "int32", [-1e3 - 0.5, 7.9]),
    ]
    cases = [("cast", {"x": np.array(vals, src)}, {"dtype": target}) for src, target, vals in cases]
    prog, got = run_cases(tmp_path, cases)
    for i, ((op, ins, params), g) in enumerate(zip(cases, got, strict=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = oracle(op, ins, wide=np.float16, **params)
        assert declared(prog, f"case{i}") == ref.dtype  # a bool output is cast by coremltools
        np.testing.assert_array_equal(g, ref, err_msg=f"{ins['x'].dtype} -> {params['dtype']}")


def test_gather_out_of_bounds_is_an_error(tmp_path: Path) -> None:
    x = fp16(5, 3)
    prog = build(
        tmp_path,
        {"x": x, "i": np.zeros(2, np.int32)},
        lambda v: mb.gather(x=v["x"], indices=v["i"], axis=0, name="g"),
    )
    outs, _ = prog.run("main", {"x": x, "i": np.array([4, 0], np.int32)})
    np.testing.assert_array_equal(outs["out0"], x[[4, 0]])
    # iOS17+: undefined behaviour for an index outside [0, 5), a negative one included
    for bad in (5, -1):
        with pytest.raises(ExecError, match=rf"gather g in function main: index {bad} out of"):
            prog.run("main", {"x": x, "i": np.array([bad, 0], np.int32)})


def test_identity_and_runtime_shape_inputs(tmp_path: Path) -> None:
    x = fp16(2, 6)
    shape = np.array([3, 4], np.int32)
    prog = build(
        tmp_path,
        {"x": x, "s": shape},
        lambda v: [mb.identity(x=v["x"]), mb.reshape(x=v["x"], shape=v["s"])],
    )
    outs, _ = prog.run("main", {"x": x, "s": shape})
    np.testing.assert_array_equal(outs["out0"], x)
    np.testing.assert_array_equal(outs["out1"], x.reshape(3, 4))


# ---------------------------------------------------------------------------------------------
# palettized and quantized weights (iOS18 constexpr ops)


def _materialized(op: str, **params) -> np.ndarray:
    """coremltools' own decompression of a constexpr op (materialized_val_inference)."""
    with Function({}, opset_version=ct.target.iOS18):
        return getattr(mb, op)(**params).op.materialized_val_inference()


def _constexpr_program(tmp_path: Path, op: str, param_sets: list[dict]) -> list[np.ndarray]:
    """x + the decompressed weight, for each parameter set (x = 0: the weight itself)."""
    dense = [_materialized(op, **p) for p in param_sets]
    inputs = {f"x{i}": np.zeros(d.shape, np.float16) for i, d in enumerate(dense)}
    prog = build(
        tmp_path,
        inputs,
        lambda v: [mb.add(x=v[f"x{i}"], y=getattr(mb, op)(**p)) for i, p in enumerate(param_sets)],
    )
    outs, _ = prog.run("main", inputs)
    return [(outs[f"out{i}"], d) for i, d in enumerate(dense)]


def test_constexpr_lut_to_dense(tmp_path: Path) -> None:
    param_sets = []
    for indices_shape, lut_shape, vector_axis, nbits in [
        ((8, 64), (1, 1, 16, 1), None, 4),  # per tensor
        ((8, 64), (2, 1, 16, 1), None, 4),  # a table per half of the rows
        ((6, 4, 2), (3, 1, 1, 4, 1), None, 2),
        ((4, 6), (1, 1, 2, 3), 0, 1),  # vector palettization along axis 0
        ((4, 6), (2, 1, 4, 2), -1, 2),
        ((16, 4), (1, 1, 256, 1), None, 8),
    ]:
        np_dtype = np.uint8 if nbits == 8 else getattr(types, f"np_uint{nbits}_dtype")
        params = {
            "indices": RNG.integers(0, 2**nbits, indices_shape).astype(np_dtype),
            "lut": fp16(*lut_shape),
        }
        if vector_axis is not None:
            params["vector_axis"] = np.int32(vector_axis)
        param_sets.append(params)
    for got, dense in _constexpr_program(tmp_path, "constexpr_lut_to_dense", param_sets):
        assert_fp16(got, dense)


def test_constexpr_blockwise_shift_scale(tmp_path: Path) -> None:
    ranges = {"int8": (-128, 128), "uint8": (0, 256), "int4": (-8, 8), "uint4": (0, 16)}
    param_sets = []
    for data_shape, scale_shape, src, offset in [
        ((8, 64), (8, 4), "int8", True),
        ((8, 64), (8, 1), "uint8", True),
        ((4, 32), (2, 8), "int4", False),
        ((4, 32), (4, 2), "uint4", True),
        ((6, 10), (3, 5), "fp16", True),
    ]:
        if src == "fp16":
            data, off = fp16(*data_shape), fp16(*scale_shape)
        else:
            np_dtype = getattr(types, f"np_{src}_dtype", None) or np.dtype(src).type
            lo, hi = ranges[src]
            data = RNG.integers(lo, hi, data_shape).astype(np_dtype)
            off = RNG.integers(lo, hi, scale_shape).astype(np_dtype)
        params = {"data": data, "scale": fp16(*scale_shape, scale=0.05)}
        if offset:
            params["offset"] = off
        param_sets.append(params)
    results = _constexpr_program(tmp_path, "constexpr_blockwise_shift_scale", param_sets)
    for (got, dense), params in zip(results, param_sets, strict=True):
        # integer data - integer offset is exact, then one product: the same fp16 value. An fp16
        # offset is subtracted in fp16 by coremltools, in fp32 here: one rounding apart
        data = params["data"]
        if data.dtype != np.float16:
            assert_fp16(got, dense)
            continue
        blocks = [d // s for d, s in zip(data.shape, params["scale"].shape, strict=True)]
        scale, off = (np.kron(params[k], np.ones(blocks)) for k in ("scale", "offset"))
        atol = np.abs(scale * (data - off)) * 2.0**-11  # coremltools' fp16 rounding of data - off
        assert_fp16(got, dense, 1, atol=atol)


# ---------------------------------------------------------------------------------------------
# states, errors, inputs


@pytest.mark.parametrize("use_update_output", [False, True])
def test_state_is_threaded_through_calls(tmp_path: Path, use_update_output: bool) -> None:
    def body(v):
        total = mb.add(x=mb.read_state(input=v["acc"]), y=v["x"])
        written = mb.coreml_update_state(state=v["acc"], value=total)
        return mb.mul(x=written if use_update_output else total, y=np.float16(2))

    prog = build(tmp_path, {"x": fp16(2, 3)}, body, states={"acc": ((2, 3), types.fp16)})
    fn = prog.functions["main"]
    assert [(s.name, s.shape, s.dtype) for s in fn.states] == [("acc", (2, 3), np.float16)]
    assert {"read_state", "write_state"} <= {op.type for op in fn.ops}  # as serialized
    x1, x2 = fp16(2, 3), fp16(2, 3)
    out1, st1 = prog.run("main", {"x": x1})  # no states given: zeros
    np.testing.assert_array_equal(st1["acc"], x1)
    np.testing.assert_array_equal(out1["out0"], x1 * np.float16(2))
    given = {"acc": st1["acc"].copy()}
    out2, st2 = prog.run("main", {"x": x2}, given)
    np.testing.assert_array_equal(given["acc"], st1["acc"])  # the caller's array is untouched
    np.testing.assert_array_equal(st2["acc"], x1 + x2)
    np.testing.assert_array_equal(out2["out0"], (x1 + x2) * np.float16(2))
    # a state persists only through what run returns: a fresh zero state starts over
    out1b, _ = prog.run("main", {"x": x1}, prog.zero_states("main"))
    np.testing.assert_array_equal(out1b["out0"], out1["out0"])


@pytest.mark.parametrize("op", ["sin", "topk"])
def test_an_unimplemented_op_is_named(tmp_path: Path, op: str) -> None:
    assert op not in IMPLEMENTED_OPS
    x = fp16(2, 8)
    make = {
        "sin": lambda v: mb.sin(x=mb.add(x=v["x"], y=np.float16(1)), name="my_sin"),
        "topk": lambda v: mb.topk(x=v["x"], k=2, name="my_topk")[0],
    }[op]
    prog = build(tmp_path, {"x": x}, make)
    with pytest.raises(ExecError, match=rf"op type '{op}' \(my_{op} in function main\)"):
        prog.run("main", {"x": x})


def test_inputs_are_checked_and_cast(tmp_path: Path) -> None:
    x = fp16(2, 3)
    i = np.arange(3, dtype=np.int32)
    prog = build(tmp_path, {"x": x, "i": i}, lambda v: mb.gather(x=v["x"], indices=v["i"], axis=1))
    fn = prog.functions["main"]
    assert [(t.name, t.shape, t.dtype) for t in fn.inputs] == [
        ("x", (2, 3), np.float16),
        ("i", (3,), np.int32),
    ]
    assert [(t.name, t.shape, t.dtype) for t in fn.outputs] == [("out0", (2, 3), np.float16)]
    outs, states = prog.run("main", {"x": x.astype(np.float32), "i": i.astype(np.int64)})
    np.testing.assert_array_equal(outs["out0"], x)
    assert states == {}
    with pytest.raises(AnefxInputError, match="input i is missing"):
        prog.run("main", {"x": x})
    with pytest.raises(AnefxInputError, match="input y is not declared"):
        prog.run("main", {"x": x, "i": i, "y": i})
    with pytest.raises(AnefxInputError, match=r"input x: shape \(3, 2\)"):
        prog.run("main", {"x": x.T, "i": i})
    with pytest.raises(AnefxInputError, match="do not fit"):
        prog.run("main", {"x": x, "i": i.astype(np.int64) + 2**40})
    with pytest.raises(AnefxInputError, match="no function 'decode'"):
        prog.run("decode", {"x": x, "i": i})


# ---------------------------------------------------------------------------------------------
# anefx packages end to end


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    """Apple's parity measure: 20 log10(max|ref| / RMSE)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    rmse = np.sqrt(np.mean((ref - out) ** 2))
    return float("inf") if rmse == 0 else float(20 * np.log10(np.abs(ref).max() / rmse))


def _logits(outs: dict, low) -> np.ndarray:
    """(1, S, V) logits of LOW's program from its outputs by name, joined as LOW joins its own."""
    values = [torch.from_numpy(np.asarray(outs[o.name], np.float32)) for o in low.signature.outputs]
    return low.logits(values).numpy()


def test_anefx_package_matches_transformers_and_the_lowered_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anefx
    from anefx.models.capture import causal_mask
    from anefx.models.load import load_model

    seq, n = 16, 13
    low = anefx.lower("preset:qwen3-tiny", seq_len=seq, dtype=torch.float16)
    anefx.emit(low, tmp_path / "m.mlpackage")
    prog = load_package(tmp_path / "m.mlpackage")
    assert list(prog.functions) == ["main"]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, low.config.vocab_size, (1, n), generator=gen)
    # the inputs low.run builds: ids padded at the end, positions 0..S-1, the causal mask
    feeds = {
        "input_ids": torch.nn.functional.pad(ids, (0, seq - n)).to(torch.int32).numpy(),
        "position_ids": np.arange(seq, dtype=np.int32)[None],
        "causal_mask": causal_mask(seq, torch.float16).numpy(),
    }
    # what keeps a call fast, counted rather than timed: every weight is read from the blob
    # once, on the first call, and the arrays are reused by every later call
    reads: Counter = Counter()
    read_blob = prog._read_blob

    def counting(key: tuple) -> np.ndarray:
        reads[key] += 1
        return read_blob(key)

    monkeypatch.setattr(prog, "_read_blob", counting)
    outs, states = prog.run("main", feeds)
    assert states == {}
    blobs = {key for _, key, make in prog.functions["main"].consts if isinstance(make, tuple)}
    assert blobs and set(reads) == blobs and set(reads.values()) == {1}, reads
    again, _ = prog.run("main", feeds)
    assert sum(reads.values()) == len(blobs)  # the second call read nothing
    assert again.keys() == outs.keys()
    for name, value in outs.items():
        np.testing.assert_array_equal(again[name], value)
    got = _logits(outs, low)[:, :n]
    lowered = low.run(ids).float().numpy()
    hf = load_model("preset:qwen3-tiny", dtype=torch.float32).model
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits.numpy()
    assert psnr(ref, got) >= 60.0, psnr(ref, got)
    assert psnr(lowered, got) >= 60.0, psnr(lowered, got)


def test_stateful_package_runs_like_the_lowered_graphs(tmp_path: Path) -> None:
    """prefill + decode with the KV cache as state, driven as generation.Session drives the
    lowered graphs (positions, padding, context mask), states threaded by the caller: the
    same logits at every call and the same cache at the end."""
    from anefx.core.signature import pack_states
    from anefx.generation import lower_decoder
    from anefx.models.capture import context_mask
    from anefx.targets.coreml import emit_functions

    batch, context = 8, 32
    dec = lower_decoder("preset:qwen3-tiny", batch=batch, context=context)
    emit_functions(
        {"prefill": dec.prefill, "decode": dec.decode}, tmp_path / "s.mlpackage", default="decode"
    )
    prog = load_package(tmp_path / "s.mlpackage")
    assert sorted(prog.functions) == ["decode", "prefill"] and prog.default_function == "decode"
    # the layers' K and V caches are the rows of the program's one state, in signature order
    (packed,) = pack_states(dec.decode.states)
    for fn in ("prefill", "decode"):
        assert [(s.name, s.shape) for s in prog.functions[fn].states] == [
            (packed.name, packed.shape)
        ]

    ref_states = [torch.zeros(s.shape, dtype=torch.float16) for s in dec.decode.states]
    states = prog.zero_states("decode")
    position = 0
    ids = torch.randint(0, dec.vocab, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = [("prefill", ids[:8]), ("prefill", ids[8:]), ("decode", [5]), ("decode", [7])]
    for fname, chunk in calls:
        low = dec.prefill if fname == "prefill" else dec.decode
        s, k = low.seq_len, len(chunk)
        pos = torch.tensor([list(range(position, position + k)) + [context] * (s - k)])
        inputs = (
            torch.tensor([chunk + [0] * (s - k)], dtype=torch.int32),
            pos.to(torch.int32),
            context_mask(pos, context, torch.float16),
        )
        feeds = dict(zip(("input_ids", "position_ids", "causal_mask"), inputs, strict=True))
        outs, states = prog.run(fname, {n: t.numpy() for n, t in feeds.items()}, states)
        with torch.no_grad():
            ref_out = low.graph_module(*inputs, *ref_states)
        ref_states = list(ref_out[len(ref_out) - len(ref_states) :])
        ref = low.logits(ref_out).float().numpy()[0, :k]
        got = _logits(outs, low)[0, :k]
        position += k
        assert psnr(ref, got) >= 60.0, (fname, psnr(ref, got))
    assert states[packed.name].dtype == np.float16
    for row, ref_state in enumerate(ref_states):
        assert psnr(ref_state.float().numpy(), states[packed.name][row : row + 1]) >= 60.0
    # the two functions share their weights: each is read from the blob once
    pre, de = (prog._consts(prog.functions[f]) for f in ("prefill", "decode"))
    decode_arrays = {id(v) for v in de.values()}
    big = [v for v in pre.values() if getattr(v, "size", 0) > 1000]
    assert big and all(id(v) in decode_arrays for v in big)


def test_slice_update_with_a_runtime_begin_matches_coremltools(tmp_path: Path) -> None:
    """slice_update (the KV cache's row write): x with x[begin:end] = update, begin and end
    read at run time, as coremltools' value_inference computes it; bounds past x are an error
    naming the op, never a clipped write."""
    x = fp16(3, 2, 4, 10)
    update = fp16(1, 2, 4, 3)
    cases = [
        ([1, 0, 0, 7], [2, 2, 4, 10]),  # the last slots
        ([0, 0, 0, 0], [1, 2, 4, 3]),  # the first
        ([2, 0, 0, 4], [3, 2, 4, 7]),
    ]
    for begin, end in cases:
        b, e = np.array(begin, np.int32), np.array(end, np.int32)
        prog, (got,) = run_cases(
            tmp_path, [("slice_update", {"x": x, "update": update, "begin": b, "end": e}, {})]
        )
        want = oracle("slice_update", {"x": x, "update": update, "begin": b, "end": e})
        assert_fp16(got, want, what=str(begin))
    bad = {"x": x, "update": update, "begin": np.array([0, 0, 0, 8], np.int32)}
    bad["end"] = np.array([1, 2, 4, 11], np.int32)
    with pytest.raises(ExecError, match=r"slice_update case0 .*axis 3: \[8:11:1\] is outside"):
        run_cases(tmp_path, [("slice_update", bad, {})])
