"""Smoke tests of benchmarks/convert.py, decode.py, structural.py, verify.py, scale.py, cost.py
and hybrid_drift.py on small presets, and of the conversion matrix's rows: they run and their
last line is JSON with the promised keys; a bad argument is refused before any work."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "convert.py"
DECODE = BENCH / "decode.py"


def _last_json(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cost_benchmark_tiny() -> None:
    """The decode bytes as converted and ideal, by context, with their ratios and estimates."""
    rec = _last_json(
        [str(BENCH / "cost.py"), "--preset", "qwen3-tiny", "--contexts", "32,64", "--batch", "8"]
    )
    assert rec["ESTIMATE"] is True and rec["chip"] == "M4" and rec["published_tok_s"]
    rows = {r["context"]: r for r in rec["contexts"]}
    assert set(rows) == {32, 64}
    for context, r in rows.items():
        # tiny: 2 layers x (K and V) x 2 kv heads x head_dim 32, fp16
        assert r["cache"] == 2 * 2 * 2 * context * 32 * 2
        assert r["ideal"] == (
            r["weights"] + r["cache"] + r["cache"] // context + r["other_activations_written"]
        )
        assert math.isclose(r["ratio"], r["as_converted"] / r["ideal"], abs_tol=1e-3)
        assert math.isclose(r["est_tok_s_as_converted"], 64.2e9 / r["as_converted"], rel_tol=1e-3)


@pytest.mark.slow  # a hybrid's benchmark path (the Qwen3 smoke tests run by default)
def test_cost_benchmark_hybrid_in_parts_from_a_checkpoint() -> None:
    """A hybrid's carried states are in the bytes of a step and in the ideal; anefx cost's
    estimates of decode and prefill come with their inputs; the published rates with their
    sources."""
    from anefx.models.presets import get_preset

    rec = _last_json(
        [str(BENCH / "cost.py"), "--preset", "qwen3.5-tiny", "--contexts", "32", "--batch", "8"]
        + ["--parts", "--checkpoint"]
    )
    assert rec["ESTIMATE"] is True and rec["parts_mode"] is True and rec["checkpoint_s"] > 0
    cfg = get_preset("qwen3.5-tiny")
    linear = cfg["layer_types"].count("linear_attention")
    full = len(cfg["layer_types"]) - linear
    conv_dim = 2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    conv_dim += cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    recurrent = cfg["linear_num_value_heads"] * cfg["linear_key_head_dim"]
    recurrent *= cfg["linear_value_head_dim"]
    window = cfg["linear_conv_kernel_dim"] - 1
    (r,) = rec["contexts"]
    # fp16: every linear layer's conv window and delta-rule state, read and written
    carried = linear * (conv_dim * window + recurrent) * 2
    assert r["carried_read"] == r["carried_written"] == carried
    assert r["cache"] == full * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 32 * 2
    assert r["ideal"] == (
        r["weights"] + r["cache"] + r["cache"] // 32 + carried + r["other_activations_written"]
    )
    assert r["as_converted"] >= r["ideal"]
    floor = rec["dispatch_floor_s"] * r["parts"]
    for name, tokens in (("decode", 1), ("prefill", 8)):
        est = r["estimate"][name]
        assert est["tokens_per_call"] == tokens
        bound = max(est["memory_s"], est["compute_s"])
        assert math.isclose(est["seconds"], bound + floor, rel_tol=1e-9)
        assert math.isclose(est["tokens_per_s"], tokens / est["seconds"], rel_tol=1e-3)
    assert math.isclose(r["estimate"]["decode"]["memory_s"], r["as_converted"] / 64.2e9)
    published = rec["published_tok_s"]
    assert published["CoreML-LLM Qwen3.5-0.8B, M4 (john-rocky/CoreML-LLM)"] == 51.0
    assert published["CoreML-LLM Qwen3.5-2B, iPhone 17 Pro (john-rocky/CoreML-LLM)"] == 27.0
    assert rec["published_source"] == "device-facts.md"


def test_convert_benchmark_tiny(tmp_path: Path) -> None:
    # both paths in one process: half the interpreter start-ups of the default child mode
    rec = _last_json(
        [str(SCRIPT), "--preset", "qwen3-tiny", "--seq", "16", "--context", "64"]
        + ["--out", str(tmp_path), "--in-process"]
    )
    for key in (
        "preset", "seq", "anefx_s", "naive_s", "ratio", "passes_s", "peak_rss_gb",
        "naive_peak_rss_gb", "ops_per_layer", "copies_per_layer", "transposes_per_layer",
        "reshapes_per_layer", "anefx_stage_s", "naive_stage_s", "anefx_errors", "naive_errors",
        "package_mb", "naive_package_mb",
        # the stateful two-function package
        "stateful_s", "stateful_package_mb", "decode_ops_per_layer", "decode_copies_per_layer",
        "decode_transposes_per_layer", "decode_reshapes_per_layer",
        "stateful_prefill_ops_per_layer", "stateful_error",
    ):  # fmt: skip
        assert key in rec, key
    assert rec["preset"] == "qwen3-tiny" and rec["seq"] == 16
    assert rec["same_weights"]
    # Qwen3's layers are alike: no per-kind counts, the record as before
    assert "by_layer_kind" not in rec and "layer_kinds" not in rec
    assert rec["anefx_errors"] == {}  # the lowered package breaks no ANE rule
    assert rec["naive_errors"].get("linear", 0) > 0  # the stock one keeps its linear layers
    assert rec["ops_per_layer"] > 0 and rec["naive_ops_per_layer_avg"] > 0
    assert (tmp_path / "anefx.mlpackage").is_dir() and (tmp_path / "naive.mlpackage").is_dir()

    assert rec["stateful_error"] is None
    assert (tmp_path / "stateful.mlpackage").is_dir()
    assert rec["stateful_context"] == 64 and rec["stateful_batch"] == 16
    assert rec["stateful_s"] > 0 and rec["stateful_package_mb"] > 0
    assert rec["decode_errors"] == {} and rec["stateful_prefill_errors"] == {}
    assert rec["decode_ops_per_layer"] > 0 and rec["stateful_prefill_ops_per_layer"] > 0
    ops = rec["decode_layer_op_types"]
    # each layer reads and writes its K and V cache, counted in the layer as ANEMLL does
    assert ops.get("read_state") == 2 and ops.get("write_state") == 2
    assert ops.get("conv") == 7  # q, k, v, o, gate, up, down
    # two layers: the medians are means, so copies = transposes + reshapes exactly
    assert rec["decode_copies_per_layer"] == (
        rec["decode_transposes_per_layer"] + rec["decode_reshapes_per_layer"]
    )


def _bench_module(name: str):
    """A benchmark script imported as a module (its top level imports the standard library
    only; its functions import anefx when called)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # the scripts import each other by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_kind_stats_takes_the_medians_of_each_kind_apart() -> None:
    from anefx.lowering.checker import OpInfo

    convert = _bench_module("convert")
    # layers 0, 1, 3 linear (5, 7, 6 ops), layer 2 full (3 ops); 2 ops outside the layers
    plan = {
        0: ["conv"] * 3 + ["reshape"] * 2,
        1: ["conv"] * 4 + ["transpose", "reshape", "mul"],
        2: ["matmul", "read_state", "reshape"],
        3: ["conv"] * 4 + ["reshape"] * 2,
    }
    ops = [
        OpInfo(f"op{layer}_{i}", op, op, [], [], module=f"model.layers.{layer}.mixer")
        for layer, kinds in plan.items()
        for i, op in enumerate(kinds)
    ]
    ops += [OpInfo("head", "conv", "conv", [], [], module="lm_head")] * 2
    stats = convert.kind_stats(ops, ["linear", "linear", "full", "linear"])
    assert list(stats) == ["linear", "full"]
    linear, full = stats["linear"], stats["full"]
    assert linear["layers"] == 3 and full["layers"] == 1
    assert linear["ops_per_layer"] == 6 and linear["ops_per_layer_max"] == 7
    assert linear["transposes_per_layer"] == 0 and linear["reshapes_per_layer"] == 2
    assert linear["copies_per_layer"] == 2  # medians of (2, 2, 2) copies
    assert linear["layer_op_types_index"] == 3  # the layer of the median count
    assert linear["layer_op_types"] == dict(Counter(plan[3]))
    assert full["ops_per_layer"] == 3 and full["layer_op_types"] == dict(Counter(plan[2]))


@pytest.mark.slow  # a hybrid's benchmark path (the Qwen3 smoke tests run by default)
def test_convert_benchmark_hybrid_counts_each_kind_of_layer(tmp_path: Path) -> None:
    """A Qwen3.5 hybrid: the layers are counted per kind as the family labels them, in the
    prefill package and both functions of the stateful one; --no-naive skips the stock path."""
    from anefx.models.presets import get_preset

    rec = _last_json(
        [str(SCRIPT), "--preset", "qwen3.5-tiny", "--seq", "16", "--context", "64"]
        + ["--out", str(tmp_path), "--in-process", "--no-naive"]
    )
    layer_types = get_preset("qwen3.5-tiny")["layer_types"]
    n_linear = layer_types.count("linear_attention")
    assert rec["layer_kinds"] == {"linear": n_linear, "full": len(layer_types) - n_linear}
    assert rec["naive_s"] is None and rec["naive_errors"] is None and rec["ratio"] is None
    assert not (tmp_path / "naive.mlpackage").exists()
    assert rec["stateful_error"] is None and rec["anefx_errors"] == {}
    assert rec["decode_errors"] == {} and rec["stateful_prefill_errors"] == {}
    assert rec["carried_states"] == 2 * n_linear  # each linear layer's conv and delta-rule state
    kinds = rec["by_layer_kind"]
    for row in kinds.values():
        for prefix in ("", "decode_", "stateful_prefill_"):
            assert row[prefix + "ops_per_layer"] > 0
            types = row[prefix + "layer_op_types"]
            assert sum(types.values()) <= row[prefix + "ops_per_layer_max"]
        assert row["naive_ops_per_layer_est"] is None
    # one full layer: its medians are its own counts, so copies = transposes + reshapes
    full = kinds["full"]
    for prefix in ("", "decode_", "stateful_prefill_"):
        assert full[prefix + "copies_per_layer"] == (
            full[prefix + "transposes_per_layer"] + full[prefix + "reshapes_per_layer"]
        )
    # the KV cache is the full layers' (read and written in place); the linear layers' states
    # are program inputs and outputs, so no state op is counted in a linear layer
    for prefix in ("decode_", "stateful_prefill_"):
        assert full[prefix + "layer_op_types"].get("read_state") == 2
        assert full[prefix + "layer_op_types"].get("write_state") == 2
        assert "read_state" not in kinds["linear"][prefix + "layer_op_types"]
    # the delta rule: its decay's exp in every linear layer, none in the full one
    assert kinds["linear"]["decode_layer_op_types"].get("exp", 0) >= 1
    assert "exp" not in full["decode_layer_op_types"]


def test_decode_benchmark_tiny() -> None:
    # fp32 on both sides: the lowered graphs and transformers must pick the same greedy tokens
    rec = _last_json(
        [str(DECODE), "--preset", "qwen3-tiny", "--context", "64", "--batch", "8"]
        + ["--tokens", "6", "--prompt-len", "5", "--dtype", "float32"]
    )
    for key in (
        "anefx_tok_s", "hf_tok_s", "ratio",
        "preset", "context", "batch", "tokens", "dtype",
    ):  # fmt: skip
        assert key in rec, key
    assert (rec["preset"], rec["context"], rec["batch"], rec["tokens"], rec["dtype"]) == (
        "qwen3-tiny", 64, 8, 6, "float32",
    )  # fmt: skip
    assert rec["anefx_tok_s"] > 0 and rec["hf_tok_s"] > 0
    # both rounded to 3 decimals in the JSON
    assert math.isclose(
        rec["ratio"], rec["anefx_tok_s"] / rec["hf_tok_s"], rel_tol=0.01, abs_tol=1e-3
    )
    assert rec["tokens_match"] == 6


def test_structural_benchmark_repeats_layers_and_matches_the_full_export() -> None:
    rec = _last_json([str(BENCH / "structural.py"), "--preset", "qwen2.5-0.5b", "--seq", "16"])
    for key in ("preset", "wall_s", "peak_rss_gb", "stage_s", "baseline_wall_s", "ratio"):
        assert key in rec, key
    assert rec["preset"] == "qwen2.5-0.5b" and rec["layers"] == 24
    assert rec["exported_layers"] == 2 and rec["errors"] == 0
    assert rec["same_report"] is True  # the repeated graph lowers to the full export's report
    assert {"export", "decompose", "repeat", "passes", "check"} <= set(rec["stage_s"])
    assert "repeat" not in rec["baseline_stage_s"]


def test_structural_benchmark_reports_against_its_bounds() -> None:
    import argparse

    base = [str(BENCH / "structural.py"), "--preset", "qwen3.5-tiny", "--seq", "16"]
    # a memory bound so small no run meets it: the verdict says so (and the exit code is 0)
    rec = _last_json([*base, "--no-baseline", "--max-s", "1000", "--max-rss-gb", "0.001"])
    assert (rec["max_s"], rec["max_rss_gb"]) == (1000.0, 0.001)
    assert rec["process_s"] >= rec["wall_s"] > 0 and rec["peak_rss_gb"] > 0.001
    assert rec["within_bound"] is False
    assert rec["layers"] == 4 and rec["errors"] == 0
    # the verdict is the numbers against the bounds given, each bound alone or none
    within = _bench_module("structural")._within

    def bounds(max_s: float | None, max_rss_gb: float | None) -> argparse.Namespace:
        return argparse.Namespace(max_s=max_s, max_rss_gb=max_rss_gb)

    assert within(bounds(None, None), 5.0, 1.0) is None
    assert within(bounds(10.0, None), 5.0, 99.0) is True
    assert within(bounds(4.0, None), 5.0, 1.0) is False
    assert within(bounds(None, 2.0), 99.0, 1.5) is True
    assert within(bounds(10.0, 1.0), 5.0, 1.5) is False


def test_verify_benchmark_tiny() -> None:
    rec = _last_json(
        [str(BENCH / "verify.py"), "--preset", "qwen3-tiny", "--context", "64", "--batch", "8"]
        + ["--steps", "5", "--prompt-len", "11"]
    )
    for key in ("wall_s", "psnr_db", "top1_agreement", "convert_s", "baseline_torch_s", "ratio"):
        assert key in rec, key
    assert rec["steps"] == 5 and rec["prompt_len"] == 11
    assert rec["psnr_db"] >= 60.0 and rec["top1_agreement"] == 1.0
    assert rec["wall_s"] > 0 and rec["baseline_torch_s"] > 0 and rec["ratio"] > 0


def test_scale_benchmark_tiny_in_parts(tmp_path: Path) -> None:
    rec = _last_json(
        [str(BENCH / "scale.py"), "--preset", "qwen3-tiny", "--context", "64", "--batch", "8"]
        + ["--max-chunk-mb", "0.05", "--keep", str(tmp_path)]
    )
    for key in (
        "wall_s", "peak_rss_gb", "parts", "bytes_written", "checkpoint_s", "checkpoint_bytes",
        "baseline_wall_s", "baseline_peak_rss_gb", "baseline_touch_s", "rss_ratio", "preset",
        "git", "context", "batch", "max_chunk_mb", "peak_anon_gb",
    ):  # fmt: skip
        assert key in rec, key
    assert (rec["preset"], rec["context"], rec["batch"], rec["max_chunk_mb"]) == (
        "qwen3-tiny", 64, 8, 0.05,
    )  # fmt: skip
    out = tmp_path / "out"
    manifest = json.loads((out / "qwen3-tiny" / "manifest.json").read_text())
    # embedding, one chunk per layer (each is over 0.05 MB), head
    assert rec["parts"] == len(manifest["parts"]) == 4
    assert all((out / "qwen3-tiny" / p["file"]).is_dir() for p in manifest["parts"])
    assert rec["bytes_written"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    ckpt = tmp_path / "checkpoint"
    assert rec["checkpoint_bytes"] == sum(f.stat().st_size for f in ckpt.iterdir())
    assert rec["checker_errors"] == 0
    # a converter process imports torch and coremltools: well over 100 MB, well under 8 GB
    assert 0.1 < rec["peak_rss_gb"] < 8 and 0.1 < rec["baseline_peak_rss_gb"] < 8
    assert 0 < rec["peak_anon_gb"] <= rec["peak_rss_gb"]
    assert rec["wall_s"] > 0 and rec["checkpoint_s"] > 0 and rec["baseline_wall_s"] > 0
    assert math.isclose(
        rec["rss_ratio"], rec["peak_rss_gb"] / rec["baseline_peak_rss_gb"], rel_tol=0.01
    )


def test_scale_benchmark_checks_its_arguments_first(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--preset", "qwen3-tiny", "--batch", "0"]
        + ["--no-baseline", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--batch" in proc.stderr and "must be between 1 and" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no checkpoint written for nothing


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("convert.py", ["--seq", "0"], "argument --seq: must be between 1 and 16384, got 0"),
        (
            "convert.py",
            ["--seq", "128", "--context", "64"],
            "--seq 128 (the stateful package's prefill batch) must not exceed --context 64",
        ),
        ("decode.py", ["--batch", "0"], "argument --batch: must be between 1 and 16384, got 0"),
        (
            "decode.py",
            ["--context", "64", "--batch", "128", "--prompt-len", "4", "--tokens", "4"],
            "--batch 128 must not exceed --context 64",
        ),
        ("verify.py", ["--steps", "0"], "argument --steps: must be between 1 and"),
        (
            "verify.py",
            ["--context", "64", "--batch", "8", "--prompt-len", "16", "--steps", "60"],
            "--prompt-len + --steps - 1 = 75 tokens exceed --context 64",
        ),
        ("cost.py", ["--contexts", "64,x"], "--contexts must be comma-separated integers"),
        ("cost.py", ["--contexts", "32", "--batch", "64"], "--batch must be 1..32"),
        ("cost.py", ["--chip", "A18 Pro"], "--chip must be a chip of the table"),
        ("structural.py", ["--max-s", "0"], "argument --max-s: must be a positive number"),
        ("structural.py", ["--max-rss-gb", "x"], "argument --max-rss-gb: must be a positive"),
    ],
)
def test_benchmark_checks_its_arguments_first(
    tmp_path: Path, script: str, args: list[str], message: str
) -> None:
    """A bad value is refused by the benchmark's own parser (exit 2 with its usage) before any
    load or conversion: nothing is written, in the working folder or the temporary one. The
    tiny preset keeps a benchmark that stopped checking first from running for minutes."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--preset", "qwen3-tiny", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.startswith("usage:") and message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a hybrid's benchmark path (the Qwen3 smoke tests run by default)
def test_hybrid_drift_benchmark_tiny() -> None:
    """fp16 and fp32 lowered hybrids against transformers fp32, window by window and state by
    state, through decode steps and prefill calls."""
    rec = _last_json(
        [str(BENCH / "hybrid_drift.py"), "--preset", "qwen3.5-tiny", "--tokens", "20"]
        + ["--window", "8", "--batch", "8", "--decay", "0.99"]
    )
    assert (rec["tokens"], rec["window"], rec["batch"], rec["decay"]) == (20, 8, 8, 0.99)
    # dt_bias 0 and A = -ln(D) / ln 2: the decay is D on every head where a = 0
    assert all(math.isclose(d, 0.99, rel_tol=1e-5) for d in rec["decay_range"])
    assert set(rec["paths"]) == {"decode", "prefill"}
    linear = [i for i, k in enumerate(rec["layer_kinds"]) if k == "linear"]
    names = {f"{kind}_state_{i}" for i in linear for kind in ("conv", "rec")}
    for res in rec["paths"].values():
        spans = [(w["start"], w["end"]) for w in res["windows"]]
        assert spans == [(0, 7), (8, 15), (16, 19)]
        for w in res["windows"]:
            assert w["fp32_psnr_db"] is None or w["fp32_psnr_db"] >= 100  # None: exact
            assert w["fp16_psnr_db"] >= 50 and 0 <= w["fp16_top1"] <= 1
            rec_fp32 = w["fp32_recurrent_psnr_min_db"]
            assert rec_fp32 is None or rec_fp32 >= 100
            assert w["fp16_recurrent_psnr_min_db"] >= 40
        # the last window ends where the end states are taken
        last = res["windows"][-1]["fp16_recurrent_psnr_min_db"]
        assert last == res["fp16_recurrent_psnr_min_db"]
        assert set(res["states"]) == names
        for by in res["states"].values():
            assert by["fp32"] is None or by["fp32"] >= 100
            assert by["fp16"] >= 40
        first, last = res["windows"][0]["fp16_psnr_db"], res["windows"][-1]["fp16_psnr_db"]
        assert res["fp16_drift_db"] == round(last - first, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "qwen3-tiny"], "argument --preset: invalid choice: 'qwen3-tiny'"),
        (["--decay", "1.5"], "--decay must be 'stock' or a number in (0, 1)"),
        (["--paths", "decode,sideways"], "--paths must name some of decode, prefill"),
        (["--tokens", "32", "--batch", "64"], "--batch 64 must not exceed --tokens 32"),
        (["--tokens", "32", "--window", "64", "--batch", "8"], "--window 64 must not exceed"),
    ],
)
def test_hybrid_drift_checks_its_arguments_first(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Only presets with linear-attention layers (a dense Qwen3 has no state to drift); bad
    values refused by the parser, before a model is built."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "hybrid_drift.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.startswith("usage:") and message in proc.stderr, proc.stderr


def test_matrix_rows_of_a_hybrid_count_its_layers_by_kind() -> None:
    from anefx.lowering.matrix import matrix_presets, matrix_row, render_matrix
    from anefx.models.families import FAMILIES

    hybrid = FAMILIES["qwen3_5_text"]
    published = [n for n in hybrid.presets if n != hybrid.tiny and "tiny" not in n]
    listed = matrix_presets()
    assert set(published) <= set(listed) and "qwen3.5-0.8b" in listed
    assert not any("tiny" in n for n in listed)
    row = matrix_row("qwen3.5-tiny", 16)
    assert row["layer_kinds"] == {"linear": 3, "full": 1}
    assert row["substitutions"] >= 1  # the loop-free delta rule
    assert row["errors_after_except_size"] == 0
    dense = matrix_row("qwen3-tiny", 16)
    assert not {"layer_kinds", "substitutions", "layout_changes_left"} & set(dense)
    table = render_matrix([row, dense]).splitlines()
    assert "| 4 (3 linear, 1 full) |" in table[2] and "capture substitutions)" in table[2]
    assert f"| {dense['layers']} | {dense['captured_nodes']} |" in table[3]


@pytest.mark.slow
def test_scale_benchmark_fails_clearly_when_the_conversion_fails(tmp_path: Path) -> None:
    # 5 bits passes scale's range and is refused by anefx convert, after the checkpoint
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--preset", "qwen3-tiny", "--lut", "5"]
        + ["--context", "64", "--batch", "8", "--no-baseline", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stdout.strip() == ""  # no summary, no JSON line
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("scale: anefx convert failed (exit 2)")
    assert "must be one of 1, 2, 3, 4, 6, 8" in message[0]  # anefx's own reason comes along
