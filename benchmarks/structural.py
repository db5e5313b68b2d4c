"""Benchmark: the structural (meta-device) check of a preset, with and without layer repetition.

    .venv/bin/python benchmarks/structural.py --preset qwen3-32b [--seq 64] [--no-baseline]
        [--max-s S] [--max-rss-gb G]

What `anefx check preset:NAME --meta` does: build the model on the meta device (no weights),
capture, run the pipeline, check. anefx exports only the first decoder layers and repeats them
in the graph (models/repeat_layers.py); the baseline, in a child process of its own so each
has its own peak RSS, exports every layer (the stock torch.export + run_decompositions cost).
Both must give the same lowered graph: the node count and the report's rule counts are compared.

``wall_s`` is load + capture + passes + check in this process (imports excluded, reported as
``import_s``; ``process_s`` is both, the command's own time bar the interpreter start-up).
``--max-s`` / ``--max-rss-gb`` state a bound (the 27B hybrid's: 30 s, 2 GB): the summary says
whether ``process_s`` and the peak RSS stayed within it (``within_bound``); the exit code does
not depend on it. Printed: a readable summary, then as the LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

T_START = time.perf_counter()

from convert import _quiet, git_revision, peak_rss_gb  # noqa: E402


def measure(preset: str, seq: int, repeat: bool) -> dict:
    """One meta-device check; seconds per stage, nodes, rule counts, peak RSS."""
    import torch

    import anefx

    t0 = time.perf_counter()
    low = anefx.lower(
        f"preset:{preset}", seq_len=seq, dtype=torch.float16, meta=True, repeat=repeat
    )
    wall = time.perf_counter() - t0
    stages = {k: round(v, 2) for k, v in low.seconds.items()}
    return {
        "wall_s": round(wall, 2),
        "stage_s": stages,
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "exported_layers": low.exported_layers,
        "layers": low.config.num_hidden_layers,
        "nodes": low.report.stats["nodes"],
        "errors": len(low.report.errors),
        "counts": low.report.counts(),
    }


def _positive(text: str) -> float:
    """A bound: a positive number."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _within(args: argparse.Namespace, process_s: float, peak_rss_gb: float) -> bool | None:
    """Whether the run stayed within the bounds given (None: no bound given)."""
    if args.max_s is None and args.max_rss_gb is None:
        return None
    time_ok = args.max_s is None or process_s <= args.max_s
    return time_ok and (args.max_rss_gb is None or peak_rss_gb <= args.max_rss_gb)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-32b")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--no-baseline", action="store_true", help="skip the full-export baseline")
    p.add_argument("--max-s", type=_positive, help="a bound on process_s to report against")
    p.add_argument("--max-rss-gb", type=_positive, help="a bound on the peak RSS (GB)")
    p.add_argument("--only-baseline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    _quiet()
    if args.only_baseline:
        print(json.dumps(measure(args.preset, args.seq, repeat=False)))
        return 0
    import torch  # noqa: F401  (imports are not part of the check's time)

    import anefx  # noqa: F401

    import_s = time.perf_counter() - T_START
    rec = measure(args.preset, args.seq, repeat=True)
    process_s = time.perf_counter() - T_START  # before the baseline child starts
    base = None
    if not args.no_baseline:
        child = subprocess.run(
            [sys.executable, __file__, "--preset", args.preset, "--seq", str(args.seq)]
            + ["--only-baseline"],
            capture_output=True,
            text=True,
        )
        if child.returncode == 0:
            base = json.loads(child.stdout.strip().splitlines()[-1])
        else:
            print(child.stderr[-2000:], file=sys.stderr)

    print(f"structural check of preset:{args.preset} on the meta device (seq {args.seq})")
    print(
        f"  anefx     {rec['wall_s']:7.2f} s   peak RSS {rec['peak_rss_gb']:.2f} GB   exported "
        f"{rec['exported_layers']} of {rec['layers']} layers, {rec['nodes']} nodes, "
        f"{rec['errors']} error(s) {rec['counts']}"
    )
    print("            " + ", ".join(f"{k} {v:.2f} s" for k, v in rec["stage_s"].items()))
    print(f"            with the imports ({import_s:.2f} s): {process_s:.2f} s")
    within = _within(args, process_s, rec["peak_rss_gb"])
    if within is not None:
        bounds = [
            f"{args.max_s:g} s" if args.max_s else "",
            f"{args.max_rss_gb:g} GB" if args.max_rss_gb else "",
        ]
        print(
            f"  bound {', '.join(b for b in bounds if b)}: "
            f"{'within' if within else 'EXCEEDED'} ({process_s:.2f} s, {rec['peak_rss_gb']:.2f} GB)"
        )
    out = {
        "preset": args.preset,
        "seq": args.seq,
        "revision": git_revision(),
        "wall_s": rec["wall_s"],
        "peak_rss_gb": rec["peak_rss_gb"],
        "stage_s": rec["stage_s"],
        "import_s": round(import_s, 2),
        "process_s": round(process_s, 2),
        "max_s": args.max_s,
        "max_rss_gb": args.max_rss_gb,
        "within_bound": within,
        "exported_layers": rec["exported_layers"],
        "layers": rec["layers"],
        "nodes": rec["nodes"],
        "errors": rec["errors"],
    }
    if base:
        same = base["nodes"] == rec["nodes"] and base["counts"] == rec["counts"]
        ratio = rec["wall_s"] / base["wall_s"]
        print(
            f"  baseline  {base['wall_s']:7.2f} s   peak RSS {base['peak_rss_gb']:.2f} GB   "
            f"exported all {base['layers']} layers, {base['nodes']} nodes"
        )
        print("            " + ", ".join(f"{k} {v:.2f} s" for k, v in base["stage_s"].items()))
        print(f"  anefx / baseline time = {ratio:.3f}; same lowered graph size and report: {same}")
        out.update(
            {
                "baseline_wall_s": base["wall_s"],
                "baseline_peak_rss_gb": base["peak_rss_gb"],
                "baseline_stage_s": base["stage_s"],
                "ratio": round(ratio, 3),
                "same_report": same,
            }
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
