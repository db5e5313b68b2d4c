"""Benchmark: decode speed of the lowered stateful graphs vs transformers' generate, same weights.

    .venv/bin/python benchmarks/decode.py --preset qwen3-0.6b [--context 512] [--batch 64]
        [--tokens 32] [--prompt-len 16] [--dtype float16]

One process, one model: the preset is loaded once with seeded random weights, and the same
object is lowered (``lower_decoder``) and run by transformers. Both sides produce --tokens new
tokens greedily from the same random prompt; the first comes from the prefill, the other
tokens - 1 each from one decode step, and only those steps are timed:

- anefx: ``Session(dec).generate(prompt, max_new_tokens=N)`` with an ``on_token`` callback that
  records when each token is chosen; decode time = last token's time - first token's time
  (N - 1 calls of the lowered decode graph, S = 1, KV cache as state, run by torch on the CPU).
- transformers: ``model.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False)``
  with its own dynamic cache; decode time = time(generate N) - time(generate 1), i.e. N - 1
  decode steps including generate's per-token overhead (after one untimed warm-up call). A
  manual ``past_key_values`` loop is timed too (``hf_loop_tok_s``): the forward passes alone.

What a decode step would move on the ANE and the tokens/s that allows are not counted here: the
one cost model reads them off the emitted package (``anefx cost``, ``benchmarks/cost.py``).

Printed: a readable summary, then as the LAST line one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from convert import _quiet, check_state_outputs, git_revision, peak_rss_gb

DTYPES = ("float16", "float32")
PACKAGE_ELEM_BYTES = 2  # the Core ML package is fp16 whatever dtype the CPU run uses


def load(preset: str, dtype_name: str, seed: int):
    """The stock transformers model with seeded random weights, and its load time."""
    import torch

    from anefx.models.load import load_model

    t0 = time.perf_counter()
    loaded = load_model(f"preset:{preset}", dtype=getattr(torch, dtype_name), seed=seed)
    return loaded.model, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the two runs


def run_anefx(dec, prompt: list[int], n: int) -> dict:
    """Session.generate on the lowered graphs; the decode steps timed through on_token."""
    from anefx.generation import Session

    stamps: list[float] = []
    s = Session(dec)
    t0 = time.perf_counter()
    stamp = lambda _token: stamps.append(time.perf_counter())
    tokens = s.generate(prompt, max_new_tokens=n, on_token=stamp)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "tokens": tokens,
        "prefill_s": stamps[0] - t0,  # the prefill graph(s) + the first token
        "decode_s": stamps[-1] - stamps[0],
        "steps": len(steps),
        "step_ms_median": 1e3 * statistics.median(steps) if steps else float("nan"),
    }


def run_hf(model, prompt: list[int], n: int) -> dict:
    """transformers' generate (N vs 1 new tokens) and a manual past_key_values loop."""
    import torch

    ids = torch.tensor([prompt])

    def gen(k: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
        return time.perf_counter() - t0, out[0, len(prompt) :].tolist()

    gen(1)  # warm-up: one-off costs of the first call
    t1 = min(gen(1)[0] for _ in range(2))
    tn, tokens = gen(n)
    # the forward passes alone: prefill, then N - 1 single-token steps on its dynamic cache
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        pkv, tok = out.past_key_values, int(out.logits[0, -1].float().argmax())
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
            pkv, tok = out.past_key_values, int(out.logits[0, -1].float().argmax())
        loop_s = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "prefill_s": t1,
        "decode_s": tn - t1,
        "generate_n_s": tn,
        "loop_decode_s": loop_s,
    }


def _leading_equal(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


# ---------------------------------------------------------------------------------------------
# report


def summarise(args, load_s, lower_s, dec, a, h) -> dict:
    steps = args.tokens - 1
    anefx_tok_s = steps / a["decode_s"]
    hf_tok_s = steps / h["decode_s"]
    return {
        "preset": args.preset,
        "context": args.context,
        "batch": args.batch,
        "tokens": args.tokens,
        "prompt_len": args.prompt_len,
        "dtype": args.dtype,
        "seed": args.seed,
        "revision": git_revision(),
        "decode_steps": steps,
        "anefx_tok_s": round(anefx_tok_s, 3),
        "hf_tok_s": round(hf_tok_s, 3),
        "ratio": round(anefx_tok_s / hf_tok_s, 3),
        "hf_loop_tok_s": round(steps / h["loop_decode_s"], 3),
        "hf_method": "time(generate N) - time(generate 1), N - 1 decode steps",
        "anefx_step_ms_median": round(a["step_ms_median"], 2),
        "anefx_prefill_s": round(a["prefill_s"], 2),
        "hf_prefill_s": round(h["prefill_s"], 2),
        "tokens_match": _leading_equal(a["tokens"], h["tokens"]),
        "load_s": round(load_s, 2),
        "lower_s": round(lower_s, 2),
        "lower_stage_s": {
            f: {k: round(v, 2) for k, v in low.seconds.items() if k != "load"}
            for f, low in (("prefill", dec.prefill), ("decode", dec.decode))
        },
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def render(rec: dict) -> str:
    steps = rec["decode_steps"]
    return "\n".join(
        [
            f"decode speed: {rec['preset']}, {rec['dtype']} random weights (seed {rec['seed']}), "
            f"context {rec['context']}, prefill batch {rec['batch']}, prompt "
            f"{rec['prompt_len']} tokens, {rec['tokens']} new tokens ({steps} decode steps timed)",
            f"  revision {rec['revision']}; load {rec['load_s']:.2f} s, lower_decoder "
            f"{rec['lower_s']:.2f} s, peak RSS {rec['peak_rss_gb']:.2f} GB",
            "",
            "  measured on this CPU (torch, one process, the same model object)",
            f"    anefx lowered decode graph   {rec['anefx_tok_s']:8.2f} tok/s   "
            f"(median step {rec['anefx_step_ms_median']:.1f} ms; prefill + first token "
            f"{rec['anefx_prefill_s']:.2f} s)",
            f"    transformers generate        {rec['hf_tok_s']:8.2f} tok/s   "
            f"(generate N - generate 1; generate 1 = {rec['hf_prefill_s']:.2f} s)",
            f"    transformers forward loop    {rec['hf_loop_tok_s']:8.2f} tok/s   "
            "(manual past_key_values loop, no generate overhead)",
            f"    anefx / transformers = {rec['ratio']:.3f}; greedy tokens equal for the first "
            f"{rec['tokens_match']} of {rec['tokens']}",
            "  (bytes per step and the ANE ESTIMATE: anefx cost / benchmarks/cost.py)",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from anefx.cli import int_range
    from anefx.core.rules import DIM_LIMITS
    from anefx.models.presets import PRESETS

    # the ranges lower_decoder checks, checked here first: before the load, not after it
    width = DIM_LIMITS["W"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default="qwen3-0.6b", choices=PRESETS, help="model preset (random weights)"
    )
    p.add_argument(
        "--context", type=int_range(1, width), default=512, help="KV cache length (default 512)"
    )
    p.add_argument(
        "--batch", type=int_range(1, width), default=64, help="prefill batch (default 64)"
    )
    p.add_argument("--tokens", type=int, default=32, help="new tokens per side (default 32)")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt length (16)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help="weights and compute dtype of BOTH runs (default float16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    args = p.parse_args(argv)
    if args.tokens < 2:
        p.error("--tokens must be at least 2 (the first token comes from the prefill)")
    if args.prompt_len < 1 or args.prompt_len + args.tokens > args.context:
        p.error("need 1 <= --prompt-len and --prompt-len + --tokens <= --context")
    if args.batch > args.context:
        p.error(f"--batch {args.batch} must not exceed --context {args.context}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    import torch

    from anefx.generation import lower_decoder

    model, load_s = load(args.preset, args.dtype, args.seed)
    t0 = time.perf_counter()
    dec = lower_decoder(model, args.batch, args.context, dtype=getattr(torch, args.dtype))
    lower_s = time.perf_counter() - t0
    try:
        check_state_outputs(dec.prefill, "prefill")
        check_state_outputs(dec.decode, "decode")
    except RuntimeError as exc:
        raise SystemExit(f"decode benchmark: {exc}") from None
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
    a = run_anefx(dec, prompt, args.tokens)
    h = run_hf(model, prompt, args.tokens)
    rec = summarise(args, load_s, lower_s, dec, a, h)
    print(render(rec))
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
