"""The ``anefx`` command line: check, convert, diff, generate, inspect, matrix, presets, verify.

Exit codes: 0 when the checked graph or package has no ANE errors, 1 when it has (or a pass
broke an invariant), 2 for bad input, with one clear message on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
import warnings

from anefx.core import rules
from anefx.errors import AnefxGraphError, AnefxInputError
from anefx.progress import Progress


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


MODEL_HELP = (
    "a checkpoint folder, a hub id ORG/NAME[@REVISION] from the local Hugging Face cache, or "
    "preset:NAME"
)


# ---------------------------------------------------------------------------------------------
# Flag values: each checked when parsed, so a bad one fails before anything is loaded, with one
# line naming the flag (argparse adds "argument --flag:" to the message).


def int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer in [LO, HI]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def float_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite float in [LO, HI] (an open end excludes it)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo)
        ok = ok and (value < hi if hi_open else value <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value

    return parse


def exit_codes(ok: str = "done", one: str | None = None, bad_input: str = "") -> dict:
    """``epilog`` and ``formatter_class`` for a sub-parser: its exit codes, in its --help."""
    lines = ["exit codes:", f"  0    {ok}"]
    if one:
        lines.append(f"  1    {one}")
    lines += [
        "  2    bad input: a model, artifact, flag or path, named in one line" + bad_input,
        "  3    internal error (a bug in anefx: ANEFX_DEBUG=1 shows the traceback)",
        "  130  interrupted (Ctrl-C)",
    ]
    return {
        "epilog": "\n".join(textwrap.fill(ln, 96, subsequent_indent=" " * 7) for ln in lines),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit code 2 (as every bad input)."""

    def error(self, message: str):
        self.exit(2, f"anefx: error: {message} (see {self.prog} --help)\n")


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


def cmd_cost(args) -> int:
    """Bytes, MACs and the ESTIMATED tokens/s of an artifact (or of MODEL converted at
    --context into a temporary folder)."""
    import tempfile
    from pathlib import Path

    from anefx.targets.artifact import MANIFEST, PACKAGE_SUFFIX
    from anefx.targets.cost import artifact_cost, chips_named, render

    chips = chips_named(args.chip)
    given = Path(args.artifact)
    # an artifact is a .mlpackage or a folder with anefx's manifest; anything else is a model
    if given.suffix == PACKAGE_SUFFIX or os.path.lexists(given / MANIFEST):
        if args.context is not None or args.batch is not None:
            raise AnefxInputError(
                f"--context/--batch: {args.artifact} is an artifact, converted at its own "
                "context; they apply to a model"
            )
        cost = artifact_cost(args.artifact)
    else:
        if args.context is None:
            raise AnefxInputError(
                f"{args.artifact}: not an anefx artifact; for a model, --context N says which "
                "stateful package to cost"
            )
        from anefx.conversion import convert

        with tempfile.TemporaryDirectory(prefix="anefx-cost-") as tmp:
            # as `anefx convert -o FOLDER` writes it by default: parts within --max-chunk-mb
            out = Path(tmp) / "cost"
            _random_notice(args.artifact)
            convert(
                args.artifact,
                out,
                context=args.context,
                batch=args.batch,
                progress=Progress(not args.json),
            )
            cost = artifact_cost(out, verify=False)
            cost.path = f"{args.artifact} (context {args.context})"
    if args.json:
        print(json.dumps(cost.to_dict(chips), default=str))
    else:
        print(render(cost, chips))
    return 0


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
    from anefx.models.inspection import inspect_model

    info = inspect_model(args.model, progress=Progress(not args.json))
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
    # the field column fits the longest name (shared_expert_intermediate_size: 31)
    width = max([26] + [len(k) + 2 for k in info if not k.startswith("_")])
    print(f"{'field':<{width}}{'value':<44}origin")
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
        print(f"{key:<{width}}{shown:<44}{origin}")
    return 0


def cmd_check(args) -> int:
    import anefx

    args.seq = 64 if args.seq is None else args.seq
    progress = Progress(not args.json)
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

    ids = _parse_ids(args.ids) if args.ids is not None else None
    dtypes = {
        "both": (torch.float32, torch.float16),
        "float32": (torch.float32,),
        "float16": (torch.float16,),
    }[args.dtype]
    given = {torch.float32: args.min_psnr_fp32, torch.float16: args.min_psnr_fp16}
    thresholds = {dt: v for dt, v in given.items() if v is not None}  # else diff's defaults
    _random_notice(args.model)
    progress = Progress(not args.json)
    result = diff(args.model, ids=ids, dtypes=dtypes, min_psnr=thresholds, progress=progress)
    # allow_nan=False: to_dict already wrote every non-finite number as null
    print(json.dumps(result.to_dict(), allow_nan=False) if args.json else result.render())
    return 0 if result.passed else 1


def cmd_verify(args) -> int:
    from anefx.targets.verify import verify

    ids = _parse_ids(args.ids) if args.ids is not None else None
    _random_notice(args.model)
    given = {"min_psnr": args.min_psnr, "min_top1": args.min_top1}
    thresholds = {k: v for k, v in given.items() if v is not None}  # else verify's defaults
    progress = Progress(not args.json)
    result = verify(
        args.package, args.model, ids=ids, steps=args.steps, progress=progress, **thresholds
    )
    if args.json:  # only the JSON object; non-finite numbers are null in to_dict: valid JSON
        print(json.dumps(result.to_dict(), allow_nan=False))
    else:
        print(result.render())
    return 0 if result.passed else 1


def cmd_matrix(args) -> int:
    from anefx.lowering.matrix import matrix_presets, matrix_row, render_matrix
    from anefx.models.presets import PRESETS

    names = args.presets.split(",") if args.presets else matrix_presets()
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise AnefxInputError(f"unknown preset '{unknown[0]}'; known: {', '.join(PRESETS)}")
    progress = Progress(not args.json)
    rows = []
    for name in names:
        progress(f"lowering preset:{name} on the meta device")
        rows.append(matrix_row(name, args.seq))
    if args.json:
        print(json.dumps({"seq_len": args.seq, "rows": rows}))
    else:
        print(render_matrix(rows))
    return 1 if any(r["errors_after_except_size"] for r in rows) else 0


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
    """A thin call of anefx.convert (anefx/conversion.py), then the report it returns."""
    from anefx.conversion import convert, lut_bits

    lut = lut_bits(args.lut, args.lut_embed, args.lut_ffn, args.lut_head)
    _random_notice(args.model)
    result = convert(
        args.model,
        args.output,
        seq=args.seq,
        context=args.context,
        batch=args.batch,
        argmax=args.argmax,
        dtype=_dtype(args.dtype),
        max_chunk_mb=args.max_chunk_mb,
        lut=lut,
        force=args.force,
        resume=args.resume,
        progress=Progress(not args.json),
    )
    if result.estimate:
        print(result.estimate, file=sys.stderr)
    if result.kind == "package":
        if args.json:  # one JSON object on stdout
            print(
                json.dumps(
                    {
                        "output": args.output,
                        "errors": result.errors,
                        "warnings": result.warnings,
                        "emitted": [r.to_dict() for r in result.emitted],
                    },
                    default=str,
                )
            )
        else:
            for rep in result.emitted:
                print(rep.render())
        return 1 if result.errors else 0
    if args.json:
        print(
            json.dumps(
                {
                    "output": args.output,
                    "parts": result.parts,
                    "errors": result.errors,
                    "warnings": result.warnings,
                }
            )
        )
        return 1 if result.errors else 0
    print(
        f"{'part':30} {'kind':8} {'layers':8} {'fp16 MiB':>8} {'lut':14} {'file MiB':>8} "
        "errors warnings"
    )
    for r in result.parts:
        print(
            f"{r['file']:30} {r['kind']:8} {r['layers']:8} {r['weight_mib']:8.1f} "
            f"{r['lut']:14} {r['package_mib']:8.1f} {r['errors']:6} {r['warnings']:8}"
        )
    for p in result.manifest["parts"]:
        for rep in p["emitted"]:
            counts = ", ".join(f"{k} {n}" for k, n in sorted(rep["counts"].items()))
            print(f"  {p['file']} {rep['stage']}: {counts or 'clean'}")
            for v in rep["violations"]:
                if v["severity"] == "error":
                    print(f"    error {v['rule']} at {v['node']} ({v['module']}): {v['message']}")
    return 1 if result.errors else 0


def _tokenizer(model: str, artifact: str | None = None):
    """The tokenizer and end tokens of MODEL (:class:`anefx.chat.ModelText`): from the
    tokenizer files of a checkpoint folder (confined to it like its weights), or those an
    artifact (ARTIFACT "parts" or "package") carries, each checked against its sha256 first;
    a preset has none."""
    from anefx.chat import load_text, read_text_files

    return load_text(read_text_files(model, artifact), model.rstrip("/"))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise AnefxInputError(f"--ids must be comma-separated integers: {text!r}") from None


def _is_artifact(model: str) -> bool:
    """A converted artifact, or an interrupted conversion of one (not a checkpoint): a package,
    a folder with manifest.json or a progress record, or a path whose conversion is staged
    beside it."""
    from pathlib import Path

    from anefx.targets.artifact import MANIFEST, PACKAGE_SUFFIX, PROGRESS, staging_path

    if model.startswith("preset:"):
        return False
    path = Path(model)
    if path.suffix == PACKAGE_SUFFIX:
        return True
    if path.is_dir():
        return any(os.path.lexists(path / name) for name in (MANIFEST, PROGRESS))
    return not path.exists() and os.path.lexists(staging_path(path))


def _artifact_decoder(args, progress):
    """For an artifact MODEL: (a Decoder over its prefill and decode functions, run on the
    executor, after the artifact is checked against its digests; its kind). For a checkpoint:
    (None, None), with --context and --batch given their defaults."""
    from anefx.generation import Decoder
    from anefx.targets.reader import artifact_kind
    from anefx.targets.verify import package_functions

    path = args.model
    if not _is_artifact(path):
        context = 512 if args.context is None else args.context
        batch = min(64, context) if args.batch is None else args.batch
        if batch > context:
            where = "--context" if args.context is not None else "the default --context"
            raise AnefxInputError(f"--batch {batch} must not exceed {where} {context}")
        args.context, args.batch = context, batch
        _random_notice(path)
        return None, None
    progress(f"checking {path}; loading it on the reference executor")
    fns = package_functions(path)  # the Core ML program itself
    if not {"prefill", "decode"} <= set(fns) or not fns["decode"].states:
        raise AnefxInputError(
            f"{path}: functions {sorted(fns)}; {args.command} needs a stateful artifact (prefill "
            "and decode with a KV cache: convert with --context)"
        )
    pre, dec = fns["prefill"], fns["decode"]
    decoder = Decoder(pre, dec, dec.signature.context, pre.seq_len)
    flags = (("--context", args.context), ("--batch", args.batch))
    given = [flag for flag, value in flags if value is not None]
    if given:
        raise AnefxInputError(
            f"{' and '.join(given)}: fixed by the artifact {path}: context "
            f"{decoder.context}, batch {decoder.batch}; leave {'them' if given[1:] else 'it'} out"
        )
    return decoder, artifact_kind(path)


def cmd_generate(args) -> int:
    from anefx.chat import check_thinking, ids_line
    from anefx.generation import Session, TextStream

    progress = Progress()
    if not args.chat:
        for flag, value in (("--system", args.system), ("--think/--no-think", args.think)):
            if value is not None:
                raise AnefxInputError(f"{flag} needs --chat (a turn in the chat template)")
    elif args.ids is not None:
        raise AnefxInputError("--chat renders --prompt as the user's message: give --prompt")
    dec, kind = _artifact_decoder(args, progress)
    context = args.context if dec is None else dec.context
    text = _tokenizer(args.model, kind)
    tok = text.tokenizer
    if args.ids is not None:
        ids = _parse_ids(args.ids)
    elif tok is None:
        raise AnefxInputError(
            f"--prompt needs the tokenizer files (tokenizer.json, ...) in the checkpoint folder "
            f"or the artifact ({args.model}); use --ids"
        )
    elif args.chat:
        check_thinking(tok, args.think)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = tok.render([*messages, {"role": "user", "content": args.prompt}], args.think)
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise AnefxInputError("the prompt is empty")
    ends = text.stop_tokens(args.ignore_eos)
    if len(ids) > context:
        raise AnefxInputError(f"a prompt of {len(ids)} tokens does not fit the context {context}")
    # without an end token all N tokens are generated: know now that they cannot fit (with
    # one, N is a bound, and a full context a normal stop)
    if not ends and len(ids) + args.max_new_tokens - 1 > context:
        raise AnefxInputError(
            f"a prompt of {len(ids)} tokens and --max-new-tokens {args.max_new_tokens} need "
            f"{len(ids) + args.max_new_tokens - 1} positions; the context holds {context}"
        )
    if dec is None:
        dec = _lower_decoder(args, progress, seed=args.seed)
    bad = [i for i in ids if not 0 <= i < dec.vocab]
    if bad:
        raise AnefxInputError(f"token id {bad[0]} is outside the vocabulary (0..{dec.vocab - 1})")
    text.check_vocab(dec.vocab)
    progress(f"generating up to {args.max_new_tokens} tokens after {len(ids)} prompt tokens")
    if args.show_ids:
        print(ids_line("fed", ids), file=sys.stderr, flush=True)
    session = Session(dec)
    stream = TextStream(tok.decode) if tok is not None else None
    new = []
    for t in session.stream(
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        end_tokens=ends,
    ):
        new.append(t)
        print(stream.push(t) if stream else f"{t} ", end="", flush=True)
    print(stream.flush() if stream else "", flush=True)
    if tok is None or args.ids is not None:
        print(" ".join(map(str, new)), flush=True)
    if args.show_ids:
        print(ids_line("generated", new), file=sys.stderr)
    print(f"stopped: {session.stop_reason.describe(ends)}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from anefx.chat import Chat, check_thinking, run_chat
    from anefx.generation import Session

    progress = Progress()
    dec, kind = _artifact_decoder(args, progress)
    text = _tokenizer(args.model, kind)
    if text.tokenizer is None:
        raise AnefxInputError(
            f"{args.model}: chat needs the tokenizer files (tokenizer.json, tokenizer_config.json "
            "with the chat template) in the checkpoint folder or the artifact"
        )
    if text.tokenizer.template is None:
        raise AnefxInputError(
            f"{args.model}: its tokenizer has no chat template (no chat_template in "
            "tokenizer_config.json, no chat_template.jinja); use generate --prompt"
        )
    check_thinking(text.tokenizer, args.think)
    ends = text.stop_tokens(args.ignore_eos)
    if dec is None:
        dec = _lower_decoder(args, progress, seed=args.seed)
    text.check_vocab(dec.vocab)
    chat = Chat(
        Session(dec),
        text.tokenizer,
        system=args.system,
        enable_thinking=args.think,
        max_new_tokens=args.max_new_tokens,
        end_tokens=ends,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    progress(f"ready: context {dec.context} tokens")
    return run_chat(chat, show_ids=args.show_ids, verbose=args.verbose)


def hub_flag(sp: argparse.ArgumentParser) -> None:
    """Add --download to sub-parser SP, whose MODEL may be a hub id (ORG/NAME[@REVISION]):
    without it, main resolves the id in the local Hugging Face cache only."""
    sp.add_argument(
        "--download",
        action="store_true",
        help="allow fetching MODEL from the Hugging Face hub when it is not in the local cache; "
        "without it anefx never uses the network",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="anefx",
        description="Compile a stock Hugging Face Qwen model into an ANE-ready Core ML package.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    width = rules.DIM_LIMITS["W"]  # a sequence or a context beyond it breaks dim_hw

    def model_args(sp):
        sp.add_argument("model", help=MODEL_HELP + " (e.g. Qwen/Qwen3-0.6B, preset:qwen3-0.6b)")
        sp.add_argument(
            "--seq",
            type=int_range(1, width),
            default=None,
            help=f"sequence length of the stateless graph, 1..{width} (default 64)",
        )
        sp.add_argument(
            "--dtype",
            choices=["float16", "float32"],
            default="float16",
            help="compute dtype of the lowered graph (default float16)",
        )
        sp.add_argument("--json", action="store_true", help="print the report as JSON")

    c = sub.add_parser(
        "check",
        help="report ANE rule violations of the lowered graph",
        **exit_codes("no ANE errors in the reported graph", "ANE errors in it"),
    )
    model_args(c)
    c.add_argument("--raw", action="store_true", help="report the captured graph instead")
    c.add_argument("--meta", action="store_true", help="structure only: no weight memory")
    hub_flag(c)
    c.set_defaults(func=cmd_check)

    v = sub.add_parser(
        "convert",
        help="capture, lower, check and emit a Core ML package",
        **exit_codes(
            "written, no ANE errors in the emitted programs",
            "refused because of ANE errors (--force emits anyway), or emitted with errors",
            "; also an output path that is not new, empty or an anefx artifact, a checkpoint "
            "folder as output, too little free space or a disk that filled up (nothing is left "
            "behind)",
        ),
    )
    model_args(v)
    v.add_argument(
        "-o",
        "--output",
        required=True,
        help="OUT.mlpackage (one package), or a folder for the parts and manifest.json; it "
        "must be new, an empty folder, or an artifact anefx wrote (replaced whole, only once "
        "the new one is complete)",
    )
    v.add_argument("--force", action="store_true", help="emit even if the graph has errors")
    v.add_argument(
        "--context",
        type=int_range(1, width),
        default=None,
        help="emit the stateful decoder: KV cache of N positions as Core ML state, "
        f"functions prefill and decode, N in 1..{width} (without it: one stateless function "
        "of --seq)",
    )
    v.add_argument(
        "--batch",
        type=int_range(1, width),
        default=None,
        help="prefill batch with --context, at most the context (default 64, or the context "
        "when it is shorter)",
    )
    v.add_argument(
        "--argmax",
        action="store_true",
        help="with --context: output the greedy token id and its logit, not logits",
    )
    v.add_argument(
        "--max-chunk-mb",
        type=float_range(0, float(1 << 30), lo_open=True),
        default=1024.0,
        help="weights per part at most (MiB, default 1024: the ANE's 1 GB per package); "
        "the decoder is split into chunks of whole layers, embedding and head apart",
    )
    v.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted conversion into the same folder: keep the parts it "
        "finished (staged beside the folder) and write the rest",
    )
    for kind, what in (
        ("", "every weight"),
        ("-embed", "the embedding"),
        ("-ffn", "the decoder layers"),
        ("-head", "the LM head"),
    ):
        v.add_argument(
            f"--lut{kind}",
            type=int_range(0, 8),
            default=None,
            metavar="BITS",
            help=f"palettize {what} to a BITS-bit lookup table (1, 2, 3, 4, 6, 8"
            + ("; overrides --lut, 0 keeps fp16)" if kind else ")"),
        )
    hub_flag(v)
    v.set_defaults(func=cmd_convert)

    from anefx.models.limits import MAX_STEPS  # no torch in it: parsing stays fast

    def generation_args(sp, what: str) -> None:
        """The flags generate and chat share: sampling, end tokens, the decoder's shape."""
        sp.add_argument(
            "model",
            help=f"{MODEL_HELP} (lowered graphs in torch), or a converted "
            "artifact: a folder with manifest.json or a stateful .mlpackage (its Core ML "
            "program on the reference executor; its tokenizer files travel inside it)",
        )
        sp.add_argument(
            "--temperature",
            type=float_range(0.0, math.inf),
            default=0.0,
            metavar="T",
            help="sampling temperature, a finite number >= 0; 0 is greedy (default)",
        )
        sp.add_argument(
            "--top-k",
            type=int_range(1),
            default=None,
            metavar="K",
            help="sample among the K most likely tokens only, K >= 1 (default: all)",
        )
        sp.add_argument(
            "--top-p",
            type=float_range(0.0, 1.0, lo_open=True),
            default=None,
            metavar="P",
            help="sample among the most likely tokens holding probability P, in (0, 1] "
            "(default: all)",
        )
        sp.add_argument(
            "--seed",
            type=int_range(0, 2**64 - 1),
            default=0,
            help="seed of the sampling (and of a preset's random weights), 0..2**64-1 (default 0)",
        )
        sp.add_argument(
            "--ignore-eos",
            action="store_true",
            help="generate through the end tokens (generation_config.json's eos_token_id and "
            "the tokenizer's eos token), to --max-new-tokens or a full context",
        )
        sp.add_argument(
            "--show-ids",
            action="store_true",
            help=f"print on stderr the ids fed and generated {what} (to debug a template)",
        )
        sp.add_argument(
            "--context",
            type=int_range(1, width),
            default=None,
            metavar="N",
            help=f"KV cache length with a checkpoint, 1..{width} (default 512); an artifact "
            "fixes its own",
        )
        sp.add_argument(
            "--batch",
            type=int_range(1, width),
            default=None,
            metavar="B",
            help="prefill batch with a checkpoint, at most the context (default 64, or the "
            "context if smaller); an artifact fixes its own",
        )
        sp.add_argument(
            "--dtype",
            choices=["float16", "float32"],
            default="float16",
            help="compute dtype of the lowered graphs with a checkpoint (default float16)",
        )

    def chat_args(sp) -> None:
        """The flags of a turn in the chat template."""
        sp.add_argument("--system", default=None, metavar="TEXT", help="the system message")
        think = sp.add_mutually_exclusive_group()
        for flag, value in (("--think", True), ("--no-think", False)):
            think.add_argument(
                flag,
                dest="think",
                action="store_const",
                const=value,
                default=None,
                help=f"enable_thinking={value} for a template that has the switch (Qwen3); "
                "refused for one that has not (default: the template's own)",
            )

    stops = (
        "Generation stops at an end token (not printed), at --max-new-tokens or when the "
        "context is full; the reason ends the output on stderr (stopped: ...)."
    )
    g = sub.add_parser(
        "generate",
        help="generate text: with the lowered graphs (torch) or a converted artifact's program",
        description=textwrap.fill(stops, 96),
        **exit_codes(
            "generated",
            "the program computed non-finite logits (NaN or inf)",
            "; also a damaged, modified or unfinished artifact (checked against its digests "
            "before anything runs, its tokenizer files too), or --context/--batch given with "
            "an artifact, which fixes them",
        ),
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt",
        help="text (needs the tokenizer files in the checkpoint folder or the artifact); with "
        "--chat, the user's message",
    )
    src.add_argument("--ids", help="comma-separated token ids (the new ids end the output)")
    g.add_argument(
        "--chat",
        action="store_true",
        help="render --prompt as one user turn with the tokenizer's chat template (what an "
        "instruct model expects)",
    )
    chat_args(g)
    g.add_argument(
        "--max-new-tokens",
        type=int_range(1, MAX_STEPS),
        default=32,
        metavar="N",
        help=f"tokens to generate at most, 1..{MAX_STEPS} (default 32); without end tokens "
        "the prompt and N - 1 of them must fit the context",
    )
    generation_args(g, "")
    hub_flag(g)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser(
        "chat",
        help="chat in the terminal: the chat template, end tokens, the KV cache kept across turns",
        description=textwrap.fill(
            "One line per turn; the reply streams to stdout. /reset starts a new conversation "
            "(history and KV cache), /quit or Ctrl-D ends, Ctrl-C stops a reply. " + stops,
            96,
        ),
        **exit_codes(
            "ended by /quit or the end of the input",
            "the program computed non-finite logits (NaN or inf)",
            "; also a model without a tokenizer or a chat template, --think/--no-think for a "
            "template without the switch, a damaged artifact",
        ),
    )
    chat_args(ch)
    ch.add_argument(
        "--max-new-tokens",
        type=int_range(1, MAX_STEPS),
        default=None,
        metavar="N",
        help=f"tokens per reply at most, 1..{MAX_STEPS} (default: until an end token or a "
        "full context)",
    )
    ch.add_argument(
        "--verbose",
        action="store_true",
        help="say why each reply stopped, and when the template rewrote the history",
    )
    generation_args(ch, "per turn")
    hub_flag(ch)
    ch.set_defaults(func=cmd_chat)

    i = sub.add_parser(
        "inspect",
        help="print a model's config (declared, preset or inferred from tensor shapes), "
        "its parameter count and weight bytes; reads headers only",
        **exit_codes(),
    )
    i.add_argument("model", help=MODEL_HELP)
    i.add_argument("--json", action="store_true", help="one JSON object on the last line")
    hub_flag(i)
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser(
        "diff",
        help="per-layer parity: transformers vs the lowered graph (fp32 and fp16)",
        **exit_codes(
            "every stage at or above its threshold",
            "a stage below it (a NaN is below every threshold), named",
        ),
    )
    d.add_argument("model", help=MODEL_HELP)
    d.add_argument("--ids", help="comma-separated token ids (default: 16 random ids)")
    d.add_argument(
        "--dtype", choices=("both", "float32", "float16"), default="both", help="lowered dtypes"
    )
    # the defaults are lowering.diff.DEFAULT_MIN_PSNR's (not imported here: it needs torch)
    for dt, default in (("fp32", 80), ("fp16", 50)):
        d.add_argument(
            f"--min-psnr-{dt}",
            type=float_range(0.0, 1000.0),
            default=None,
            metavar="DB",
            help=f"a stage of the {dt} graph passes at or above DB (default {default})",
        )
    d.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    hub_flag(d)
    d.set_defaults(func=cmd_diff)

    vf = sub.add_parser(
        "verify",
        help="execute an emitted package's program (no Mac needed) and compare with transformers",
        **exit_codes(
            "passed: lowest logits PSNR >= --min-psnr and top-1 agreement >= --min-top1",
            "below either threshold (a NaN never passes)",
            "; also a damaged, modified or unfinished artifact (checked against its digests "
            "before anything runs), the wrong model, or steps beyond the artifact's context",
        ),
    )
    vf.add_argument(
        "package", help="the .mlpackage or the folder of parts (manifest.json) anefx convert wrote"
    )
    vf.add_argument("model", help=f"what it was converted from: {MODEL_HELP}")
    vf.add_argument("--ids", help="comma-separated prompt token ids (default: 16 random ids)")
    vf.add_argument(
        "--steps",
        type=int_range(1, MAX_STEPS),
        default=8,
        metavar="N",
        help="greedy steps to compare, 1..; the prompt and N - 1 steps must fit the context (8)",
    )
    # the defaults are targets.verify's DEFAULT_MIN_PSNR_DB and DEFAULT_MIN_TOP1 (not imported
    # here: that module needs torch, and parsing the flags must not)
    vf.add_argument(
        "--min-psnr",
        type=float_range(0.0, 1000.0),
        default=None,
        metavar="DB",
        help="pass at or above this lowest logits PSNR (default 50)",
    )
    vf.add_argument(
        "--min-top1",
        type=float_range(0.0, 1.0),
        default=None,
        metavar="FRACTION",
        help="pass at or above this top-1 agreement (default 0.9)",
    )
    vf.add_argument("--json", action="store_true", help="end with one JSON object")
    hub_flag(vf)
    vf.set_defaults(func=cmd_verify)

    mx = sub.add_parser(
        "matrix",
        help="lower every preset on the meta device: the conversion matrix",
        **exit_codes(
            "every preset lowers with no ANE errors (package size aside)", "some preset has"
        ),
    )
    mx.add_argument("--presets", help="comma-separated preset names (default: all but tiny)")
    mx.add_argument(
        "--seq", type=int_range(1, width), default=64, help="captured sequence length (64)"
    )
    mx.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    mx.set_defaults(func=cmd_matrix)

    co = sub.add_parser(
        "cost",
        help="bytes read and written, MACs and ESTIMATED tokens/s of an artifact per chip",
        **exit_codes("costed"),
    )
    co.add_argument(
        "artifact",
        help="an .mlpackage or parts folder anefx wrote, or a model (" + MODEL_HELP + ") with "
        "--context",
    )
    co.add_argument(
        "--context", type=int_range(1, 1 << 20), help="for a model: the stateful package's context"
    )
    co.add_argument(
        "--batch", type=int_range(1, width), help="for a model: the prefill batch (default 64)"
    )
    co.add_argument("--chip", help="one chip of the table (default: all): M1 ... M5 Max, A18 Pro")
    co.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    co.set_defaults(func=cmd_cost)

    s = sub.add_parser("presets", help="list the built-in presets and their shapes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_presets)
    return p


def _notes(exc: BaseException) -> None:
    """What a failed command left for the user to know (a conversion's kept parts)."""
    for note in getattr(exc, "__notes__", ()):
        print(f"note: {_line(note)}", file=sys.stderr)


def _line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in one line on stderr and its exit code."""
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        # a hub id as MODEL becomes its snapshot folder in the local Hugging Face cache (fetched
        # only with --download), so every later path (tokenizer, reports, manifest) is that
        # folder; an artifact generate runs (it may be staged only) is left as it is
        hub = hasattr(args, "download") and isinstance(getattr(args, "model", None), str)
        if hub and not _is_artifact(args.model):
            from anefx.models.hub import resolve_model

            given, args.model = args.model, resolve_model(args.model, download=args.download)
            if args.model != given:
                print(f"resolved {given} to {args.model}", file=sys.stderr)
        return args.func(args)
    except AnefxInputError as exc:
        print(f"anefx: error: {_line(exc)}", file=sys.stderr)
        _notes(exc)
        return 2
    except AnefxGraphError as exc:
        print(f"anefx: graph error: {_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print("anefx: interrupted", file=sys.stderr)
        _notes(exc)
        return 130
    except OSError as exc:  # the file system said no: a path the user gave, or a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        why = os.strerror(exc.errno) if exc.errno else _line(exc)
        print(f"anefx: error: {where}{why}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "anefx: error: out of memory (the model or --context is too large here)",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:
        if os.environ.get("ANEFX_DEBUG"):
            raise
        print(
            f"anefx: internal error: {type(exc).__name__}: {_line(exc)[:300]} (a bug in anefx; "
            "ANEFX_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
