"""Smoke test of benchmarks/convert.py on the tiny preset: it runs and its last line is JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "convert.py"


def test_convert_benchmark_tiny(tmp_path: Path) -> None:
    # both paths in one process: half the interpreter start-ups of the default child mode
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "qwen3-tiny", "--seq", "16"]
        + ["--out", str(tmp_path), "--in-process"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "preset", "seq", "anefx_s", "naive_s", "ratio", "passes_s", "peak_rss_gb",
        "naive_peak_rss_gb", "ops_per_layer", "copies_per_layer", "transposes_per_layer",
        "reshapes_per_layer", "anefx_stage_s", "naive_stage_s", "anefx_errors", "naive_errors",
        "package_mb", "naive_package_mb",
    ):  # fmt: skip
        assert key in rec, key
    assert rec["preset"] == "qwen3-tiny" and rec["seq"] == 16
    assert rec["same_weights"]
    assert rec["anefx_errors"] == {}  # the lowered package breaks no ANE rule
    assert rec["naive_errors"].get("linear", 0) > 0  # the stock one keeps its linear layers
    assert rec["ops_per_layer"] > 0 and rec["naive_ops_per_layer_avg"] > 0
    assert (tmp_path / "anefx.mlpackage").is_dir() and (tmp_path / "naive.mlpackage").is_dir()
