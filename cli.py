"""The ``anefx`` command line: check, convert, diff, generate, inspect, matrix, presets, verify.

Exit codes: 0 when the checked graph or package has no ANE errors, 1 when it has (or a pass
broke an invariant), 2 for bad input, with one clear message on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

from anefx.errors import AnefxGraphError, AnefxInputError

DEFAULT_MODEL = "preset:qwen3-0.6b"


def _quiet() -> None:
    # torch/transformers/coremltools chatter would bury the report
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    # ...but not the one naming the config fields a checkpoint without config.json left to
    # defaults: the user must know they were guessed
    from anefx.models.infer_config import ConfigDefaultsWarning

    warnings.filterwarnings("default", category=ConfigDefaultsWarning)


class _Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _dtype(name: str):
    import torch

    return {"float16": torch.float16, "float32": torch.float32}[name]


def _random_notice(model: str) -> None:
    if model.startswith("preset:"):
        print(
            f"note: {model} has RANDOM weights (seeded): the graph and package have the real "
            "shapes, but the outputs mean nothing. Pass a checkpoint folder for real weights.",
            file=sys.stderr,
        )


def cmd_presets(args) -> int:
    from anefx.models.presets import describe_presets

    rows = describe_presets()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = (
        f"{'preset':<17}{'layers':>7}{'hidden':>7}{'heads':>6}{'kv':>4}{'hdim':>5}"
        f"{'inter':>7}{'experts':>12}{'vocab':>8}{'tied':>6}{'params':>9}{'active':>8}"
        f"{'fp16 GB':>9}"
    )
    print(head)
    for r in rows:
        # routed experts as "top-k/E x width", "-" for dense models
        moe = (
            f"{r['experts_per_tok']}/{r['experts']}x{r['moe_intermediate']}"
            if r["experts"]
            else "-"
        )
        print(
            f"{r['name']:<17}{r['layers']:>7}{r['hidden']:>7}{r['heads']:>6}{r['kv_heads']:>4}"
            f"{r['head_dim']:>5}{r['intermediate']:>7}{moe:>12}{r['vocab']:>8}"
            f"{str(r['tied']):>6}{r['params'] / 1e9:>8.2f}B{r['active_params'] / 1e9:>7.2f}B"
            f"{r['fp16_bytes'] / 1e9:>9.2f}"
        )
    return 0


def cmd_inspect(args) -> int:
    from anefx.models.infer_config import inspect_model

    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    origin_text = {
        "config.json": "declared in config.json",
        "preset": "the preset's published values",
        "inferred": "inferred from tensor shapes (no config.json)",
    }[info["_config"]]
    params, active = info["_parameters"], info["_active_parameters"]
    by_dtype = ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in info["_weight_bytes_by_dtype"].items())
    if info["_tensors"] is None:
        weights = f"none stored (random weights); {by_dtype} at the preset's dtype"
    else:
        weights = f"{info['_weight_bytes'] / 1e9:.3f} GB in {info['_tensors']} tensors ({by_dtype})"
    print(f"model       {info['_source']}")
    print(f"config      {origin_text}")
    print(f"class       {', '.join(info.get('architectures') or [])} ({info['model_type']})")
    print(
        f"parameters  {params:,}" + (f" ({active:,} active per token)" if active != params else "")
    )
    print(f"weights     {weights}")
    print()
    # spellings a config.json may use for a field that transformers names otherwise
    aliases = {"rope_theta": "rope_parameters", "rope_scaling": "rope_parameters"}
    aliases |= {"torch_dtype": "dtype", "num_local_experts": "num_experts"}
    declared = {aliases.get(k, k) for k in info["_declared"]} | set(info["_declared"])
    inferred = {aliases.get(k, k) for k in info["_inferred"]} | set(info["_inferred"])
    print(f"{'field':<26}{'value':<44}origin")
    for key, value in info.items():
        if key.startswith("_"):
            continue
        if key in info["_defaulted"]:
            origin = f"default: {info['_reasons'].get(key, '')}"
        elif key in inferred:
            origin = "inferred"
        elif key in declared:
            origin = "declared"
        else:
            origin = "class default"
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 42 else shown[:39] + "..."
        print(f"{key:<26}{shown:<44}{origin}")
    return 0


def cmd_check(args) -> int:
    import anefx

    progress = _Progress(not args.json)
    _random_notice(args.model)
    progress(f"loading and capturing {args.model} (seq {args.seq})")
    low = anefx.lower(
        args.model, seq_len=args.seq, dtype=_dtype(args.dtype), meta=args.meta, raw_report=args.raw
    )
    progress(f"lowered in {low.log.seconds:.2f}s of passes")
    report = low.captured_report if args.raw else low.report
    print(report.to_json() if args.json else report.render())
    return 1 if report.errors else 0


def cmd_diff(args) -> int:
    import torch

    from anefx.lowering.diff import diff

    ids = _parse_ids(args.ids) if args.ids else None
    dtypes = {
        "both": (torch.float32, torch.float16),
        "float32": (torch.float32,),
        "float16": (torch.float16,),
    }[args.dtype]
    _random_notice(args.model)
    result = diff(args.model, ids=ids, dtypes=dtypes)
    print(json.dumps(result.to_dict()) if args.json else result.render())
    return 1 if any(result.first_bad.values()) else 0


def cmd_verify(args) -> int:
    from anefx.targets.verify import verify

    ids = _parse_ids(args.ids) if args.ids else None
    _random_notice(args.model)
    result = verify(args.package, args.model, ids=ids, steps=args.steps)
    print(result.render())
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def cmd_matrix(args) -> int:
    from anefx.lowering.matrix import matrix_row, render_matrix
    from anefx.models.presets import PRESETS

    names = args.presets.split(",") if args.presets else [n for n in PRESETS if "tiny" not in n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise AnefxInputError(f"unknown preset '{unknown[0]}'; known: {', '.join(PRESETS)}")
    progress = _Progress(True)
    rows = []
    for name in names:
        progress(f"lowering preset:{name} on the meta device")
        rows.append(matrix_row(name, args.seq))
    if args.json:
        print(json.dumps({"seq_len": args.seq, "rows": rows}))
    else:
        print(render_matrix(rows))
    return 1 if any(r["errors_after_except_size"] for r in rows) else 0


def _lut(args) -> dict[str, int] | None:
    """Weight kind -> bits from --lut and the per-kind overrides."""
    lut = {k: args.lut for k in ("embed", "ffn", "head")} if args.lut else {}
    for kind in ("embed", "ffn", "head"):
        bits = getattr(args, f"lut_{kind}")
        if bits is not None:
            if bits:
                lut[kind] = bits
            else:
                lut.pop(kind, None)  # 0: keep this kind in fp16
    from anefx.targets.palettize import check_lut

    check_lut(lut)  # before the minutes of lowering, not after
    return lut or None


def _lower_decoder(args, progress, **kwargs):
    """Load --model once; lower prefill (S = --batch) and decode (S = 1) with --context."""
    from anefx.generation import lower_decoder

    progress(
        f"loading {args.model}; lowering prefill (batch {args.batch}) and decode, "
        f"context {args.context}"
    )
    return lower_decoder(
        args.model, batch=args.batch, context=args.context, dtype=_dtype(args.dtype), **kwargs
    )


def cmd_convert(args) -> int:
    import anefx

    progress = _Progress()
    _random_notice(args.model)
    lut = _lut(args)
    if args.context is not None:
        dec = _lower_decoder(args, progress, argmax=args.argmax)
        lowered, default = {"prefill": dec.prefill, "decode": dec.decode}, "decode"
    else:
        if args.argmax:
            raise AnefxInputError("--argmax needs --context (the stateful decoder)")
        progress(f"loading {args.model}")
        lowered, default = (
            {"main": anefx.lower(args.model, seq_len=args.seq, dtype=_dtype(args.dtype))},
            "main",
        )
    chunked = not args.output.endswith(".mlpackage")
    for name, low in lowered.items():
        # in parts, the package-size rule applies to each part, not to the whole model
        errors = [e for e in low.report.errors if not (chunked and e.rule == "weights_size")]
        progress(
            f"{name}: captured and lowered ({low.seconds.get('export', 0):.1f}s export, "
            f"{low.log.seconds:.2f}s passes): {len(errors)} error(s), "
            f"{len(low.report.warnings)} warning(s)"
            + (" (sizes checked per part)" if chunked else "")
        )
    if not chunked:
        return _convert_package(args, lowered, default, progress, lut)
    return _convert_chunked(args, lowered, default, progress, lut)


def _convert_package(args, lowered: dict, default: str, progress, lut) -> int:
    """-o OUT.mlpackage: one package holding every function, report.json beside it."""
    from anefx.targets.chunked import plan
    from anefx.targets.coreml import emit_functions

    max_bytes = int(args.max_chunk_mb * 2**20)
    parts = plan(lowered, max_bytes, lut)
    if len(parts) > 1 and not args.force:
        raise AnefxInputError(
            f"{args.output}: the weights do not fit one package of --max-chunk-mb "
            f"{args.max_chunk_mb:g} ({len(parts)} parts: "
            f"{', '.join(p.name for p in parts)}); give -o a folder for the parts"
        )
    result = emit_functions(
        lowered,
        args.output,
        force=args.force,
        progress=progress,
        default=default,
        lut=lut,
    )
    progress(f"wrote {args.output} and report.json beside it")
    for rep in result["emitted_reports"]:
        print(rep.to_json() if args.json else rep.render())
    return 1 if any(r.errors for r in result["emitted_reports"]) else 0


def _convert_chunked(args, lowered: dict, default: str, progress, lut) -> int:
    """-o FOLDER: the parts (embedding, decoder chunks, head) and manifest.json."""
    from anefx.targets.chunked import emit_chunked

    options = {
        k: getattr(args, k)
        for k in ("seq", "context", "batch", "argmax", "dtype", "max_chunk_mb")
        if getattr(args, k, None) is not None
    }
    manifest = emit_chunked(
        lowered,
        args.output,
        int(args.max_chunk_mb * 2**20),
        default=default,
        lut=lut,
        force=args.force,
        resume=args.resume,
        progress=progress,
        options=options,
    )
    progress(f"wrote {len(manifest['parts'])} part(s) and manifest.json into {args.output}")
    rows = [
        {
            "file": p["file"],
            "kind": p["kind"],
            "layers": f"{p['layers'][0]}-{p['layers'][-1]}" if p["layers"] else "-",
            "weight_mb": round(p["weight_bytes"] / 2**20, 1),
            "package_mb": round(p["package_bytes"] / 2**20, 1),
            "lut": ",".join(f"{k}:{v}" for k, v in p["lut"].items()) or "-",
            "errors": p["errors"],
            "warnings": p["warnings"],
        }
        for p in manifest["parts"]
    ]
    if args.json:
        print(json.dumps({"output": args.output, "parts": rows, **manifest["checker"]}))
    else:
        print(
            f"{'part':30} {'kind':8} {'layers':8} {'fp16 MB':>8} {'lut':14} {'file MB':>8} "
            "errors warnings"
        )
        for r in rows:
            print(
                f"{r['file']:30} {r['kind']:8} {r['layers']:8} {r['weight_mb']:8.1f} "
                f"{r['lut']:14} {r['package_mb']:8.1f} {r['errors']:6} {r['warnings']:8}"
            )
        for p in manifest["parts"]:
            for rep in p["emitted"]:
                counts = ", ".join(f"{k} {n}" for k, n in sorted(rep["counts"].items()))
                print(f"  {p['file']} {rep['stage']}: {counts or 'clean'}")
                for v in rep["violations"]:
                    if v["severity"] == "error":
                        print(
                            f"    error {v['rule']} at {v['node']} ({v['module']}): {v['message']}"
                        )
    return 1 if manifest["checker"]["errors"] else 0


def _tokenizer(model: str):
    from pathlib import Path

    path = Path(model) / "tokenizer.json"
    if model.startswith("preset:") or not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise AnefxInputError(f"{path}: not a readable tokenizer ({exc})") from None


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise AnefxInputError(f"--ids must be comma-separated integers: {text!r}") from None


def _is_artifact(model: str) -> bool:
    """A converted artifact: a chunked folder (manifest.json) or a package."""
    from pathlib import Path

    from anefx.targets.chunked import MANIFEST

    return (Path(model) / MANIFEST).is_file() or model.rstrip("/").endswith(".mlpackage")


def _artifact_decoder(path: str):
    """A Decoder over an artifact's prefill and decode functions (run on the executor)."""
    from anefx.generation import Decoder
    from anefx.targets.verify import package_functions

    fns = package_functions(path)
    if not {"prefill", "decode"} <= set(fns):
        raise AnefxInputError(
            f"{path}: functions {sorted(fns)}; generate needs a stateful artifact (prefill and "
            "decode: convert with --context)"
        )
    pre, dec = fns["prefill"], fns["decode"]
    return Decoder(pre, dec, dec.states[0]["shape"][2], pre.seq_len)


def cmd_generate(args) -> int:
    from anefx.generation import Session

    progress = _Progress()
    _random_notice(args.model)
    tok = _tokenizer(args.model)
    if args.ids is not None:
        ids = _parse_ids(args.ids)
    else:
        if tok is None:
            raise AnefxInputError(
                f"--prompt needs a tokenizer.json in the checkpoint folder ({args.model}); "
                "use --ids"
            )
        ids = tok.encode(args.prompt).ids
    if not ids:
        raise AnefxInputError("the prompt is empty")
    if _is_artifact(args.model):
        progress(f"loading {args.model} on the reference executor (the Core ML program itself)")
        dec = _artifact_decoder(args.model)
    else:
        dec = _lower_decoder(args, progress, seed=args.seed)
    bad = [i for i in ids if not 0 <= i < dec.vocab]
    if bad:
        raise AnefxInputError(f"token id {bad[0]} is outside the vocabulary (0..{dec.vocab - 1})")
    progress(f"generating {args.max_new_tokens} tokens after {len(ids)} prompt tokens")

    def show(t: int) -> None:
        text = tok.decode([t]) if tok is not None else f"{t} "
        print(text, end="", flush=True)

    new = Session(dec).generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        on_token=show,
    )
    print()
    if tok is None or args.ids is not None:
        print(" ".join(map(str, new)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anefx",
        description="Compile a stock Hugging Face Qwen model into an ANE-ready Core ML package.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument(
            "model",
            nargs="?",
            default=DEFAULT_MODEL,
            help="checkpoint folder or preset:NAME (default %(default)s)",
        )
        sp.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
        sp.add_argument(
            "--dtype",
            choices=["float16", "float32"],
            default="float16",
            help="compute dtype of the lowered graph (default float16)",
        )
        sp.add_argument("--json", action="store_true", help="print the report as JSON")

    c = sub.add_parser("check", help="report ANE rule violations of the lowered graph")
    model_args(c)
    c.add_argument("--raw", action="store_true", help="report the captured graph instead")
    c.add_argument("--meta", action="store_true", help="structure only: no weight memory")
    c.set_defaults(func=cmd_check)

    v = sub.add_parser("convert", help="capture, lower, check and emit a Core ML package")
    model_args(v)
    v.add_argument(
        "-o",
        "--output",
        required=True,
        help="OUT.mlpackage (one package), or a folder for the parts and manifest.json",
    )
    v.add_argument("--force", action="store_true", help="emit even if the graph has errors")
    v.add_argument(
        "--context",
        type=int,
        default=None,
        help="emit the stateful decoder: KV cache of N positions as Core ML state, "
        "functions prefill and decode (without it: one stateless function of --seq)",
    )
    v.add_argument("--batch", type=int, default=64, help="prefill batch with --context (64)")
    v.add_argument(
        "--argmax",
        action="store_true",
        help="with --context: output the greedy token id and its logit, not logits",
    )
    v.add_argument(
        "--max-chunk-mb",
        type=float,
        default=1024.0,
        help="weights per part at most (MiB, default 1024: the ANE's 1 GB per package); "
        "the decoder is split into chunks of whole layers, embedding and head apart",
    )
    v.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted conversion into the same folder at the first part "
        "not yet written",
    )
    for kind, what in (
        ("", "every weight"),
        ("-embed", "the embedding"),
        ("-ffn", "the decoder layers"),
        ("-head", "the LM head"),
    ):
        v.add_argument(
            f"--lut{kind}",
            type=int,
            default=None,
            metavar="BITS",
            help=f"palettize {what} to a BITS-bit lookup table (1, 2, 3, 4, 6, 8"
            + ("; overrides --lut, 0 keeps fp16)" if kind else ")"),
        )
    v.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="generate with the lowered graphs (torch, any machine)")
    g.add_argument(
        "model",
        help="checkpoint folder or preset:NAME (lowered graphs in torch), or a converted "
        "artifact: a folder with manifest.json or a stateful .mlpackage (its Core ML program "
        "on the reference executor)",
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (needs tokenizer.json in the checkpoint folder)")
    src.add_argument("--ids", help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--context", type=int, default=512, help="KV cache length (default 512)")
    g.add_argument("--batch", type=int, default=64, help="prefill batch (default 64)")
    g.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "inspect",
        help="print a model's config (declared, preset or inferred from tensor shapes), "
        "its parameter count and weight bytes; reads headers only",
    )
    i.add_argument("model", help="checkpoint folder or preset:NAME")
    i.add_argument("--json", action="store_true", help="one JSON object on the last line")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser(
        "diff", help="per-layer parity: transformers vs the lowered graph (fp32 and fp16)"
    )
    d.add_argument("model", help="checkpoint folder or preset:NAME")
    d.add_argument("--ids", help="comma-separated token ids (default: 16 random ids)")
    d.add_argument(
        "--dtype", choices=("both", "float32", "float16"), default="both", help="lowered dtypes"
    )
    d.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    d.set_defaults(func=cmd_diff)

    vf = sub.add_parser(
        "verify",
        help="execute an emitted package's program (no Mac needed) and compare with transformers",
    )
    vf.add_argument(
        "package", help="the .mlpackage or the folder of parts (manifest.json) anefx convert wrote"
    )
    vf.add_argument("model", help="the checkpoint folder or preset:NAME it was converted from")
    vf.add_argument("--ids", help="comma-separated prompt token ids (default: 16 random ids)")
    vf.add_argument("--steps", type=int, default=8, help="greedy steps to compare (8)")
    vf.add_argument("--json", action="store_true", help="end with one JSON object")
    vf.set_defaults(func=cmd_verify)

    mx = sub.add_parser(
        "matrix", help="lower every preset on the meta device: the conversion matrix"
    )
    mx.add_argument("--presets", help="comma-separated preset names (default: all but tiny)")
    mx.add_argument("--seq", type=int, default=64, help="captured sequence length (64)")
    mx.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    mx.set_defaults(func=cmd_matrix)

    s = sub.add_parser("presets", help="list the built-in presets and their shapes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        return args.func(args)
    except AnefxInputError as exc:
        print(f"anefx: error: {exc}", file=sys.stderr)
        return 2
    except AnefxGraphError as exc:
        print(f"anefx: graph error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("anefx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
