"""Benchmark: decode bytes per token of the stateful package, as converted and ideal, by context.

    .venv/bin/python benchmarks/cost.py --preset qwen3-0.6b [--contexts 512,2048,4096]
        [--batch 64] [--chip M4]

For each context, the preset (seeded random weights: the bytes do not depend on the values) is
converted into a stateful package (``anefx.convert``: prefill of --batch tokens + decode, the KV
cache as Core ML state) in a temporary folder, and ``anefx cost`` counts one decode step:

- ``as_converted``: weights + state read + state written + activations written, as the cost
  model counts them (targets/cost.py);
- ``ideal``: weights once + one read of the whole cache + the new rows written + the
  activations that are not cache-sized (what a step must move at the least);
- their ratio, the cache traffic (state read + written + cache-sized activations) against one
  cache read plus the new rows, and the ESTIMATED tokens/s of both on --chip (rule table),
  beside the decode rates ANEMLL and CoreML-LLM published (device-facts.md; other models and
  chips: context for the estimate, not a comparison).

Printed: a readable summary, then as the LAST line one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from convert import _quiet, git_revision, peak_rss_gb

# device-facts.md: published decode rates (tokens/s), each with its model, chip and source
PUBLISHED = {
    "CoreML-LLM Qwen3.5-0.8B, M4": 51.0,
    "CoreML-LLM Qwen3.5-2B, M4": 32.0,
    "ANEMLL Qwen3-4B context 1024, M1 (issue #33)": 10.5,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from anefx.core import rules
    from anefx.models.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--contexts", default="512,2048,4096")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chip", default=rules.DEFAULT_CHIP)
    args = p.parse_args(argv)
    # every argument checked before the first conversion
    if args.preset not in PRESETS:
        p.error(f"--preset: unknown preset {args.preset!r}")
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts must be comma-separated integers: {args.contexts!r}")
    if not args.contexts or min(args.contexts) < 1:
        p.error("--contexts must be positive")
    if args.batch < 1 or args.batch > min(args.contexts):
        p.error(f"--batch must be 1..{min(args.contexts)} (the smallest context)")
    if args.chip not in rules.CHIPS or rules.CHIPS[args.chip].ane_gbps is None:
        p.error(f"--chip must be a chip of the table with a bandwidth figure: {list(rules.CHIPS)}")
    return args


def measure(preset: str, context: int, batch: int, chip) -> dict:
    import anefx
    from anefx.targets.cost import artifact_cost

    with tempfile.TemporaryDirectory(prefix="anefx-bench-cost-") as tmp:
        out = Path(tmp) / "decoder.mlpackage"
        t0 = time.perf_counter()
        anefx.convert(f"preset:{preset}", out, context=context, batch=batch, max_chunk_mb=1e9)
        convert_s = time.perf_counter() - t0
        cost = artifact_cost(out, verify=False)
        sig_states = _state_bytes(out)
    dec = cost.total("decode")
    new_rows = sig_states // context  # one position of every layer's K and V
    other = dec.activations_written - dec.state_sized_written
    ideal = dec.weight_bytes + sig_states + new_rows + other
    cache_traffic = dec.state_read + dec.state_written + dec.state_sized_written
    gbps = chip.ane_gbps * 1e9
    return {
        "context": context,
        "convert_s": round(convert_s, 1),
        "decode_ops": dec.ops,
        "weights": dec.weight_bytes,
        "cache": sig_states,
        "state_read": dec.state_read,
        "state_written": dec.state_written,
        "cache_sized_activations_written": dec.state_sized_written,
        "other_activations_written": other,
        "as_converted": dec.moved,
        "ideal": ideal,
        "ratio": round(dec.moved / ideal, 3),
        "cache_traffic": cache_traffic,
        "cache_traffic_ratio": round(cache_traffic / (sig_states + new_rows), 3),
        "est_tok_s_as_converted": round(gbps / dec.moved, 1),
        "est_tok_s_ideal": round(gbps / ideal, 1),
    }


def _state_bytes(package: Path) -> int:
    """Bytes of every state of the decode function (the whole cache), from the package."""
    from anefx.targets.mil_program import stored_bytes, tensor_shape
    from anefx.targets.reader import read_spec

    spec = read_spec(package)
    total = 0
    for inp in spec.mlProgram.functions["decode"].inputs:
        if inp.type.WhichOneof("type") == "stateType":
            shape, dtype, _ = tensor_shape(inp.type.stateType.wrappedType.tensorType)
            total += stored_bytes(shape, dtype)
    return total


def main(argv: list[str] | None = None) -> int:
    from anefx.core import rules

    args = parse_args(argv)
    _quiet()
    chip = rules.CHIPS[args.chip]
    rows = []
    for context in args.contexts:
        rows.append(measure(args.preset, context, args.batch, chip))
    print(f"decode bytes per token, preset:{args.preset}, batch {args.batch}")
    print(f"  (ESTIMATES on {chip.name}:")
    print(f"  {chip.ane_gbps:g} GB/s ANE read bandwidth, {chip.source})")
    print(
        f"  {'context':>8}{'as converted MB':>17}{'ideal MB':>10}{'ratio':>7}"
        f"{'cache traffic':>15}{'est tok/s':>11}{'ideal tok/s':>13}"
    )
    for r in rows:
        print(
            f"  {r['context']:>8}{r['as_converted'] / 1e6:>17,.1f}{r['ideal'] / 1e6:>10,.1f}"
            f"{r['ratio']:>7.3f}{r['cache_traffic_ratio']:>14.2f}x"
            f"{r['est_tok_s_as_converted']:>11.1f}{r['est_tok_s_ideal']:>13.1f}"
        )
    print("  published decode rates (other models or chips; device-facts.md):")
    for name, rate in PUBLISHED.items():
        print(f"    {name}: {rate:g} tok/s")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "batch": args.batch,
                "chip": chip.name,
                "ane_gbps": chip.ane_gbps,
                "ESTIMATE": True,
                "revision": git_revision(),
                "peak_rss_gb": peak_rss_gb(),
                "contexts": rows,
                "published_tok_s": PUBLISHED,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
