"""Benchmark: decode bytes per token of the stateful package, as converted and ideal, by context.

    .venv/bin/python benchmarks/cost.py --preset qwen3-0.6b [--contexts 512,2048,4096]
        [--batch 64] [--chip M4] [--parts] [--checkpoint]

For each context, the preset (seeded random weights: the bytes do not depend on the values) is
converted into a stateful package (``anefx.convert``: prefill of --batch tokens + decode, the KV
cache as Core ML state) in a temporary folder, and ``anefx cost`` counts one decode step:

- ``as_converted``: weights + state read + state written + carried states read (a hybrid's conv
  and delta-rule states, program inputs and outputs) + activations written, as the cost model
  counts them (targets/cost.py);
- ``ideal``: weights once + one read of the whole cache + the new rows written + the carried
  states read + the activations that are not cache-sized (the carried states written among
  them): what a step must move at the least;
- their ratio, the cache traffic (state read + written + cache-sized activations) against one
  cache read plus the new rows, and the ESTIMATED tokens/s of both on --chip (rule table);
- ``anefx cost``'s own ESTIMATE of a decode step and of a prefill call (bytes / bandwidth, or
  2 x MACs / peak ops when larger, plus the dispatch floor per part), with its inputs;

beside the decode rates ANEMLL and CoreML-LLM published (device-facts.md; measured on devices by
them, not here; other models or chips are context for the estimate, not a comparison).

``--parts`` converts as ``anefx convert -o FOLDER`` does (parts of at most 1024 MiB of weights,
the default; the dispatch floor is per part) instead of one package. ``--checkpoint`` first
writes the random fp16 weights as a checkpoint folder (streamed, shard by shard) and converts
from it, memory-mapped, as scale.py does: a model of several GB is then never held in memory
whole (a 4B preset converted directly holds its 8 GB of random weights).

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

# device-facts.md: decode rates measured on devices and published by their projects, each with
# its model (the preset of the same shapes), device and source; never recomputed here
PUBLISHED_SOURCE = "device-facts.md"
PUBLISHED = (
    ("CoreML-LLM", "Qwen3.5-0.8B", "qwen3.5-0.8b", "M4", 51.0, "john-rocky/CoreML-LLM"),
    ("CoreML-LLM", "Qwen3.5-2B", "qwen3.5-2b", "M4", 32.0, "john-rocky/CoreML-LLM"),
    ("CoreML-LLM", "Qwen3.5-0.8B", "qwen3.5-0.8b", "iPhone 17 Pro", 48.0, "john-rocky/CoreML-LLM"),
    ("CoreML-LLM", "Qwen3.5-2B", "qwen3.5-2b", "iPhone 17 Pro", 27.0, "john-rocky/CoreML-LLM"),
    ("ANEMLL", "Qwen3-4B context 1024", "qwen3-4b", "M1", 10.5, "anemll/anemll issue #33"),
)


def published_label(project: str, model: str, device: str, source: str) -> str:
    """How a published rate is named, in the summary and the JSON."""
    return f"{project} {model}, {device} ({source})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from anefx.core import rules
    from anefx.models.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--contexts", default="512,2048,4096")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chip", default=rules.DEFAULT_CHIP)
    p.add_argument(
        "--parts",
        action="store_true",
        help="convert into parts of at most 1024 MiB, as `anefx convert -o FOLDER` does",
    )
    p.add_argument(
        "--checkpoint",
        action="store_true",
        help="write the random weights as a checkpoint first and convert from it (less memory)",
    )
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


def measure(model: str, context: int, batch: int, chip, parts: bool = False) -> dict:
    """Convert MODEL (preset:NAME or a checkpoint folder) at CONTEXT into a temporary folder
    (one package, or PARTS as `anefx convert -o FOLDER` writes them) and count one decode step
    and one prefill call."""
    import anefx
    from anefx.conversion import DEFAULT_MAX_CHUNK_MB
    from anefx.targets.cost import artifact_cost

    with tempfile.TemporaryDirectory(prefix="anefx-bench-cost-") as work:
        out = Path(work) / ("decoder" if parts else "decoder.mlpackage")
        t0 = time.perf_counter()
        anefx.convert(
            model,
            out,
            context=context,
            batch=batch,
            max_chunk_mb=DEFAULT_MAX_CHUNK_MB if parts else 1e9,
        )
        convert_s = time.perf_counter() - t0
        cost = artifact_cost(out, verify=False)
        sig_states = _state_bytes(out)
    dec, pre = cost.total("decode"), cost.total("prefill")
    new_rows = sig_states // context  # one position of every layer's K and V
    other = dec.activations_written - dec.state_sized_written
    # the carried states are read at every step (their writes are among the activations)
    ideal = dec.weight_bytes + sig_states + new_rows + dec.carried_read + other
    cache_traffic = dec.state_read + dec.state_written + dec.state_sized_written
    gbps = chip.ane_gbps * 1e9
    est = cost.estimate(chip)
    return {
        "context": context,
        "convert_s": round(convert_s, 1),
        "parts": cost.parts,
        "decode_ops": dec.ops,
        "weights": dec.weight_bytes,
        "cache": sig_states,
        "state_read": dec.state_read,
        "state_written": dec.state_written,
        "carried_read": dec.carried_read,
        "carried_written": dec.carried_written,
        "cache_sized_activations_written": dec.state_sized_written,
        "other_activations_written": other,
        "as_converted": dec.moved,
        "ideal": ideal,
        "ratio": round(dec.moved / ideal, 3),
        "cache_traffic": cache_traffic,
        "cache_traffic_ratio": round(cache_traffic / (sig_states + new_rows), 3),
        "est_tok_s_as_converted": round(gbps / dec.moved, 1),
        "est_tok_s_ideal": round(gbps / ideal, 1),
        # anefx cost's estimate of each function (its inputs: the bytes and MACs above, the
        # chip's bandwidth and peak ops, the dispatch floor per part)
        "prefill_moved": pre.moved,
        "prefill_macs": pre.macs,
        "decode_macs": dec.macs,
        "estimate": {name: _rounded(e) for name, e in est.items()},
    }


def _rounded(estimate: dict) -> dict:
    """anefx cost's estimate of one function, tokens/s to 0.01 (the seconds as computed: a
    tiny model's are microseconds; None stays None)."""
    rate = estimate.get("tokens_per_s")
    return {**estimate, "tokens_per_s": round(rate, 2) if rate is not None else None}


def _state_bytes(artifact: Path) -> int:
    """Bytes of every state of the decode function (the whole cache), over every part."""
    from anefx.targets.mil_program import stored_bytes, tensor_shape
    from anefx.targets.reader import artifact_kind, read_manifest, read_spec

    if artifact_kind(artifact) == "parts":
        files = [artifact / p["file"] for p in read_manifest(artifact)["parts"]]
    else:
        files = [artifact]
    total = 0
    for file in files:
        spec = read_spec(file)
        for inp in spec.mlProgram.functions["decode"].inputs:
            if inp.type.WhichOneof("type") == "stateType":
                shape, dtype, _ = tensor_shape(inp.type.stateType.wrappedType.tensorType)
                total += stored_bytes(shape, dtype)
    return total


def write_checkpoint(preset: str, folder: Path) -> float:
    """The preset's seeded random fp16 weights as a checkpoint folder (as scale.py writes it);
    the seconds it took."""
    import torch

    from anefx.models.presets import get_preset
    from anefx.models.synthetic import write_random_checkpoint

    t0 = time.perf_counter()
    write_random_checkpoint(folder, get_preset(preset), dtype=torch.float16, seed=0)
    return time.perf_counter() - t0


def render(args: argparse.Namespace, chip, rows: list[dict], checkpoint_s: float | None) -> str:
    """The tables: bytes per decode step, anefx cost's estimates, the published rates."""
    from anefx.core import rules

    parts = sorted({r["parts"] for r in rows})
    how = f"{'/'.join(map(str, parts))} part(s)" if args.parts else "one package"
    made = f"; weights via a checkpoint written in {checkpoint_s:.1f} s" if checkpoint_s else ""
    lines = [
        f"decode bytes per token, preset:{args.preset}, batch {args.batch}, {how}{made}",
        f"  (ESTIMATES on {chip.name}:",
        f"  {chip.ane_gbps:g} GB/s ANE read bandwidth, {chip.source})",
        f"  {'context':>8}{'as converted MB':>17}{'ideal MB':>10}{'ratio':>7}"
        f"{'cache traffic':>15}{'est tok/s':>11}{'ideal tok/s':>13}",
    ]
    for r in rows:
        lines.append(
            f"  {r['context']:>8}{r['as_converted'] / 1e6:>17,.1f}{r['ideal'] / 1e6:>10,.1f}"
            f"{r['ratio']:>7.3f}{r['cache_traffic_ratio']:>14.2f}x"
            f"{r['est_tok_s_as_converted']:>11.1f}{r['est_tok_s_ideal']:>13.1f}"
        )
    if any(r["carried_read"] for r in rows):  # a hybrid's conv and delta-rule states
        lines.append(
            "  of which carried states (program inputs and outputs): "
            + "; ".join(
                f"context {r['context']}: read {r['carried_read'] / 1e6:,.2f} MB, written "
                f"{r['carried_written'] / 1e6:,.2f} MB"
                for r in rows
            )
        )
    tops = f", {chip.ane_tops:g} TOPS peak" if chip.ane_tops else ""
    lines += [
        f"  anefx cost ESTIMATE per call on {chip.name} (inputs: bytes moved / "
        f"{chip.ane_gbps:g} GB/s, or 2 x MACs / peak ops{tops} when larger, + "
        f"{rules.DISPATCH_FLOOR_S * 1e6:g} us per part):",
        f"  {'context':>8}{'decode MB':>11}{'decode ms':>11}{'decode tok/s':>14}"
        f"{'prefill MB':>12}{'prefill GMACs':>15}{'prefill ms':>12}{'prefill tok/s':>15}",
    ]
    for r in rows:
        d, p = r["estimate"]["decode"], r["estimate"]["prefill"]
        lines.append(
            f"  {r['context']:>8}{r['as_converted'] / 1e6:>11,.1f}{_ms(d['seconds']):>11}"
            f"{_num(d['tokens_per_s']):>14}{r['prefill_moved'] / 1e6:>12,.1f}"
            f"{r['prefill_macs'] / 1e9:>15,.1f}{_ms(p['seconds']):>12}"
            f"{_num(p['tokens_per_s']):>15}"
        )
    lines.append(
        f"  published decode rates (measured on devices by their projects, not here; "
        f"{PUBLISHED_SOURCE}):"
    )
    for project, model, preset, device, rate, source in PUBLISHED:
        same = preset == args.preset
        mark = (
            "  <- this model on this chip"
            if same and device == chip.name
            else ("  <- this model, another device" if same else "")
        )
        lines.append(f"    {published_label(project, model, device, source)}: {rate:g} tok/s{mark}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:,.2f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def main(argv: list[str] | None = None) -> int:
    from anefx.core import rules

    args = parse_args(argv)
    _quiet()
    chip = rules.CHIPS[args.chip]
    rows = []
    checkpoint_s = None
    with tempfile.TemporaryDirectory(prefix="anefx-bench-cost-ckpt-") as tmp:
        model = f"preset:{args.preset}"
        if args.checkpoint:
            folder = Path(tmp) / args.preset
            checkpoint_s = write_checkpoint(args.preset, folder)
            model = str(folder)
        for context in args.contexts:
            rows.append(measure(model, context, args.batch, chip, args.parts))
    print(render(args, chip, rows, checkpoint_s))
    print(f"  peak RSS of this process (conversions included): {peak_rss_gb():.2f} GB")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "batch": args.batch,
                "chip": chip.name,
                "ane_gbps": chip.ane_gbps,
                "ane_tops": chip.ane_tops,
                "chip_source": chip.source,
                "dispatch_floor_s": rules.DISPATCH_FLOOR_S,
                "ESTIMATE": True,
                "parts_mode": args.parts,
                "checkpoint_s": round(checkpoint_s, 1) if checkpoint_s else None,
                "revision": git_revision(),
                "peak_rss_gb": peak_rss_gb(),
                "contexts": rows,
                "published_tok_s": {
                    published_label(project, model, device, source): rate
                    for project, model, _, device, rate, source in PUBLISHED
                },
                "published_source": PUBLISHED_SOURCE,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
