"""Benchmark: `anefx verify` on the stateful package of a preset (one prefill, 8 decode steps).

    .venv/bin/python benchmarks/verify.py --preset qwen3-0.6b [--context 512] [--batch 64]
        [--prompt-len 16] [--steps 9] [--package PATH]

Without --package, the preset (seeded random weights) is lowered (``lower_decoder``) and
emitted as the two-function package first; that conversion is timed apart (``convert_s``). Then
``verify`` runs the package's own program with the reference executor: a --prompt-len prompt
through the prefill function, then --steps - 1 decode steps (teacher-forced on transformers'
greedy tokens), comparing --steps logits vectors with transformers fp32. ``wall_s`` is that
verification, from reading the package to the result (it includes loading the checkpoint into
transformers and its generate). Baseline in the same run: the same calls on the lowered fx
graphs in torch (``Session``), ``baseline_torch_s``.

Printed: a readable summary, then as the LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from convert import _quiet, git_revision, peak_rss_gb


def main() -> int:
    from anefx.cli import int_range
    from anefx.core.rules import DIM_LIMITS
    from anefx.models.limits import MAX_STEPS
    from anefx.models.presets import PRESETS

    # what verify checks once the package exists, checked here first: a bad value fails at
    # once, not after converting the preset
    width = DIM_LIMITS["W"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-0.6b", choices=PRESETS)
    p.add_argument("--context", type=int_range(1, width), default=512)
    p.add_argument("--batch", type=int_range(1, width), default=64)
    p.add_argument("--prompt-len", type=int_range(1), default=16)
    p.add_argument(
        "--steps",
        type=int_range(1, MAX_STEPS),
        default=9,
        help="compared tokens: 1 prefill + N-1 decode",
    )
    p.add_argument("--package", help="verify this package instead of converting the preset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.package is None and args.batch > args.context:
        p.error(f"--batch {args.batch} must not exceed --context {args.context}")
    if args.package is None and args.prompt_len + args.steps - 1 > args.context:
        p.error(
            f"--prompt-len + --steps - 1 = {args.prompt_len + args.steps - 1} tokens exceed "
            f"--context {args.context}"
        )
    _quiet()
    import torch

    from anefx.generation import Session, lower_decoder
    from anefx.models.presets import get_preset
    from anefx.targets.coreml import emit_functions
    from anefx.targets.verify import verify

    model = f"preset:{args.preset}"
    g = torch.Generator().manual_seed(args.seed)
    vocab = get_preset(args.preset)["vocab_size"]
    ids = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    convert_s, baseline_s, dec = None, None, None
    tmp = None
    package = args.package
    if package is None:
        tmp = tempfile.TemporaryDirectory(prefix="anefx-verify-")
        package = str(Path(tmp.name) / f"{args.preset}.mlpackage")
        t0 = time.perf_counter()
        dec = lower_decoder(
            model, batch=args.batch, context=args.context, dtype=torch.float16, seed=args.seed
        )
        emit_functions({"prefill": dec.prefill, "decode": dec.decode}, package, default="decode")
        convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = verify(package, model, ids=ids, steps=args.steps, seed=args.seed)
    wall = time.perf_counter() - t0
    rss = peak_rss_gb()
    if dec is not None:
        # the same calls on the lowered graphs: prompt through prefill, then single steps
        t0 = time.perf_counter()
        s = Session(dec)
        s.feed_all(ids)
        for t in r.tokens_reference[:-1]:
            s.feed_all([t])
        baseline_s = time.perf_counter() - t0

    print(f"verify {args.preset} stateful package (context {args.context}, batch {args.batch})")
    print(
        f"  prompt {args.prompt_len} tokens: 1 prefill call + {args.steps - 1} decode steps, "
        f"{args.steps} logits vectors compared"
    )
    print(f"  verify wall {wall:.1f} s (peak RSS {rss:.2f} GB)", end="")
    print(f"; conversion before it {convert_s:.1f} s" if convert_s else "")
    print(f"  lowest PSNR {r.psnr_db:.1f} dB, top-1 agreement {r.top1_agreement:.3f}")
    out = {
        "preset": args.preset,
        "revision": git_revision(),
        "context": args.context,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "psnr_db": round(r.psnr_db, 2),
        "top1_agreement": r.top1_agreement,
        "convert_s": round(convert_s, 2) if convert_s else None,
        "peak_rss_gb": round(rss, 2),
    }
    if baseline_s is not None:
        print(
            f"  baseline: the same calls on the lowered graphs in torch {baseline_s:.1f} s; "
            f"verify / baseline = {wall / baseline_s:.2f}"
        )
        out.update({"baseline_torch_s": round(baseline_s, 2), "ratio": round(wall / baseline_s, 3)})
    out["wall_s"] = round(wall, 2)
    print(json.dumps(out))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
