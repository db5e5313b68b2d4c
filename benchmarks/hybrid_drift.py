"""Benchmark: does a Qwen3.5 hybrid's fp16 state drift over a long sequence?

    .venv/bin/python benchmarks/hybrid_drift.py [--preset qwen3.5-tiny] [--layers N]
        [--vocab V] [--tokens 512] [--window 64] [--batch 64] [--decay stock|D]
        [--paths decode,prefill] [--seed 0]

A random Qwen3.5 (the preset's shapes; --layers and --vocab cut a published preset down to a
few layers and a narrow head, keeping its real head dims: ``--preset qwen3.5-0.8b --layers 4
--vocab 8192`` has 16 x 128 delta-rule heads and 256-wide attention heads) is lowered twice with
``generation.lower_decoder``, fp16 and fp32, with a context of --tokens. One random sequence of
--tokens ids is fed teacher-forced through a ``Session`` of each:

- path ``decode``: every token as one decode step (S = 1), the recurrence applied --tokens
  times to the fp16 states: where drift would accumulate;
- path ``prefill``: ``Session.feed_all`` of each window (prefill calls of up to --batch tokens,
  the chunked delta rule, the states handed from call to call).

Both are compared with transformers in fp32, fed window by window with its own cache (equal to
one forward over the sequence to rounding), whose cache holds the reference states: per window
of --window positions, the logits PSNR (fp16, and fp32 as the control: the lowering itself),
the fp16 top-1 agreement, and the lowest PSNR over the layers of the delta-rule (recurrent)
state after the window's last token; at the end, every linear-attention layer's delta-rule and
conv state. No drift means a flat PSNR over the windows.

The decay of the delta rule decides how long an error stays in the state: ``--decay stock``
keeps transformers' own initialisation (A uniform in [0.01, 16], dt_bias 1: a per-token decay
exp(-A softplus(a + 1)), most heads forgetting within a few tokens); ``--decay D`` sets every
head's A_log and dt_bias so that the decay is D per token where in_proj_a gives a = 0 (it varies
with a around D), to hold state over hundreds of tokens. The norm weights are drawn around
their init (N(0, 0.2)), as tests/test_qwen3_5.py does, so that no norm is the identity.

Printed: a readable summary, then as the LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from convert import _quiet, git_revision, peak_rss_gb

PATHS = ("decode", "prefill")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from anefx.cli import int_range
    from anefx.models.families import FAMILIES
    from anefx.models.presets import PRESETS

    # the presets with linear-attention layers, by their family's count of them
    hybrids = [n for n, c in PRESETS.items() if FAMILIES[c["model_type"]].linear_attention(c)[0]]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3.5-tiny", choices=hybrids)
    p.add_argument("--layers", type=int_range(1, 64), help="keep only the first N layers")
    p.add_argument("--vocab", type=int_range(2, 1 << 20), help="a narrower vocabulary")
    p.add_argument("--tokens", type=int_range(2, 1 << 14), default=512, help="sequence length")
    p.add_argument("--window", type=int_range(1, 1 << 14), default=64, help="positions per row")
    p.add_argument("--batch", type=int_range(1, 1 << 14), default=64, help="prefill batch")
    p.add_argument("--decay", default="stock", help="'stock' or a per-token decay in (0, 1)")
    p.add_argument("--paths", default=",".join(PATHS), help="decode, prefill or both")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the ids")
    args = p.parse_args(argv)
    # every argument checked before a model is built
    if args.decay != "stock":
        try:
            args.decay = float(args.decay)
        except ValueError:
            p.error(f"--decay must be 'stock' or a number in (0, 1): {args.decay!r}")
        if not 0.0 < args.decay < 1.0:
            p.error(f"--decay must be 'stock' or a number in (0, 1): {args.decay!r}")
    args.paths = [x for x in args.paths.split(",") if x]
    if not args.paths or set(args.paths) - set(PATHS):
        p.error(f"--paths must name some of {', '.join(PATHS)}: {','.join(args.paths)!r}")
    if args.batch > args.tokens:
        p.error(f"--batch {args.batch} must not exceed --tokens {args.tokens}")
    if args.window > args.tokens:
        p.error(f"--window {args.window} must not exceed --tokens {args.tokens}")
    return args


def build_model(args: argparse.Namespace):
    """The random transformers model: the preset's config (cut to --layers / --vocab),
    transformers' own initialisation, then the norms and (with --decay D) the decay set."""
    import torch

    from anefx.models.families import FAMILIES
    from anefx.models.presets import get_preset

    raw = get_preset(args.preset)
    family = FAMILIES[raw.pop("model_type")]
    raw.pop("architectures", None)
    if args.layers is not None:
        if args.layers > raw["num_hidden_layers"]:
            raise SystemExit(
                f"--layers {args.layers}: {args.preset} has {raw['num_hidden_layers']} layers"
            )
        raw["num_hidden_layers"] = args.layers
        raw["layer_types"] = raw["layer_types"][: args.layers]
    if args.vocab is not None:
        raw["vocab_size"] = args.vocab
        # end and padding ids inside the narrower vocabulary (they are not used here)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(raw.get(key), int) and raw[key] >= args.vocab:
                raw[key] = args.vocab - 1
    config = family.config_cls()(**raw)
    torch.manual_seed(args.seed)
    model = family.model_cls()(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # zero-centred (or 1) at init: vary them
                p.normal_(0, 0.2)
        if args.decay != "stock":
            # decay exp(g), g = -exp(A_log) softplus(a + dt_bias): with dt_bias 0, softplus(0)
            # = ln 2, so A = -ln(D) / ln 2 gives D where a = 0
            for module in model.modules():
                if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
                    module.dt_bias.zero_()
                    module.A_log.fill_(math.log(-math.log(args.decay) / math.log(2.0)))
    return model


def psnr(ref, out) -> float:
    """PSNR of OUT against REF: peak |REF| over the RMS error, in dB (inf when equal)."""
    err = (ref.double() - out.double()).pow(2).mean().sqrt().item()
    if not math.isfinite(err):
        return float("nan")
    return math.inf if err == 0 else 20 * math.log10(ref.abs().max().item() / err)


def _db(v: float) -> float | str | None:
    """A PSNR for JSON, whose numbers are finite: None for equal (inf), "nan" for a NaN (a
    non-finite output: not to be taken for a number)."""
    if math.isnan(v):
        return "nan"
    return round(v, 2) if math.isfinite(v) else None


def run_path(dec, path: str, ids: list[int], windows: list[tuple[int, int]], carried):
    """Feed IDS through a fresh Session of DEC by PATH, window by window: the logits (n, V)
    and, at the end of each window, the CARRIED states by name."""
    import torch

    from anefx.generation import Session

    session = Session(dec)
    index = {s.name: i for i, s in enumerate(dec.decode.signature.states)}
    logits, states = [], []
    for a, b in windows:
        if path == "decode":
            logits += [session.feed([t])[None] for t in ids[a:b]]
        else:
            logits.append(session.feed_all(ids[a:b]))
        states.append({s.name: session.states[index[s.name]].clone() for s in carried})
    return torch.cat(logits), states


def reference(model, ids: list[int], windows: list[tuple[int, int]], carried):
    """transformers fp32 fed window by window with its own cache (equal to one forward to
    rounding): the logits (n, V) and the CARRIED states' values at the end of each window."""
    import torch

    cache, logits, states = None, [], []
    with torch.no_grad():
        for a, b in windows:
            out = model(input_ids=torch.tensor([ids[a:b]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0].float())
            states.append({s.name: reference_state(cache, s) for s in carried})
    return torch.cat(logits), states


def measure(args: argparse.Namespace) -> dict:
    import torch

    from anefx.generation import lower_decoder
    from anefx.models.families import FAMILIES

    t0 = time.perf_counter()
    model = build_model(args)
    config = model.config
    kinds = FAMILIES[config.model_type].layer_kinds(config)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.tokens,), generator=gen).tolist()
    windows = [(a, min(a + args.window, args.tokens)) for a in range(0, args.tokens, args.window)]

    t = time.perf_counter()
    decoders = {
        name: lower_decoder(model, batch=args.batch, context=args.tokens, dtype=dtype)
        for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32))
    }
    lower_s = time.perf_counter() - t
    carried = decoders["fp32"].decode.signature.carried
    recurrent = [s.name for s in carried if s.kind == "recurrent"]

    t = time.perf_counter()
    ref_logits, ref_states = reference(model, ids, windows, carried)
    reference_s = time.perf_counter() - t

    paths = {}
    for path in args.paths:
        t = time.perf_counter()
        outs = {name: run_path(dec, path, ids, windows, carried) for name, dec in decoders.items()}
        seconds = time.perf_counter() - t
        rows = []
        for w, (a, b) in enumerate(windows):
            ref_w = ref_logits[a:b]
            row = {"start": a, "end": b - 1}
            for name, (logits, _) in outs.items():
                row[f"{name}_psnr_db"] = _db(psnr(ref_w, logits[a:b]))
            top1 = (outs["fp16"][0][a:b].float().argmax(-1) == ref_w.argmax(-1)).float()
            row["fp16_top1"] = round(top1.mean().item(), 3)
            # the delta-rule states after the window's last token: the lowest over the layers
            for name, (_, states) in outs.items():
                row[f"{name}_recurrent_psnr_min_db"] = _lowest(
                    [_db(psnr(ref_states[w][n], states[w][n])) for n in recurrent]
                )
            rows.append(row)
        end = {
            key: {
                name: _db(psnr(ref_states[-1][key], st[-1][key])) for name, (_, st) in outs.items()
            }
            for key in ref_states[-1]
        }
        fp16 = [r["fp16_psnr_db"] for r in rows]
        paths[path] = {
            "seconds": round(seconds, 1),
            "windows": rows,
            "states": end,
            "fp16_psnr_first_db": fp16[0],
            "fp16_psnr_last_db": fp16[-1],
            "fp16_psnr_min_db": _lowest(fp16),
            # last window against the first: negative when the fp16 logits drift away
            "fp16_drift_db": (
                round(fp16[-1] - fp16[0], 2)
                if all(isinstance(v, float) for v in (fp16[0], fp16[-1]))
                else None
            ),
            "fp16_recurrent_psnr_min_db": _lowest([end[n]["fp16"] for n in recurrent]),
        }
    return {
        "preset": args.preset,
        "layers": config.num_hidden_layers,
        "layer_kinds": kinds,
        "vocab": config.vocab_size,
        "linear_heads": [config.linear_num_key_heads, config.linear_num_value_heads],
        "linear_head_dims": [config.linear_key_head_dim, config.linear_value_head_dim],
        "head_dim": config.head_dim,
        "hidden": config.hidden_size,
        "decay": args.decay,
        "decay_range": _decay_range(model),
        "tokens": args.tokens,
        "window": args.window,
        "batch": args.batch,
        "seed": args.seed,
        "reference_s": round(reference_s, 1),
        "lower_s": round(lower_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "paths": paths,
    }


def reference_state(cache, state):
    """The value of carried STATE (a program's conv window or delta-rule state) in
    transformers' cache after the forward, fp32, in the program's shape: the delta-rule state
    as it is, the conv window as its last columns (the program keeps the K-1 inputs the next
    token needs; transformers may keep more)."""
    layer = state.layers[0]
    if state.kind == "recurrent":
        value = cache.get_recurrent_state(layer)
    elif state.kind == "conv":
        value = cache.get_conv_state(layer)
        value = value[..., value.shape[-1] - state.shape[-1] :]
    else:
        raise ValueError(f"{state.name}: no reference for a carried state of kind {state.kind!r}")
    # a copy: the cache updates its tensors in place on the next call
    return value.float().reshape(state.shape).clone()


def _lowest(values: list) -> float | str | None:
    """The lowest of PSNRs as _db gives them: "nan" if any is, None if all are exact."""
    if "nan" in values:
        return "nan"
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _decay_range(model) -> list[float]:
    """The smallest and largest per-token decay exp(-exp(A_log) softplus(dt_bias)) over the
    heads of every linear-attention layer, where in_proj_a gives a = 0."""
    import torch
    import torch.nn.functional as F

    decays = [
        torch.exp(-m.A_log.float().exp() * F.softplus(m.dt_bias.float()))
        for m in model.modules()
        if hasattr(m, "A_log") and hasattr(m, "dt_bias")
    ]
    every = torch.cat(decays)
    return [round(every.min().item(), 6), round(every.max().item(), 6)]


def _fmt(v: float | str | None) -> str:
    if v is None:
        return "exact"
    return "NaN" if v == "nan" else f"{v:.1f}"


def render(rec: dict) -> str:
    """The windows of every path, then the states at the end."""
    kinds = rec["layer_kinds"]
    lines = [
        f"fp16 drift of a random Qwen3.5 over {rec['tokens']} teacher-forced tokens: preset "
        f"{rec['preset']} cut to {rec['layers']} layers ({kinds.count('linear')} linear, "
        f"{kinds.count('full')} full), vocab {rec['vocab']}, hidden {rec['hidden']}",
        f"  delta rule: {rec['linear_heads'][0]} key / {rec['linear_heads'][1]} value heads of "
        f"{rec['linear_head_dims'][0]} x {rec['linear_head_dims'][1]}; attention head_dim "
        f"{rec['head_dim']}; decay {rec['decay']} (per token at a = 0: "
        f"{rec['decay_range'][0]:g} to {rec['decay_range'][1]:g})",
        f"  reference: transformers fp32 fed window by window ({rec['reference_s']} s); "
        "lowered fp16 and "
        f"fp32 with context {rec['tokens']}, prefill batch {rec['batch']} ({rec['lower_s']} s); "
        f"revision {rec['revision']}; {rec['wall_s']} s, peak RSS {rec['peak_rss_gb']} GB",
    ]
    for path, res in rec["paths"].items():
        how = (
            "every token a decode step (S = 1)"
            if path == "decode"
            else f"Session.feed_all of each window, prefill calls of up to {rec['batch']}"
        )
        lines += [
            "",
            f"  path {path}: {how}; {res['seconds']} s",
            f"    {'':<14}{'logits PSNR dB':>20}{'':>12}{'delta-rule state PSNR dB':>30}",
            f"    {'positions':<14}{'fp16':>10}{'fp32':>10}{'fp16 top-1':>12}"
            f"{'fp16 (min)':>15}{'fp32 (min)':>15}",
        ]
        for w in res["windows"]:
            lines.append(
                f"    {w['start']:>5}-{w['end']:<8}{_fmt(w['fp16_psnr_db']):>10}"
                f"{_fmt(w['fp32_psnr_db']):>10}{w['fp16_top1']:>12.3f}"
                f"{_fmt(w['fp16_recurrent_psnr_min_db']):>15}"
                f"{_fmt(w['fp32_recurrent_psnr_min_db']):>15}"
            )
        lines.append(
            f"    fp16 last window - first window: {_fmt(res['fp16_drift_db'])} dB (0: no drift)"
        )
        lines.append(
            "    states after the last token, PSNR against transformers fp32 (fp16 / fp32):"
        )
        for name, by in res["states"].items():
            lines.append(f"      {name:<16}{_fmt(by['fp16']):>8} / {_fmt(by['fp32'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    rec = measure(args)
    rec["revision"] = git_revision()
    print(render(rec))
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
