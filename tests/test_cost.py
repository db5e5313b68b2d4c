"""anefx cost: the byte and MAC counts of a hand-built program equal a sum done by hand; the decode
bytes of a converted tiny model are its weights plus the cache arithmetic; the estimate is the
formula of the rule table's chips; the command checks its arguments."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from anefx.core import rules
from anefx.targets.cost import ArtifactCost, FunctionCost, artifact_cost, program_cost
from tests._cli import cli

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program, types  # noqa: E402

C_IN, C_OUT, S = 48, 80, 5
STATE = (6, 32, 16)  # (rows, T, D) of the hand-built state; 2 bytes per element
ROWS = (1, 2, 16)  # the slice_update's rows


def _hand_built(tmp_path: Path) -> Path:
    """conv -> add, a state read by a mul and written whole, a second state updated in place
    by slice_update (its rows only) and read back through a slice (a view) by a matmul."""
    from anefx.targets.coreml import convert_program

    rng = np.random.default_rng(0)
    inputs = {
        "x": mb.placeholder(shape=[1, C_IN, 1, S], dtype=types.fp16),
        "u": mb.placeholder(shape=list(ROWS), dtype=types.fp16),
        "q": mb.placeholder(shape=[1, 4, STATE[2]], dtype=types.fp16),
        "cache": mb.state_tensor_placeholder(shape=list(STATE), dtype=types.fp16),
        "kv": mb.state_tensor_placeholder(shape=list(STATE), dtype=types.fp16),
    }
    func = Function(inputs, opset_version=ct.target.iOS18)
    with func:
        i = func.inputs
        w = rng.standard_normal((C_OUT, C_IN, 1, 1)).astype(np.float16)
        y = mb.conv(x=i["x"], weight=w, name="y")
        y2 = mb.add(x=y, y=y, name="y2")
        s = mb.read_state(input=i["cache"], name="s")
        z = mb.mul(x=s, y=np.float16(2.0), name="z")  # reads the state, writes a state-sized copy
        mb.coreml_update_state(state=i["cache"], value=z, name="w1")
        kv = mb.read_state(input=i["kv"], name="kv_read")
        new = mb.slice_update(
            x=kv,
            update=i["u"],
            begin=np.array([3, 7, 0], np.int32),
            end=np.array([4, 9, 16], np.int32),
        )
        kv2 = mb.coreml_update_state(state=i["kv"], value=new, name="w2")
        row = mb.slice_by_index(x=kv2, begin=[3, 0, 0], end=[4, STATE[1], STATE[2]], name="row")
        att = mb.matmul(x=i["q"], y=row, transpose_y=True, name="att")  # (1, 4, T)
        func.set_outputs([mb.identity(x=y2, name="out"), mb.identity(x=att, name="att_out")])
    prog = Program()
    prog.add_function("main", func)
    path = tmp_path / "hand.mlpackage"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_program(prog, package_dir=path)
    return path


def test_a_hand_built_program_costs_what_a_hand_sum_says(tmp_path: Path) -> None:
    from anefx.targets.reader import read_spec

    cost = program_cost(read_spec(_hand_built(tmp_path)), "main")
    b = 2  # fp16
    state = np.prod(STATE) * b
    row = STATE[1] * STATE[2] * b
    # weights: the conv's (C_OUT, C_IN) fp16 matrix, plus the small constants ops read (the
    # mul's scalar, the slice bounds are op parameters); at most a few hundred bytes of those
    assert C_OUT * C_IN * b <= cost.weight_bytes <= C_OUT * C_IN * b + 256
    # the state: the mul reads `cache` whole, the matmul reads one row of `kv` through a view
    assert cost.state_read == state + row
    # written: `cache` whole (a fresh tensor), `kv` only the update's rows (in place)
    assert cost.state_written == state + np.prod(ROWS) * b
    # activations written: y, y2, z (state-sized), att, and the two outputs' identities
    att = 4 * STATE[1] * b
    assert cost.activations_written == 2 * (C_OUT * S * b) + state + 2 * att + C_OUT * S * b
    assert cost.state_sized_written == state
    # read: x by the conv, y twice by the add, u by slice_update, q by matmul, outputs' inputs
    assert cost.activations_read == (
        C_IN * S * b
        + 2 * C_OUT * S * b
        + np.prod(ROWS) * b
        + 4 * STATE[2] * b
        + C_OUT * S * b
        + att
    )
    # MACs: the conv C_OUT x C_IN per position, the matmul (4 x T) outputs of D products each
    assert cost.macs == C_OUT * C_IN * S + 4 * STATE[1] * STATE[2]


def test_the_estimate_is_the_formula_of_the_chip_table() -> None:
    fc = FunctionCost("p", "decode", weight_bytes=10**9, state_read=10**8, macs=10**9)
    cost = ArtifactCost("x", "package", 512, {"decode": 1, "prefill": 64}, [fc])
    m4 = rules.CHIPS["M4"]
    est = cost.estimate(m4)["decode"]
    memory = 1.1e9 / (m4.ane_gbps * 1e9)
    assert est["seconds"] == pytest.approx(memory + rules.DISPATCH_FLOOR_S)
    assert est["tokens_per_s"] == pytest.approx(1 / (memory + rules.DISPATCH_FLOOR_S))
    # a chip with no bandwidth figure gets no decode estimate rather than a guess
    assert cost.estimate(rules.CHIPS["A18 Pro"])["decode"]["tokens_per_s"] is None
    # compute bound: 2 x MACs / peak ops when that is the larger
    heavy = FunctionCost("p", "prefill", weight_bytes=10**6, macs=10**13)
    est = ArtifactCost("x", "package", 512, {"prefill": 64}, [heavy]).estimate(m4)["prefill"]
    assert est["seconds"] == pytest.approx(2e13 / (m4.ane_tops * 1e12) + rules.DISPATCH_FLOOR_S)
    assert est["tokens_per_s"] == pytest.approx(64 / est["seconds"])


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory) -> tuple[Path, object]:
    import anefx
    from anefx.models.presets import get_preset

    out = tmp_path_factory.mktemp("cost") / "tiny.mlpackage"
    anefx.convert("preset:qwen3-tiny", out, context=64, batch=8)
    return out, get_preset("qwen3-tiny")


def test_decode_bytes_are_the_weights_plus_the_cache_arithmetic(tiny_package) -> None:
    path, cfg = tiny_package
    cost = artifact_cost(path)
    dec = cost.total("decode")
    h, inter, v, L = (
        cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers")
    )
    d, heads, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    b = 2
    # the 1x1 convs: q, k, v, o, gate, up, down per layer, and the (tied) head over the table
    matrices = L * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter) + v * h
    # beside them: the norms (doubled by the exact layer_norm form), the rotary tables (context
    # x head_dim, cos and sin), the one embedding row the token gathers, and op parameters
    norms = L * 2 * (2 * h + 2 * d) + 2 * h
    tables = 2 * 64 * d
    least = (matrices + norms + tables) * b
    assert least <= dec.weight_bytes <= least + 8192, (dec.weight_bytes, least)
    assert dec.macs >= matrices  # one token through every matrix
    cache = 2 * L * kv * 64 * d * b  # every layer's K and V, (1, kv, d, context) fp16
    # the cache is read once (attention reads each layer's row), and only the new rows are
    # written: one position of every layer's K and V; no op writes a cache-sized tensor
    assert dec.state_read == cache
    assert dec.state_written == cache // 64
    assert dec.state_sized_written == 0
    est = cost.estimate(rules.CHIPS["M4"])["decode"]
    assert est["memory_s"] == pytest.approx(dec.moved / (rules.CHIPS["M4"].ane_gbps * 1e9))


def test_the_command_prints_and_checks_its_arguments(tiny_package, tmp_path: Path) -> None:
    path, _ = tiny_package
    code, out, _ = cli("cost", path, "--chip", "m4", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["estimate"]["M4"]["ESTIMATE"] is True and set(doc["totals"]) == {"prefill", "decode"}
    code, out, _ = cli("cost", path)
    assert code == 0 and "ESTIMATE (not measured)" in out and "A18 Pro" in out
    # a model: converted at --context into a temporary folder, costed, removed; the same bytes
    code, out, _ = cli("cost", "preset:qwen3-tiny", "--context", "64", "--batch", "8", "--json")
    assert code == 0
    fresh = json.loads(out)["totals"]["decode"]
    assert fresh["weight_bytes"] == doc["totals"]["decode"]["weight_bytes"]
    assert fresh["state_read"] == doc["totals"]["decode"]["state_read"]
    for argv, needle in [
        (("cost", path, "--context", "128"), "--context/--batch"),
        (("cost", path, "--chip", "Z80"), "--chip"),
        (("cost", "preset:qwen3-tiny"), "--context N"),
        (("cost", tmp_path / "missing.mlpackage"), "missing.mlpackage"),
    ]:
        code, _, err = cli(*argv)
        assert code == 2 and needle in err, (argv, err)
