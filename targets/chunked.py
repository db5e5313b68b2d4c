"""Chunked emission: a model too large for one package becomes a folder of parts + a manifest.

The lowered graphs (``prefill`` and ``decode``, or ``main``) are cut by
:mod:`anefx.lowering.partition` into the embedding, decoder chunks of contiguous layers sized by
weight bytes, and the LM head; each part is one package holding every function, written
atomically (staged beside the target, then renamed) and followed by a progress record, so an
interrupted conversion resumes at the first part not written. ``manifest.json`` is written last:
the parts in order, each function's inputs (and where each comes from), outputs and states,
the context, the tokenizer files, the rule table version and the checker results. It holds no
timings, so an interrupted-and-resumed conversion and an uninterrupted one give the same bytes.

:class:`ChainProgram` runs such a folder on the reference executor with the interface of one
program (``run(function, inputs, states)``), which is how ``anefx verify`` and
``anefx generate`` run a chunked artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from anefx.errors import AnefxGraphError, AnefxInputError
from anefx.lowering import rules
from anefx.lowering.checker import check_graph
from anefx.lowering.partition import PartPlan, plan_parts, split_graph
from anefx.models.load import release_mapped_pages

MANIFEST = "manifest.json"
PROGRESS = ".anefx-progress.json"
FORMAT = "anefx-chunked/1"
# copied from a checkpoint folder next to the parts, so the artifact is self-contained
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
_MODEL_INPUTS = ("input_ids", "position_ids", "causal_mask")
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


def _io(gm) -> dict:
    """A part graph's inputs (with their source), outputs and states, for the manifest."""

    def desc(name: str, v) -> dict:
        dt = "int32" if v.dtype in (torch.int32, torch.int64) else "float16"
        return {"name": name, "shape": [int(s) for s in v.shape], "dtype": dt}

    states = {s["name"] for s in gm.meta["anefx_states"]}
    sources = gm.meta["anefx_inputs_from"]
    inputs = [
        {**desc(n.name, n.meta["val"]), "from": sources[n.name]}
        for n in gm.graph.nodes
        if n.op == "placeholder" and n.name not in states
    ]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    names = [o["name"] for o in gm.meta["anefx_outputs"]]
    outputs = [desc(nm, v.meta["val"]) for nm, v in zip(names, out_node.args[0], strict=False)]
    return {
        "inputs": inputs,
        "outputs": outputs,
        "states": [
            {"name": s["name"], "shape": list(s["shape"]), "dtype": "float16"}
            for s in gm.meta["anefx_states"]
        ],
    }


def _part_lowered(low, gm, plan_: PartPlan):
    stats = {"part": plan_.name, "seq_len": low.seq_len}
    if gm.meta.get("anefx_states"):
        stats["states"] = gm.meta["anefx_states"]
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


def _tree_digest(path: Path) -> str:
    """sha256 over a package's files (relative path and bytes), in a fixed order."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


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
) -> dict:
    """Write the parts of LOWERED_BY_NAME into FOLDER, then ``manifest.json``; return it.

    RESUME keeps the parts an earlier run of the same conversion (same model files, options
    and lowered graphs) recorded as written and emits the rest; without it every part is
    written again. OPTIONS (the command line's) are recorded in the manifest.
    """
    from anefx.targets.coreml import move_into_place, write_package

    say = progress or (lambda msg: None)
    folder = Path(folder)
    if folder.suffix == ".mlpackage":
        raise AnefxInputError(
            f"{folder}: this model is written as several parts; -o must name a folder"
        )
    if folder.exists() and not folder.is_dir():
        raise AnefxInputError(f"{folder} exists and is not a folder")
    from anefx.targets.palettize import check_lut

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
        (p.name, fn, e)
        for p, by_fn in zip(plans, parts, strict=True)
        for fn, low in by_fn.items()
        for e in low.report.errors
    ]
    if errors and not force:
        part, fn, e = errors[0]
        raise AnefxGraphError(
            f"refusing to emit: {len(errors)} ANE error(s) in the parts (first: {e.rule} at "
            f"{e.node} in part {part}, function {fn}); use --force to emit anyway"
        )
    first = lowered_by_name[names[0]]
    key_doc = {
        "format": FORMAT,
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
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnefxInputError(f"cannot create output folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise AnefxInputError(f"output folder {folder} is not writable")
    for stale in folder.glob(".*.mlpackage.*"):  # staging left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    done = _resumable(folder, key) if resume else ({}, {})
    files = [_file_name(i, p) for i, p in enumerate(plans)]
    manifest_path = folder / MANIFEST
    earlier = _listed(folder)
    if manifest_path.exists() and not (resume and done[0]):
        manifest_path.unlink()  # the folder no longer holds what it describes
    record = {"key": key, "written": dict(done[0]), "emitted": dict(done[1])}
    _write_json(folder / PROGRESS, record)
    part_docs = []
    for i, (p, by_fn) in enumerate(zip(plans, parts, strict=True)):
        target = folder / files[i]
        if files[i] in done[0] and target.is_dir():
            say(f"part {i + 1}/{len(plans)} {files[i]}: already written, kept (--resume)")
        else:
            say(f"part {i + 1}/{len(plans)} {files[i]} ({p.planned_bytes / 2**20:.1f} MB)")
            tmp = Path(tempfile.mkdtemp(prefix=f".{files[i]}.", dir=folder))
            try:
                emitted = write_package(by_fn, tmp / files[i], default, _part_lut(p, lut), say)
                move_into_place(tmp / files[i], target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            record["written"][files[i]] = _tree_digest(target)
            record["emitted"][files[i]] = [r.to_dict() for r in emitted]
            _write_json(folder / PROGRESS, record)
            release_mapped_pages()  # this part's weights leave the resident set
        emitted = record["emitted"][files[i]]
        part_docs.append(
            {
                "file": files[i],
                **p.to_dict(),
                "lut": _part_lut(p, lut) or {},
                "sha256": record["written"][files[i]],
                "package_bytes": sum(f.stat().st_size for f in target.rglob("*") if f.is_file()),
                "modules": by_fn[default].graph_module.meta["anefx_part_modules"],
                "functions": {fn: _io(low.graph_module) for fn, low in by_fn.items()},
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
    manifest = _manifest(lowered_by_name, default, key, part_docs, folder, options, lut, max_bytes)
    _write_json(manifest_path, manifest)
    (folder / PROGRESS).unlink(missing_ok=True)
    for name in earlier - set(files):  # parts of an earlier conversion into this folder
        shutil.rmtree(folder / name, ignore_errors=True)
    return manifest


def _listed(folder: Path) -> set[str]:
    """Part files an earlier conversion's manifest or progress record lists in FOLDER."""
    out: set[str] = set()
    for name, field in ((MANIFEST, "parts"), (PROGRESS, "written")):
        try:
            doc = json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entries = doc.get(field) or []
        out |= {e["file"] for e in entries} if field == "parts" else set(entries)
    return {n for n in out if n.endswith(".mlpackage") and "/" not in n}


def _resumable(folder: Path, key: str) -> tuple[dict[str, str], dict[str, list]]:
    """Parts an earlier run of the same conversion wrote and that are still intact:
    (file -> digest, file -> its checker reports)."""
    prog = folder / PROGRESS
    if not prog.is_file():
        if (folder / MANIFEST).is_file():
            man = json.loads((folder / MANIFEST).read_text())
            if man.get("conversion_key") == key:
                parts = [p for p in man["parts"] if (folder / p["file"]).is_dir()]
                return (
                    {p["file"]: p["sha256"] for p in parts},
                    {p["file"]: p["emitted"] for p in parts},
                )
        return {}, {}
    try:
        record = json.loads(prog.read_text())
    except json.JSONDecodeError:
        return {}, {}
    if record.get("key") != key:
        raise AnefxInputError(
            f"{folder}: --resume, but the parts there come from another model, other options "
            "or another anefx; convert without --resume to replace them"
        )
    kept = {}
    for name, digest in record.get("written", {}).items():
        path = folder / name
        if path.is_dir() and name in record.get("emitted", {}) and _tree_digest(path) == digest:
            kept[name] = digest
    return kept, {n: record["emitted"][n] for n in kept}


def _manifest(lowered_by_name, default, key, part_docs, folder, options, lut, max_bytes) -> dict:
    first = next(iter(lowered_by_name.values()))
    cfg = first.config
    source = Path(first.source)
    tokenizer = []
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
                tokenizer.append(name)
    return {
        "format": FORMAT,
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
        "tokenizer_files": tokenizer,
        "checker": {
            "errors": sum(p["errors"] for p in part_docs),
            "warnings": sum(p["warnings"] for p in part_docs),
        },
        "parts": part_docs,
    }


# ---------------------------------------------------------------------------------------------
# Running a chunked artifact


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a chunked artifact, checked against the files beside it."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file() and (folder / PROGRESS).is_file():
        raise AnefxInputError(
            f"{folder}: an interrupted conversion (no manifest.json yet); run the same "
            "anefx convert again with --resume to finish it"
        )
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise AnefxInputError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise AnefxInputError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    validate_manifest(doc, folder)
    return doc


def validate_manifest(doc: dict, folder: Path) -> None:
    """Raise AnefxInputError naming the first field or file of DOC that is wrong."""
    where = folder / MANIFEST

    def bad(msg: str) -> AnefxInputError:
        return AnefxInputError(f"{where}: {msg}")

    if doc.get("format") != FORMAT:
        raise bad(f"field 'format' is {doc.get('format')!r}, expected {FORMAT!r}")
    parts = doc.get("parts")
    if not isinstance(parts, list) or not parts:
        raise bad("field 'parts' missing or empty")
    fns = doc.get("functions")
    if not isinstance(fns, list) or doc.get("default_function") not in fns:
        raise bad("fields 'functions' / 'default_function' missing or inconsistent")
    produced: list[dict[str, dict]] = []
    layers: list[int] = []
    for i, part in enumerate(parts):
        if not (folder / part.get("file", "")).is_dir():
            raise bad(f"part {i} file {part.get('file')!r} is not in the folder")
        layers += part.get("layers", [])
        outs = {}
        for fn in fns:
            io = (part.get("functions") or {}).get(fn)
            if io is None:
                raise bad(f"part {part['file']} has no function {fn!r}")
            for inp in io["inputs"]:
                src = inp["from"]
                if "model" in src:
                    if src["model"] not in _MODEL_INPUTS:
                        raise bad(f"{part['file']} input {inp['name']}: unknown model input")
                elif not (0 <= src["part"] < i and src["output"] in produced[src["part"]][fn]):
                    raise bad(f"{part['file']} input {inp['name']}: no earlier part gives it")
            outs[fn] = {o["name"] for o in io["outputs"]}
        produced.append(outs)
    n = doc["model"]["num_hidden_layers"]
    if sorted(layers) != list(range(n)) or len(layers) != n:
        raise bad(f"the parts hold layers {layers}, expected each of 0..{n - 1} once")


class ChainProgram:
    """A chunked artifact on the reference executor, with the interface of one program:
    ``run(function, inputs, states)`` runs every part in order, wiring each part's inputs
    from the model inputs or from an earlier part's outputs."""

    def __init__(self, folder: str | Path):
        from anefx.targets.coreml_exec import load_package

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.parts = [(load_package(self.folder / p["file"]), p) for p in self.manifest["parts"]]

    @property
    def functions(self) -> list[str]:
        return list(self.manifest["functions"])

    def final_outputs(self, function: str) -> list[dict]:
        """The outputs no later part reads (the logits), in part order."""
        read = {
            (inp["from"]["part"], inp["from"]["output"])
            for _, p in self.parts
            for inp in p["functions"][function]["inputs"]
            if "part" in inp["from"]
        }
        return [
            o
            for i, (_, p) in enumerate(self.parts)
            for o in p["functions"][function]["outputs"]
            if (i, o["name"]) not in read
        ]

    def states(self, function: str) -> list[dict]:
        return [s for _, p in self.parts for s in p["functions"][function]["states"]]

    def zero_states(self, function: str) -> dict[str, np.ndarray]:
        return {s["name"]: np.zeros(s["shape"], np.float16) for s in self.states(function)}

    def run(self, function: str, inputs: dict, states: dict | None = None):
        states = states or {}
        produced: list[dict] = []
        new_states: dict = {}
        for program, part in self.parts:
            io = part["functions"][function]
            feeds = {}
            for inp in io["inputs"]:
                src = inp["from"]
                if "model" in src:
                    feeds[inp["name"]] = inputs[src["model"]]
                else:
                    feeds[inp["name"]] = produced[src["part"]][src["output"]]
            mine = {s["name"]: states[s["name"]] for s in io["states"] if s["name"] in states}
            outs, new = program.run(function, feeds, mine)
            produced.append(outs)
            new_states.update(new)
        final = {o["name"] for o in self.final_outputs(function)}
        return {k: v for outs in produced for k, v in outs.items() if k in final}, new_states
