"""Chunked emission: a model too large for one package becomes a folder of parts + a manifest.

The lowered graphs (``prefill`` and ``decode``, or ``main``) are cut by
:mod:`anefx.targets.split_packages` into the embedding, decoder chunks of contiguous layers sized by
weight bytes, and the LM head; each part is one package holding every function. The whole
folder is built in the output's staging folder (:class:`anefx.targets.artifact.Output`), each
finished part followed by a progress record, so an interrupted conversion resumes at the first
part not written, and swapped into place when complete. ``manifest.json`` is written last:
the parts in order, each function's inputs (and where each comes from), outputs and states,
the context, the tokenizer files, the rule table version and the checker results. It holds no
timings, so an interrupted-and-resumed conversion and an uninterrupted one give the same bytes.

:class:`anefx.targets.coreml_exec.ChainProgram` reads such a folder back (checked against its
digests) and runs it on the reference executor with the interface of one program
(``run(function, inputs, states)``), which is how ``anefx verify`` and ``anefx generate`` run a
chunked artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from anefx.core import rules
from anefx.core.signature import signature_of
from anefx.errors import AnefxInputError
from anefx.lowering.checker import check_graph
from anefx.models.load import release_mapped_pages
from anefx.targets.artifact import (
    MANIFEST,
    PACKAGE_SUFFIX,
    PARTS_FORMAT,
    PROGRESS,
    Output,
    copy_new,
    package_signature,
    prepare_output,
    refuse_unless_forced,
    tokenizer_files,
    tree_digest,
    write_json,
)
from anefx.targets.split_packages import PartPlan, plan_parts, split_graph

_LUT_KINDS = {"embed": "embed", "decoder": "ffn", "head": "head"}


# A palettized weight is stored at bits/16 of its fp16 size; the tables (2**bits fp16 values per
# 16 rows: under 1% at 8 bits for a 1024-wide matrix) and the weights left dense (norms, biases)
# are covered by this margin when sizing parts. The emitted reports give the real bytes.
LUT_MARGIN = 1.05


def plan(lowered_by_name: dict, max_bytes: int, lut: dict[str, int] | None = None):
    """The parts for LOWERED_BY_NAME (planned on its first graph; every graph splits alike),
    sized by the bytes the packages will store under palettization LUT."""
    if max_bytes <= 0:
        raise AnefxInputError(f"--max-chunk-mb must be positive, got {max_bytes / 2**20:g}")
    stored = {
        part: min(1.0, lut[kind] / 16 * LUT_MARGIN)
        for part, kind in _LUT_KINDS.items()
        if lut and lut.get(kind)
    }
    return plan_parts(next(iter(lowered_by_name.values())).graph_module, max_bytes, stored)


def _file_name(i: int, p: PartPlan) -> str:
    return f"{i:02d}_{p.name}.mlpackage"


def _part_lowered(low, gm, plan_: PartPlan):
    stats = {"part": plan_.name, "seq_len": low.seq_len}
    return dataclasses.replace(
        low,
        graph_module=gm,
        report=check_graph(gm, f"lowered:{plan_.name}", stats),
        captured_report=None,
    )


def _part_lut(p: PartPlan, lut: dict[str, int] | None) -> dict[str, int] | None:
    """The weight kinds of LUT that this part holds (a whole part holds every kind)."""
    if not lut:
        return None
    if p.kind == "whole":
        return dict(lut)
    kind = _LUT_KINDS[p.kind]
    return {kind: lut[kind]} if kind in lut else None


def _source_identity(source: str) -> dict:
    """What the conversion read: a folder's files by name, size and modification time."""
    folder = Path(source)
    if not folder.is_dir():
        return {"source": source}
    files = sorted(
        p for p in folder.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file()
    )
    return {
        "source": str(folder.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


# a part being written inside the staged folder, renamed to its file name when complete
_PARTIAL = ".partial-"


def emit_chunked(
    lowered_by_name: dict,
    folder: str | Path,
    max_bytes: int,
    default: str | None = None,
    lut: dict[str, int] | None = None,
    force: bool = False,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
    options: dict | None = None,
    output: Output | None = None,
) -> dict:
    """Write the parts of LOWERED_BY_NAME and ``manifest.json`` as the artifact FOLDER; return
    the manifest.

    Everything is written into FOLDER's staging folder and swapped into place when complete
    (:class:`anefx.targets.artifact.Output`; OUTPUT when the caller checked FOLDER already), so
    FOLDER is never half old, half new. After each part a progress record is written: RESUME
    keeps the parts an interrupted run of the same conversion (same model files, options and
    lowered graphs) finished, and emits the rest. OPTIONS (the command line's) are recorded in
    the manifest.
    """
    from anefx.targets.coreml import source_folders, write_package
    from anefx.targets.palettize import check_lut

    say = progress or (lambda msg: None)
    folder = Path(folder)
    if folder.suffix == PACKAGE_SUFFIX:
        raise AnefxInputError(
            f"{folder}: this model is written as several parts; -o must name a folder"
        )
    check_lut(lut)
    plans = plan(lowered_by_name, max_bytes, lut)
    names = list(lowered_by_name)
    default = default or names[0]
    split = {n: split_graph(low.graph_module, plans) for n, low in lowered_by_name.items()}
    parts = [
        {n: _part_lowered(lowered_by_name[n], split[n][i], p) for n in names}
        for i, p in enumerate(plans)
    ]
    errors = [
        (f" in part {p.name}, function {fn}", e)
        for p, by_fn in zip(plans, parts, strict=True)
        for fn, low in by_fn.items()
        for e in low.report.errors
    ]
    forced = refuse_unless_forced(errors, force, say)
    first = lowered_by_name[names[0]]
    tokenizer = tokenizer_files(first.source)  # checked before any part is written
    key_doc = {
        "format": PARTS_FORMAT,
        "model": _source_identity(first.source),
        "options": options or {},
        "lut": lut or {},
        "max_bytes": max_bytes,
        "rules": rules.RULES_VERSION,
        "graphs": {
            n: hashlib.sha256(str(low.graph_module.graph).encode()).hexdigest()
            for n, low in lowered_by_name.items()
        },
        "plans": [p.to_dict() for p in plans],
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()
    out = output or prepare_output(folder, "parts", source_folders(lowered_by_name), resume)
    with out:
        staged = out.staged
        staged.mkdir(exist_ok=True)
        done = _resumable(staged, key) if resume else ({}, {})
        files = [_file_name(i, p) for i, p in enumerate(plans)]
        out.check_space(
            sum(p.planned_bytes for f, p in zip(files, plans, strict=True) if f not in done[0]),
            f"{len(plans) - len(done[0])} part(s)",
        )
        for stale in staged.iterdir():  # parts not recorded as finished, partial ones
            if stale.name in done[0] or stale.name == PROGRESS:
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        record = {"key": key, "written": dict(done[0]), "emitted": dict(done[1])}
        write_json(staged / PROGRESS, record)
        part_docs = []
        for i, (p, by_fn) in enumerate(zip(plans, parts, strict=True)):
            target = staged / files[i]
            if files[i] in done[0]:
                say(f"part {i + 1}/{len(plans)} {files[i]}: already written, kept (--resume)")
            else:
                say(f"part {i + 1}/{len(plans)} {files[i]} ({p.planned_bytes / 2**20:.1f} MiB)")
                partial = staged / f"{_PARTIAL}{files[i]}"
                emitted = write_package(by_fn, partial, default, _part_lut(p, lut), say, out)
                os.replace(partial, target)
                record["written"][files[i]] = tree_digest(target)
                record["emitted"][files[i]] = [r.to_dict() for r in emitted]
                write_json(staged / PROGRESS, record)
                out.keep_on_failure = True  # finished parts survive an interruption
                release_mapped_pages()  # this part's weights leave the resident set
            emitted = record["emitted"][files[i]]
            part_docs.append(
                {
                    "file": files[i],
                    **p.to_dict(),
                    "lut": _part_lut(p, lut) or {},
                    "sha256": record["written"][files[i]],
                    "package_bytes": sum(
                        f.stat().st_size for f in target.rglob("*") if f.is_file()
                    ),
                    "modules": list(signature_of(by_fn[default].graph_module).modules),
                    "functions": {
                        fn: package_signature(signature_of(low.graph_module))
                        for fn, low in by_fn.items()
                    },
                    "lowered": {
                        fn: {
                            "errors": len(low.report.errors),
                            "warnings": len(low.report.warnings),
                            "counts": low.report.counts(),
                        }
                        for fn, low in by_fn.items()
                    },
                    "emitted": emitted,
                    "errors": sum(r["errors"] for r in emitted),
                    "warnings": sum(r["warnings"] for r in emitted),
                }
            )
        manifest = _manifest(
            lowered_by_name,
            default,
            key,
            part_docs,
            staged,
            options,
            lut,
            max_bytes,
            tokenizer,
            forced,
        )
        write_json(staged / MANIFEST, manifest)
        (staged / PROGRESS).unlink()
        out.commit()
    return manifest


def _resumable(staged: Path, key: str) -> tuple[dict[str, str], dict[str, list]]:
    """Parts an interrupted run of the same conversion finished in STAGED and that are still
    intact: (file -> digest, file -> its checker reports)."""
    prog = staged / PROGRESS
    if not prog.is_file():
        return {}, {}
    try:
        record = json.loads(prog.read_text())
        written, emitted = record["written"], record["emitted"]
        if not (isinstance(written, dict) and isinstance(emitted, dict)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return {}, {}  # a damaged record: every part is written again
    if record.get("key") != key:
        raise AnefxInputError(
            f"{staged.parent}: --resume, but the parts staged there come from another model, "
            "other options or another anefx; convert without --resume to start again"
        )
    kept = {}
    for name, digest in written.items():
        path = staged / name
        if (
            isinstance(name, str)
            and "/" not in name
            and not name.startswith(".")
            and path.is_dir()
            and not path.is_symlink()
            and name in emitted
            and tree_digest(path) == digest
        ):
            kept[name] = digest
    return kept, {n: emitted[n] for n in kept}


def _manifest(
    lowered_by_name, default, key, part_docs, folder, options, lut, max_bytes, tokenizer, forced
) -> dict:
    from anefx.targets.artifact import file_digest

    first = next(iter(lowered_by_name.values()))
    cfg = first.config
    for name, src in tokenizer.items():
        copy_new(src, folder / name)
    # the digests of the copies: what a reader checks before it uses them
    tokenizer_sha256 = {name: file_digest(folder / name) for name in tokenizer}
    return {
        "format": PARTS_FORMAT,
        "conversion_key": key,
        "model": {
            "source": first.source,
            "random_weights": first.random_weights,
            "model_type": getattr(cfg, "model_type", None),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
        },
        "functions": list(lowered_by_name),
        "default_function": default,
        "seq_len": {n: low.seq_len for n, low in lowered_by_name.items()},
        "context": first.context,
        "dtype": "float16",
        "rules_version": rules.RULES_VERSION,
        "max_chunk_mb": max_bytes / 2**20,
        "lut": lut or {},
        "options": options or {},
        "tokenizer_files": list(tokenizer),
        "tokenizer_sha256": tokenizer_sha256,
        "checker": {
            "errors": sum(p["errors"] for p in part_docs),
            "warnings": sum(p["warnings"] for p in part_docs),
            "forced": forced,
        },
        "parts": part_docs,
    }
