"""Smoke tests of benchmarks/convert.py, decode.py, structural.py, verify.py, scale.py and cost.py
on small presets: they run and their last line is JSON with the promised keys; a bad argument is
refused before any work."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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
