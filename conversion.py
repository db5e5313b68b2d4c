"""``anefx.convert``: a checkpoint, hub id or preset in, a Core ML artifact out, in one call.

What the command line's ``anefx convert`` does, as a library function: every option checked,
then the model's config, the output path and the free space, all before a weight is read; then
load, lower (one stateless function of ``seq`` tokens, or with ``context`` the stateful
``prefill`` and ``decode``), and write the artifact: one package (``OUT.mlpackage``) or a folder
of parts with ``manifest.json``. The result says what was written, what the checker found and
how long each stage took. Bad input raises :class:`~anefx.errors.AnefxInputError`; a graph with
ANE errors raises :class:`~anefx.errors.AnefxGraphError` unless ``force``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anefx.core import rules
from anefx.errors import AnefxInputError
from anefx.progress import Progress, quiet

LUT_KINDS = ("embed", "ffn", "head")
DEFAULT_SEQ = 64
DEFAULT_BATCH = 64
DEFAULT_MAX_CHUNK_MB = 1024.0


@dataclass
class Conversion:
    """What :func:`convert` wrote: the artifact's path and kind ("package" or "parts"), its
    functions, the checker's totals and reports (the lowered graphs', and the emitted
    programs' per part), each part's row (parts), and the seconds of each stage."""

    output: Path
    kind: str
    functions: list[str]
    errors: int
    warnings: int
    lowered: dict = field(default_factory=dict)  # function -> lowered Report
    emitted: list = field(default_factory=list)  # emitted Reports (a package) or dicts (parts)
    parts: list[dict] = field(default_factory=list)
    manifest: dict | None = None
    report: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    estimate: str = ""  # one line: ESTIMATED tokens/s on the default chip (anefx cost)


def lut_bits(
    lut: int | None = None,
    embed: int | None = None,
    ffn: int | None = None,
    head: int | None = None,
) -> dict[str, int] | None:
    """Weight kind -> bits: LUT for every kind, each kind's own value overriding it (0 keeps
    that kind fp16); None when nothing is palettized. The bit widths are checked."""
    from anefx.targets.palettize import check_lut

    bits = dict.fromkeys(LUT_KINDS, lut) if lut else {}
    for kind, value in zip(LUT_KINDS, (embed, ffn, head), strict=True):
        if value is not None:
            if value:
                bits[kind] = value
            else:
                bits.pop(kind, None)
    check_lut(bits)
    return bits or None


def _check_options(
    output: Path,
    kind: str,
    seq: int | None,
    context: int | None,
    batch: int | None,
    argmax: bool,
    dtype: torch.dtype,
    max_chunk_mb: float,
    resume: bool,
) -> tuple[int, int | None]:
    """The options one by one and together; returns (seq, batch) with their defaults."""
    width = rules.DIM_LIMITS["W"]  # a sequence or a context beyond it breaks dim_hw
    for name, value in (("--seq", seq), ("--context", context), ("--batch", batch)):
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        if not ok or (value is not None and not 1 <= value <= width):
            raise AnefxInputError(f"{name} must be an integer between 1 and {width}, got {value}")
    if dtype not in (torch.float16, torch.float32):
        raise AnefxInputError(f"dtype must be float16 or float32, got {dtype}")
    if not (isinstance(max_chunk_mb, (int, float)) and math.isfinite(max_chunk_mb)) or (
        max_chunk_mb <= 0
    ):
        raise AnefxInputError(
            f"--max-chunk-mb must be a finite positive number, got {max_chunk_mb}"
        )
    if context is None:
        if batch is not None:
            raise AnefxInputError("--batch is the prefill batch of --context: give --context too")
        if argmax:
            raise AnefxInputError("--argmax needs --context (the stateful decoder)")
    else:
        if seq is not None:
            raise AnefxInputError(
                "--seq is the length of a stateless package; with --context use --batch"
            )
        batch = min(DEFAULT_BATCH, context) if batch is None else batch
        if batch > context:
            raise AnefxInputError(f"--batch {batch} must not exceed --context {context}")
    if resume and kind == "package":
        raise AnefxInputError(
            f"--resume continues a conversion into a folder of parts; {output} is a single "
            "package, which is written whole"
        )
    return (DEFAULT_SEQ if seq is None else seq), batch


def _estimated_bytes(plan, lut: dict[str, int] | None, kind: str) -> int:
    """The artifact's bytes from the config alone (fp16, shrunk by the LUT where every kind is
    palettized; a tied embedding is stored again in the head part)."""
    config = plan.config
    total = plan.parameters * 2
    if kind == "parts" and getattr(config, "tie_word_embeddings", False):
        total += config.vocab_size * config.hidden_size * 2
    if lut and set(LUT_KINDS) <= set(lut):
        total = int(total * max(b / 16 for b in lut.values()))
    return total


def convert(
    model,
    output: str | Path,
    *,
    seq: int | None = None,
    context: int | None = None,
    batch: int | None = None,
    argmax: bool = False,
    dtype: torch.dtype = torch.float16,
    max_chunk_mb: float = DEFAULT_MAX_CHUNK_MB,
    lut: dict[str, int] | int | None = None,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> Conversion:
    """Convert MODEL (a checkpoint folder, a hub id in the local Hugging Face cache, or
    ``preset:NAME``) into the artifact OUTPUT: ``X.mlpackage`` (one package) or a folder of
    parts. Without CONTEXT, one stateless function of SEQ tokens (default 64); with it, the
    stateful ``prefill`` (BATCH tokens, default 64) and ``decode`` functions sharing a KV cache
    of CONTEXT positions as Core ML state. LUT palettizes weights (bits for every kind, or
    {"embed"|"ffn"|"head": bits}). RESUME finishes an interrupted parts conversion. OUTPUT must
    be new, an empty folder, or an artifact anefx wrote (see anefx.targets.artifact); an
    interrupted conversion's exception carries a note saying where its finished parts wait."""
    from anefx.models.capture import check_state_bytes
    from anefx.models.load import preflight
    from anefx.targets.artifact import PACKAGE_SUFFIX, prepare_output

    t0 = time.perf_counter()
    output = Path(output)
    kind = "package" if output.suffix == PACKAGE_SUFFIX else "parts"
    seq, batch = _check_options(
        output, kind, seq, context, batch, argmax, dtype, max_chunk_mb, resume
    )
    if isinstance(lut, dict) and not set(lut) <= set(LUT_KINDS):
        unknown = sorted(set(lut) - set(LUT_KINDS))[0]
        raise AnefxInputError(f"lut: {unknown!r} is not a weight kind ({', '.join(LUT_KINDS)})")
    lut = lut_bits(lut) if isinstance(lut, int) else lut_bits(**(lut or {}))
    # everything that can be checked without the weights, before any weight is read
    plan = preflight(model, dtype=dtype)
    if context is not None:
        check_state_bytes(plan.config, context)
    estimate = _estimated_bytes(plan, lut, kind)
    if kind == "package" and not force and estimate > 1.1 * max_chunk_mb * 2**20:
        # clearly too large (the exact test, on the lowered graph, follows the lowering)
        raise AnefxInputError(
            f"{output}: the weights (about {estimate / 2**20:,.0f} MiB) do not fit one "
            f"package of --max-chunk-mb {max_chunk_mb:g}; give -o a folder for the parts"
        )
    job = _Job(
        prepare_output(output, kind, plan.protected, resume=resume),
        seq,
        context,
        batch,
        argmax,
        dtype,
        float(max_chunk_mb),
        lut,
        force,
        resume,
        progress or quiet(),
    )
    try:
        with job.out:
            job.out.check_space(estimate, "the artifact (from the config)")
            result = job.run(plan)
    except BaseException as exc:
        for note in job.out.notes:  # the finished parts kept for --resume: the caller says so
            exc.add_note(note)
        raise
    result.seconds["total"] = time.perf_counter() - t0
    from anefx.core import rules
    from anefx.targets.cost import artifact_cost, one_line

    # from the program just written (its spec only; no digest pass over the weights)
    result.estimate = one_line(
        artifact_cost(result.output, verify=False), rules.CHIPS[rules.DEFAULT_CHIP]
    )
    return result


@dataclass
class _Job:
    """One conversion's checked options and its prepared output."""

    out: object  # anefx.targets.artifact.Output
    seq: int
    context: int | None
    batch: int | None
    argmax: bool
    dtype: torch.dtype
    max_chunk_mb: float
    lut: dict[str, int] | None
    force: bool
    resume: bool
    say: Progress

    def run(self, plan) -> Conversion:
        """Load, lower and write the artifact."""
        from anefx.models.load import load_model

        t0 = time.perf_counter()
        out, say = self.out, self.say
        lowered, default = _lower(
            load_model(plan), self.seq, self.context, self.batch, self.argmax, self.dtype, say
        )
        for name, low in lowered.items():
            # in parts, the package-size rule applies to each part, not the whole model
            errors = [
                e for e in low.report.errors if out.kind == "package" or e.rule != "weights_size"
            ]
            say(
                f"{name}: captured and lowered ({low.seconds.get('export', 0):.1f}s export, "
                f"{low.log.seconds:.2f}s passes): {len(errors)} error(s), "
                f"{len(low.report.warnings)} warning(s)"
                + (" (sizes checked per part)" if out.kind == "parts" else "")
            )
        first = next(iter(lowered.values()))
        result = Conversion(
            out.path,
            out.kind,
            list(lowered),
            0,
            0,
            lowered={n: low.report for n, low in lowered.items()},
            seconds={**first.seconds, "lower": time.perf_counter() - t0},
        )
        max_bytes = int(self.max_chunk_mb * 2**20)
        if out.kind == "package":
            _package(lowered, default, out.path, max_bytes, self.lut, self.force, out, say, result)
            return result
        if self.context is not None:
            options = {"context": self.context, "batch": self.batch, "argmax": self.argmax}
        else:
            options = {"seq": self.seq, "argmax": self.argmax}
        options["dtype"] = str(self.dtype).removeprefix("torch.")
        options["max_chunk_mb"] = self.max_chunk_mb
        manifest = _parts(
            lowered, default, out.path, max_bytes, self.lut, self.force, self.resume, options,
            out, say,
        )  # fmt: skip
        _fill_parts(result, manifest)
        return result


def _lower(loaded, seq, context, batch, argmax, dtype, say) -> tuple[dict, str]:
    """The lowered functions by name and the default one."""
    if context is not None:
        from anefx.generation import lower_decoder

        say(
            f"loading {loaded.source}; lowering prefill (batch {batch}) and decode, "
            f"context {context}"
        )
        dec = lower_decoder(loaded, batch=batch, context=context, dtype=dtype, argmax=argmax)
        return {"prefill": dec.prefill, "decode": dec.decode}, "decode"
    from anefx.lowering.api import lower

    say(f"loading {loaded.source}")
    return {"main": lower(loaded, seq_len=seq, dtype=dtype)}, "main"


def _package(lowered, default, output, max_bytes, lut, force, out, say, result) -> None:
    from anefx.targets.chunked import plan
    from anefx.targets.coreml import emit_functions

    parts = plan(lowered, max_bytes, lut)
    if len(parts) > 1 and not force:
        raise AnefxInputError(
            f"{output}: the weights do not fit one package of --max-chunk-mb "
            f"{max_bytes / 2**20:g} ({len(parts)} parts: {', '.join(p.name for p in parts)}); "
            "give -o a folder for the parts"
        )
    report = emit_functions(
        lowered, output, force=force, progress=say, default=default, lut=lut, output=out
    )
    say(f"wrote {output} (its report inside: Data/anefx/report.json)")
    emitted = report.pop("emitted_reports")
    result.report, result.emitted = report, emitted
    result.errors = sum(len(r.errors) for r in emitted)
    result.warnings = sum(len(r.warnings) for r in emitted)
    result.seconds["emit"] = report["seconds"]["emit"]


def _parts(lowered, default, output, max_bytes, lut, force, resume, options, out, say) -> dict:
    from anefx.targets.chunked import emit_chunked

    manifest = emit_chunked(
        lowered,
        output,
        max_bytes,
        default=default,
        lut=lut,
        force=force,
        resume=resume,
        progress=say,
        options=options,
        output=out,
    )
    say(f"wrote {len(manifest['parts'])} part(s) and manifest.json into {output}")
    return manifest


def _fill_parts(result: Conversion, manifest: dict) -> None:
    result.manifest = manifest
    result.errors = manifest["checker"]["errors"]
    result.warnings = manifest["checker"]["warnings"]
    result.emitted = [rep for p in manifest["parts"] for rep in p["emitted"]]
    result.parts = [
        {
            "file": p["file"],
            "kind": p["kind"],
            "layers": f"{p['layers'][0]}-{p['layers'][-1]}" if p["layers"] else "-",
            "weight_mib": round(p["weight_bytes"] / 2**20, 1),
            "package_mib": round(p["package_bytes"] / 2**20, 1),
            "lut": ",".join(f"{k}:{v}" for k, v in p["lut"].items()) or "-",
            "errors": p["errors"],
            "warnings": p["warnings"],
        }
        for p in manifest["parts"]
    ]
