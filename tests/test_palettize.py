"""Weight palettization (--lut): the packages, the checker's reading of them, and the tables.

A seeded random qwen3-tiny decoder (prefill + decode with the KV cache as state) is emitted
dense and with 4-, 6- and 8-bit tables for every weight kind. Each package must pass the checker
and `verify` (the executor runs the constexpr_lut_to_dense ops); its decoded weights must be the
tables applied to the indices, each value the table entry nearest to the dense weight's value.
Thresholds were measured on these seeds (4/6/8 bits: logits PSNR 23.3 / 36.3 / 49.4 dB, top-1
agreement 0.94 / 1.0 / 1.0 over 32 steps; dense 69.5 dB) and are set below them with margin.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import anefx
from anefx.core.rules import LUT_BITS
from anefx.generation import lower_decoder
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.coreml import check_package, emit_functions, read_spec
from anefx.targets.coreml_exec import load_package
from anefx.targets.mil_program import check_spec, mil_luts, split_op_name
from anefx.targets.palettize import (
    GROUP_SIZE,
    LUT_KEY,
    MIN_ELEMENTS,
    _distinct_fp16,
    _group_size,
    check_lut,
    kmeans_lut,
    palettize_program,
)
from anefx.targets.verify import verify

os.environ.setdefault("TQDM_DISABLE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.proto import MIL_pb2

STEPS = 32
BITS = (4, 6, 8)
ALL = ("embed", "ffn", "head")
# lowest logits PSNR (dB) and top-1 agreement each width must reach on the seeded model
FLOOR = {4: (18.0, 0.85), 6: (30.0, 0.95), 8: (42.0, 1.0)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("palettize")
    write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float32, seed=3)
    return folder


@pytest.fixture(scope="module")
def dec(ckpt: Path):
    return lower_decoder(str(ckpt), batch=8, context=64, dtype=torch.float16)


def _emit(dec, path: Path, lut: dict | None) -> Path:
    emit_functions({"prefill": dec.prefill, "decode": dec.decode}, path, default="decode", lut=lut)
    return path


@pytest.fixture(scope="module")
def packages(dec, tmp_path_factory) -> dict:
    """bits (0: dense) -> package with every weight kind at those bits."""
    root = tmp_path_factory.mktemp("lut")
    out = {0: _emit(dec, root / "dense.mlpackage", None)}
    for bits in BITS:
        out[bits] = _emit(dec, root / f"lut{bits}.mlpackage", dict.fromkeys(ALL, bits))
    return out


@pytest.fixture(scope="module")
def verified(packages, ckpt: Path) -> dict:
    ids = torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(4)).tolist()
    return {bits: verify(pkg, str(ckpt), ids=ids, steps=STEPS) for bits, pkg in packages.items()}


# ---------------------------------------------------------------------------------------------
# which weights: kinds read off the saved spec by what reads each weight


def _weight_kinds(spec, function: str) -> Counter:
    """Kind -> count of (dense, palettized) weights read by a gather or a conv in FUNCTION."""
    fn = spec.mlProgram.functions[function]
    modules = json.loads(spec.description.metadata.userDefined["anefx.modules"])
    made = {}
    for op in fn.block_specializations[fn.opset].operations:
        if op.type in ("const", "constexpr_lut_to_dense") and op.outputs:
            dims = op.outputs[0].type.tensorType.dimensions
            made[op.outputs[0].name] = (op.type, math.prod(d.constant.size for d in dims))
    kinds = Counter()
    for op in fn.block_specializations[fn.opset].operations:
        param = {"gather": "x", "conv": "weight"}.get(op.type)
        if param is None:
            continue
        name = op.inputs[param].arguments[0].name
        if name not in made or made[name][1] < MIN_ELEMENTS:
            continue
        module = split_op_name(name, modules)[0] or ""
        if op.type == "gather":
            kind = "embed"
        elif module.startswith("lm_head"):
            kind = "head"
        else:
            assert module.startswith("model.layers."), name
            kind = "ffn"
        kinds[(kind, made[name][0] == "constexpr_lut_to_dense")] += 1
    return kinds


def test_every_kind_palettized_and_nothing_else(packages) -> None:
    dense = _weight_kinds(read_spec(packages[0]), "decode")
    assert dense == {("embed", False): 1, ("head", False): 1, ("ffn", False): 14}, dense
    for bits in BITS:
        spec = read_spec(packages[bits])
        for fn in ("prefill", "decode"):
            want = Counter({(k, True): n for (k, _), n in dense.items()})
            assert _weight_kinds(spec, fn) == want
            luts = mil_luts(spec, fn)
            assert len(luts) == sum(dense.values())
            assert {lut.bits for lut in luts} == {bits}
            assert all(lut.lut_dtype == "float16" for lut in luts)


@pytest.mark.parametrize("lut", [{"ffn": 4}, {"embed": 6, "head": 8}])
def test_only_the_chosen_kinds(dec, packages, tmp_path: Path, lut: dict) -> None:
    dense = _weight_kinds(read_spec(packages[0]), "decode")
    spec = read_spec(_emit(dec, tmp_path / "m.mlpackage", lut))
    for fn in ("prefill", "decode"):
        want = Counter({(k, k in lut): n for (k, _), n in dense.items()})
        assert _weight_kinds(spec, fn) == want
        assert Counter(lut.bits for lut in mil_luts(spec, fn)) == Counter(
            {b: dense[(k, False)] for k, b in lut.items()}
        )
    meta = json.loads(spec.description.metadata.userDefined[LUT_KEY])
    assert meta["bits"] == lut and meta["group_size"] == GROUP_SIZE


# ---------------------------------------------------------------------------------------------
# the checker and the executor on the packages


@pytest.mark.parametrize("bits", BITS)
def test_checker_passes_and_counts_the_real_bytes(packages, bits: int) -> None:
    meta = json.loads(read_spec(packages[bits]).description.metadata.userDefined[LUT_KEY])
    dense = {r.stats["function"]: r.stats["weight_bytes"] for r in check_package(packages[0])}
    reports = check_package(packages[bits])
    for rep in reports:
        assert not rep.errors, rep.render()
        assert rep.stats["palettized"]["bits"] == {str(bits): 16}
        # the checker reads indices at `bits` per element plus fp16 tables off the spec; the
        # palettizer planned the same bytes from the shapes: they must agree to the byte
        assert rep.stats["palettized"]["bytes"] == meta["palettized_bytes"]
        fn = rep.stats["function"]
        assert (
            rep.stats["weight_bytes"] == dense[fn] - meta["dense_bytes"] + meta["palettized_bytes"]
        )
    # and that is what the blob holds (plus its per-blob headers): prefill and decode share
    # every weight, so the blob holds it once
    blob = sum(f.stat().st_size for f in packages[bits].glob("Data/com.apple.CoreML/weights/*"))
    assert 0.9 * blob < max(r.stats["weight_bytes"] for r in reports) <= blob


@pytest.mark.parametrize("bits", BITS)
def test_executor_applies_the_tables(packages, bits: int) -> None:
    """Decoded weight == table[group][index]; each value is its table's entry nearest the dense
    weight's value, so the error is bounded by the table's own spacing."""
    prog = load_package(packages[bits])
    dense_prog = load_package(packages[0])
    fn, dense_fn = prog.functions["decode"], dense_prog.functions["decode"]
    env, dense_env = prog._consts(fn), dense_prog._consts(dense_fn)
    seen = 0
    for name, _, make in fn.consts:
        if getattr(make, "type", None) != "constexpr_lut_to_dense":
            continue
        idx = env[make.args["indices"][0]].astype(np.int64)
        table = env[make.args["lut"][0]]
        got = env[name]
        assert table.dtype == np.float16 and table.shape[-2:] == (1 << bits, 1)
        assert idx.min() >= 0 and idx.max() < 1 << bits
        rows = idx.shape[0]
        groups = table.shape[0]
        assert rows % groups == 0 and rows // groups == GROUP_SIZE
        assert all(n == 1 for n in table.shape[1:-2])  # grouped along output channels only
        per_row = table.reshape(groups, 1 << bits)[np.arange(rows) // (rows // groups)]
        want = np.take_along_axis(per_row, idx.reshape(rows, -1), axis=1).reshape(idx.shape)
        np.testing.assert_array_equal(got, want)
        original = dense_env[name.removesuffix("_palettized")].astype(np.float64)
        assert original.shape == got.shape
        entries = per_row.astype(np.float64).reshape(rows, 1, -1)
        nearest = np.abs(original.reshape(rows, -1, 1) - entries).min(axis=-1)
        err = np.abs(original - got.astype(np.float64)).reshape(rows, -1)
        np.testing.assert_array_equal(err, nearest)
        snr = 10 * math.log10((original**2).mean() / ((original - got) ** 2).mean())
        assert snr > 6.02 * bits - 6, (name, snr)
        seen += 1
    assert seen == 16


def test_verify_psnr_rises_with_bits(verified) -> None:
    dense = verified[0]
    assert dense.psnr_db >= 60.0 and dense.top1_agreement == 1.0, dense.render()
    for bits in BITS:
        r = verified[bits]
        assert len(r.per_position_psnr_db) == STEPS
        psnr, top1 = FLOOR[bits]
        assert r.psnr_db >= psnr and r.top1_agreement >= top1, (bits, r.render())
    # about 6 dB per bit: each 2 bits more must gain clearly, and dense stays above 8 bits
    assert verified[6].psnr_db > verified[4].psnr_db + 8
    assert verified[8].psnr_db > verified[6].psnr_db + 8
    assert dense.psnr_db > verified[8].psnr_db + 8


def test_two_conversions_are_byte_identical(dec, packages, tmp_path: Path) -> None:
    """The same lowered graphs and LUT options give the same package, every file to the byte."""
    a = packages[4]
    b = _emit(dec, tmp_path / a.name, dict.fromkeys(ALL, 4))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(f.name == "weight.bin" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------
# the "lut" rule on specs that break one requirement each


def _first_lut_op(spec, function: str = "decode"):
    fn = spec.mlProgram.functions[function]
    ops = fn.block_specializations[fn.opset].operations
    return next(op for op in ops if op.type == "constexpr_lut_to_dense")


def _set_dtype(op, param: str, dtype: int) -> None:
    op.inputs[param].arguments[0].value.type.tensorType.dataType = dtype


def _set_first_dim(op, param: str, size: int) -> None:
    op.inputs[param].arguments[0].value.type.tensorType.dimensions[0].constant.size = size


@pytest.mark.parametrize(
    "breaks, message",
    [
        (lambda op: _set_dtype(op, "lut", MIL_pb2.FLOAT32), "LUT float32, not float16"),
        (lambda op: _set_dtype(op, "indices", MIL_pb2.UINT8), "8-bit indices need 256"),
        (lambda op: _set_dtype(op, "indices", MIL_pb2.INT8), "index bits must be one of"),
        (lambda op: _set_dtype(op, "indices", MIL_pb2.INT4), "index bits must be one of"),
        (lambda op: _set_first_dim(op, "lut", 3), "do not tile"),
    ],
)
def test_lut_rule_flags_an_illegal_palettization(packages, breaks, message: str) -> None:
    spec = read_spec(packages[4])
    assert not [v for r in check_spec(spec) for v in r.violations if v.rule == "lut"]
    op = _first_lut_op(spec)
    breaks(op)
    (rep,) = [r for r in check_spec(spec) if r.stats["function"] == "decode"]
    hits = [v for v in rep.violations if v.rule == "lut"]
    assert len(hits) == 1, rep.render()
    modules = json.loads(spec.description.metadata.userDefined["anefx.modules"])
    assert hits[0].severity == "error" and message in hits[0].message, hits[0]
    assert hits[0].module == split_op_name(op.outputs[0].name, modules)[0] is not None


# ---------------------------------------------------------------------------------------------
# inputs, shapes and the tables themselves


@pytest.mark.parametrize("bad", [0, 5, 7, 9, 16, -4, True, 4.0, "4"])
def test_bad_bits_rejected(bad) -> None:
    with pytest.raises(anefx.AnefxInputError, match=r"must be one of 1, 2, 3, 4, 6, 8"):
        check_lut({"ffn": bad})


def test_bad_kind_and_emit_rejects(dec, tmp_path: Path) -> None:
    with pytest.raises(anefx.AnefxInputError, match="unknown LUT weight kind 'mlp'"):
        check_lut({"mlp": 4})
    assert check_lut({"ffn": 4, "head": None}) == {"ffn": 4}
    out = tmp_path / "m.mlpackage"
    with pytest.raises(anefx.AnefxInputError, match="LUT bits for head"):
        _emit(dec, out, {"head": 5})
    assert not out.exists()


def test_group_size_divides_the_channels() -> None:
    assert _group_size(4096) == GROUP_SIZE == 16
    # Qwen3's 151936-row head in 10 slices of 15194 (and one of 15190) rows
    assert _group_size(15194) == 2 and _group_size(15190) == 14
    assert _group_size(17) == 1


def _fp16(*shape: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float16)


def test_which_consts_become_tables() -> None:
    modules = {
        "model_layers_0_mlp": "model.layers.0.mlp",
        "model_layers_0_ln": "model.layers.0.ln",
        "model_layers_0_mlp_gate": "model.layers.0.mlp.gate",
    }
    weights = {
        "model_layers_0_mlp__p__big": (_fp16(32, 256, 1, 1), "conv"),  # palettized
        "model_layers_0_mlp__p__odd": (_fp16(17, 256, 1, 1, seed=1), "conv"),  # groups of 1
        "model_layers_0_mlp__p__small": (_fp16(8, 256, 1, 1, seed=2), "conv"),  # < MIN_ELEMENTS
        "model_layers_0_mlp__p__table": (_fp16(256, 32, seed=3), "matmul"),  # not a conv weight
        "model_layers_0_ln__p__gamma": (_fp16(256, seed=4), "layer_norm"),  # a norm vector
        "other__p__w": (_fp16(32, 256, 1, 1, seed=5), "conv"),  # outside every kind
        "model_layers_0_mlp_gate__p__router": (_fp16(32, 256, 1, 1, seed=6), "conv"),  # MoE router
    }
    for bits, palettized, skipped in [(4, {"big", "odd"}, set()), (8, {"big"}, {"odd"})]:
        prog = _program(weights)
        s = palettize_program(prog, {"ffn": bits}, modules)
        assert {w.name.split("__")[-1] for w in s.weights} == palettized
        assert {w.name.split("__")[-1] for w in s.skipped} == skipped
        for w in s.skipped:
            assert "groups of 1" in w.reason and "dense" in w.reason
        ops = {op.name: op.op_type for op in prog.functions["main"].operations}
        for name in weights:
            short = name.split("__")[-1]
            assert (f"{name}_palettized" in ops) == (short in palettized), name
        by_name = {w.name.split("__")[-1]: w for w in s.weights}
        assert by_name["big"].group_size == 16 and by_name["big"].kind == "ffn"
        if "odd" in by_name:
            assert by_name["odd"].group_size == 1


def _program(weights: dict[str, tuple[np.ndarray, str]]):
    """A one-function iOS18 program: each weight read by a conv, a matmul or a layer_norm."""
    import coremltools as ct

    x_shape = (1, 256, 1, 8)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=x_shape, dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x):
        outs = []
        for name, (w, reader) in weights.items():
            v = mb.const(val=w, name=name)
            if reader == "conv":
                outs.append(mb.conv(x=x, weight=v))
            elif reader == "matmul":
                outs.append(mb.matmul(x=mb.reshape(x=x, shape=[8, 256]), y=v))
            else:
                outs.append(mb.layer_norm(x=x, axes=[1], gamma=v))
        return tuple(outs)

    return prog


@given(
    values=hnp.arrays(
        np.float16,
        st.integers(1, 3000),
        elements=st.floats(-60000, 60000, width=16, allow_nan=False, allow_infinity=False),
    ),
    bits=st.sampled_from(LUT_BITS),
)
def test_kmeans_lut_properties(values: np.ndarray, bits: int) -> None:
    lut, idx = kmeans_lut(values, bits)
    assert lut.shape == (1 << bits,) and lut.dtype == np.float16
    assert idx.shape == (values.size,) and idx.dtype == np.uint8 and int(idx.max()) < 1 << bits
    l64, v64 = lut.astype(np.float64), values.astype(np.float64)
    # every value maps to its nearest table entry
    err = np.abs(v64 - l64[idx])
    assert np.array_equal(err, np.abs(v64[:, None] - l64[None, :]).min(axis=1))
    distinct = len(np.unique(values))
    if distinct <= 1 << bits:
        assert np.array_equal(l64[idx], v64)  # few values: held exactly
    else:
        assert np.all(np.diff(l64) >= 0)  # sorted: the Lloyd cells keep their order
    again = kmeans_lut(values.copy(), bits)
    assert np.array_equal(again[0].view(np.uint16), lut.view(np.uint16))
    assert np.array_equal(again[1], idx)
    # the counting sort agrees with numpy's (which merges -0.0 and +0.0)
    uniq, inv, counts = _distinct_fp16(values)
    assert np.array_equal(uniq[inv].view(np.uint16), values.view(np.uint16))
    assert np.all(np.diff(uniq.astype(np.float64)) >= 0) and counts.sum() == values.size
    assert len(uniq) == len(np.unique(values.view(np.uint16)))
