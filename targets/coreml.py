"""Core ML emission: the lowered fx graph -> an mlprogram (fp16, iOS18) written atomically.

It translates the lowered graph op by op with the MIL builder, each op by its translator in the
op registry (:mod:`anefx.targets.op_registry`; the graph holds only ops the ANE runs, so the
translation is one-to-one and needs no converter heuristics), names the Core ML inputs, outputs
and states from the graph's signature, names every MIL op "<module>__<pass>__<node>"
(:mod:`anefx.targets.mil_program` reads the names back) so the checker can point back to the
source, writes the package into
the output's staging folder (:mod:`anefx.targets.artifact`), checks the saved program, stores
the report inside the package, and only then swaps it into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from anefx.core import rules
from anefx.core.annotations import MODULE
from anefx.core.ops import KV_WRITE
from anefx.core.signature import Role, carried_output, pack_states, signature_of
from anefx.errors import AnefxGraphError
from anefx.lowering.checker import Report
from anefx.targets import op_registry
from anefx.targets.artifact import (
    PACKAGE_FORMAT,
    PACKAGE_MANIFEST,
    REPORT_AUTHOR,
    REPORT_ITEM,
    REPORT_NAME,
    Output,
    package_files,
    package_signature,
    prepare_output,
    refuse_unless_forced,
    tokenizer_files,
    write_new,
)
from anefx.targets.mil_program import MODULES_KEY, NAME_SEP, check_spec, encode_module

# consts of at least this many elements go to the weight blob (coremltools writes smaller ones
# inline, where sharing means nothing)
_SHARED_WEIGHT_MIN = 10

_NP = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.int32: np.int32,
    torch.int64: np.int32,  # Core ML has no int64 tensors; ids and positions fit int32
    torch.bool: np.bool_,
}


def _ct():
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' pass progress bars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct

    return ct


def _name(node: fx.Node) -> str:
    module = encode_module(node.meta.get(MODULE))
    pass_ = node.meta.get("anefx_pass") or "capture"
    return f"{module}{NAME_SEP}{pass_}{NAME_SEP}{node.name}"


class _Emitter:
    def __init__(self, gm: fx.GraphModule, weight_ids: dict | None = None):
        ct = _ct()
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        self.ct, self.mb, self.types = ct, mb, types
        self.gm = gm
        # content key -> blob id, shared by every function of one package: identical weights
        # are written once and every function's const points at the same bytes
        self.weight_ids = {} if weight_ids is None else weight_ids
        self.env: dict[fx.Node, object] = {}
        self.shared: dict = {}  # values a function computes once for several ops (positions)
        self.packed = None  # the program's one state (pack_states), set by build
        self.rows: dict[str, int] = {}  # state name -> its row of the packed state
        self.written: dict[str, fx.Node] = {}  # state name -> the kv_write that wrote its rows

    def const(self, t: torch.Tensor, name: str):
        arr = t.detach().cpu().numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        if arr.dtype == np.float32 or arr.dtype == np.float64:
            arr = arr.astype(np.float16)
        if arr.dtype == np.int64:
            arr = arr.astype(np.int32)
        var = self.mb.const(val=arr, name=name)
        if arr.size >= _SHARED_WEIGHT_MIN:
            arr = np.ascontiguousarray(arr)
            key = (arr.shape, arr.dtype.str, hashlib.blake2b(arr.data, digest_size=16).digest())
            var.op.weight_id = self.weight_ids.setdefault(key, f"w{len(self.weight_ids)}")
        return var

    def scalar(self, x, like_dtype=None):
        if isinstance(x, bool):
            return x
        if isinstance(x, float) or like_dtype in (torch.float16, torch.float32):
            return np.float16(x)
        return np.int32(x)

    def build(self):
        """The graph as one MIL Function (add it to a Program under its name)."""
        mb, types = self.mb, self.types
        from coremltools.converters.mil.mil import Function

        tmap = {
            torch.float16: types.fp16,
            torch.float32: types.fp16,
            torch.int32: types.int32,
            torch.int64: types.int32,
        }
        self.sig = signature_of(self.gm)
        # every state held in place becomes a row of the program's one Core ML state; a
        # carried state is an input, and its new value an output
        self.states = {s.name for s in self.sig.states if not s.carried}
        packed = pack_states(self.sig.states)
        if len(packed) > 1:
            raise AnefxGraphError(
                f"{len(packed)} states that cannot share one tensor ({', '.join(self.states)}): "
                f"a program holds at most {rules.MAX_STATES_PER_PROGRAM} (rule state_count)"
            )
        self.packed = packed[0] if packed else None
        held = [st for st in self.sig.states if not st.carried]
        self.rows = {st.name: i for i, st in enumerate(held)}
        placeholders = {}
        if self.packed is not None:
            placeholders[self.packed.name] = mb.state_tensor_placeholder(
                shape=list(self.packed.shape), dtype=types.fp16
            )
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.name not in self.states:
                v = node.meta["val"]
                placeholders[node.name] = mb.placeholder(shape=list(v.shape), dtype=tmap[v.dtype])
        func = Function(placeholders, opset_version=self.ct.target.iOS18)
        with func:
            outputs = self._body(func.inputs)
            func.set_outputs(outputs)
        return func

    def _body(self, inputs):
        n_states = len(self.sig.states)
        if self.packed is not None:
            self.state_var = inputs[self.packed.name]
            self.state_value = self.mb.read_state(
                input=self.state_var, name=f"{self.packed.name}_read"
            )
            self.initial_state = self.state_value
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.states:
                    # a layer's cache as it was: a view of its row, made only if something
                    # besides its own kv_write reads it
                    readers = [
                        u for u in node.users if not (u.target is KV_WRITE and u.args[0] is node)
                    ]
                    self.env[node] = (
                        self._row_view(node.name, self.initial_state) if readers else None
                    )
                else:
                    self.env[node] = inputs[node.name]
            elif node.op == "get_attr":
                t = self.gm
                for part in node.target.split("."):
                    t = getattr(t, part)
                self.env[node] = self.const(t, _name(node))
            elif node.op == "call_function":
                self.env[node] = self.op(node)
            elif node.op == "output":
                outs = node.args[0]
                outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
                user, state_vals = outs[: len(outs) - n_states], outs[len(outs) - n_states :]
                carried = []
                for state, value in zip(self.sig.states, state_vals, strict=True):
                    if state.carried:
                        carried.append((state, value))
                        continue
                    if self.written.get(state.name) is value:
                        continue  # its rows were written in place by its kv_write
                    # anything else is the whole row, written back
                    i, shape = self.rows[state.name], self.packed.shape
                    new = self.mb.slice_update(
                        x=self.state_value,
                        update=self.env[value],
                        begin=[i, *[0] * (len(shape) - 1)],
                        end=[i + 1, *shape[1:]],
                        name=f"{state.name}_row",
                    )
                    self.state_value = self.mb.coreml_update_state(
                        state=self.state_var, value=new, name=f"{state.name}_write"
                    )
                names = [o.name for o in self.sig.outputs]
                names += [carried_output(state) for state, _ in carried]
                user = [*user, *(value for _, value in carried)]
                results = []
                for o, name in zip(user, names, strict=True):
                    var = self.env[o]
                    if o.op == "call_function" and len(o.users) == 1:
                        var.name = name  # name the producing op's result; no extra op
                    else:
                        var = self.mb.identity(x=var, name=name)
                    results.append(var)
                return results
        raise AnefxGraphError("lowered graph has no output")

    def _row_view(self, name: str, value, op_name: str | None = None):
        """State NAME's row of the packed state VALUE, (1, ...): a slice of its leading axis."""
        i, shape = self.rows[name], self.packed.shape
        return self.mb.slice_by_index(
            x=value,
            begin=[i, *[0] * (len(shape) - 1)],
            end=[i + 1, *shape[1:]],
            name=op_name or f"{name}_view",
        )

    def write_state_rows(self, c, cache: fx.Node, rows, begin):
        """kv_write into a state: the call's rows written in place into the cache's row of the
        packed state (slice_update at [row, 0, .., p], then the state updated), and that row
        as the result; None when CACHE is not a state placeholder."""
        if cache.op != "placeholder" or cache.name not in self.rows:
            return None
        i, shape = self.rows[cache.name], self.packed.shape
        width = c.meta("rows").shape
        mb = self.mb
        at = mb.add(
            x=begin, y=np.array([i, *[0] * (len(shape) - 1)], np.int32), name=f"{c.name}_at"
        )
        end = mb.add(x=at, y=np.array([1, *width[1:]], np.int32), name=f"{c.name}_end")
        new = mb.slice_update(
            x=self.state_value, update=rows, begin=at, end=end, name=f"{c.name}_rows"
        )
        self.state_value = mb.coreml_update_state(
            state=self.state_var, value=new, name=f"{c.name}_state"
        )
        self.written[cache.name] = c.node
        return self._row_view(cache.name, self.state_value, c.name)

    def op(self, node: fx.Node):
        """NODE's MIL value, by its op's translator in the registry (targets/op_registry.py)."""
        return op_registry.translate(self, node, _name(node))


def read_spec(path: str | Path):
    """The spec protobuf of a saved package (works on Linux), read without modifying the package
    (coremltools' MLModel rewrites its Manifest.json)."""
    from anefx.targets.reader import read_spec as read

    return read(path)


def check_package(path: str | Path) -> list[Report]:
    """Run the rule table on every function of a saved package."""
    return check_spec(read_spec(path))


def _errors(lowered_by_name: dict) -> list[tuple[str, object]]:
    """(where, violation) of every ANE error of the graphs, for refuse_unless_forced."""
    return [
        ("" if name == "main" else f" in function {name}", e)
        for name, low in lowered_by_name.items()
        for e in low.report.errors
    ]


def _modules(lowered_by_name: dict) -> dict[str, str]:
    """Encoded module name (as written into op names) -> dotted module path."""
    return {
        encode_module(m): m
        for low in lowered_by_name.values()
        for n in low.graph_module.graph.nodes
        if (m := n.meta.get(MODULE))
    }


def convert_program(prog, package_dir: Path | None = None):
    """A final MIL program -> an fp16 iOS18 mlprogram, with no graph passes; with PACKAGE_DIR
    the package is written there directly (no temporary copy)."""
    ct = _ct()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
            # the program is already final: coremltools' graph passes would only add int16
            # index casts around the gather and cost time on every weight
            pass_pipeline=ct.PassPipeline.EMPTY,
            package_dir=None if package_dir is None else str(package_dir),
        )


def _convert(
    lowered_by_name: dict, default: str, path: Path, lut: dict[str, int] | None = None
) -> dict[str, str]:
    """Lowered graphs -> one package at PATH with a function per graph, weights shared;
    returns the metadata to record in it (the palettization summary).

    The functions are built into one MIL program and serialised once: a weight that several
    functions read (by content: same shape, dtype and bytes) is written to the blob once.
    LUT (weight kind "embed" / "ffn" / "head" -> bits) palettizes those weights.
    """
    _ct()  # quiets coremltools before its first import
    from coremltools.converters.mil.mil import Program

    prog, weight_ids = Program(), {}
    for name, low in lowered_by_name.items():
        prog.add_function(name, _Emitter(low.graph_module, weight_ids).build())
    prog.default_function_name = default
    prog.export_as_multifunction = len(lowered_by_name) > 1
    metadata = {}
    if lut:
        from anefx.models.families import family_of
        from anefx.targets.palettize import LUT_KEY, palettize_program

        family = family_of(next(iter(lowered_by_name.values())).config)
        summary = palettize_program(prog, lut, _modules(lowered_by_name), family.weight_kind)
        metadata[LUT_KEY] = json.dumps(summary.to_metadata(), separators=(",", ":"))
    convert_program(prog, package_dir=path)
    return metadata


def emit(
    lowered,
    path: str | Path,
    force: bool = False,
    progress=None,
    lut: dict | None = None,
    output: Output | None = None,
) -> dict:
    """Write LOWERED as a Core ML package at PATH; return its report (also stored in it)."""
    return emit_functions(
        {"main": lowered}, path, force=force, progress=progress, lut=lut, output=output
    )


def source_folders(lowered_by_name: dict) -> list[Path]:
    """The checkpoint folder the graphs were lowered from (never written into), if any."""
    source = Path(str(next(iter(lowered_by_name.values())).source))
    return [source] if source.is_dir() else []


def emit_functions(
    lowered_by_name: dict,
    path: str | Path,
    force: bool = False,
    progress=None,
    default: str | None = None,
    lut: dict[str, int] | None = None,
    output: Output | None = None,
) -> dict:
    """Write one package holding a function per lowered graph (identical weights stored once),
    with anefx's report inside it (``Data/anefx/report.json``); return the report, plus the
    emitted reports as objects (``emitted_reports``) and the timings (``seconds``).

    A single graph becomes the function "main"; with several, ``default`` (else the first)
    is the default function. The package is staged beside PATH and swapped in when complete
    (:class:`anefx.targets.artifact.Output`; OUTPUT when the caller checked PATH already):
    PATH may be new, an empty folder or an anefx package.

    The checkpoint's tokenizer files (:data:`anefx.targets.artifact.TOKENIZER_FILES`) are
    stored beside the report (``Data/anefx/tokenizer.json``, ...), listed in its
    ``tokenizer_files`` and covered by its digests, so the package runs alone.
    """
    from anefx.targets.artifact import copy_new
    from anefx.targets.palettize import check_lut

    say = progress or (lambda msg: None)
    check_lut(lut)
    forced = refuse_unless_forced(_errors(lowered_by_name), force, say)
    first = next(iter(lowered_by_name.values()))
    tokenizer = tokenizer_files(first.source)  # checked before anything is written
    out = output or prepare_output(path, "package", source_folders(lowered_by_name))
    with out:
        out.check_space(_weight_bytes(lowered_by_name, lut), "the package")
        t0 = time.perf_counter()
        emitted = write_package(lowered_by_name, out.staged, default, lut, say, out)
        if tokenizer:  # before add_report: its digests cover them
            beside_report = (out.staged / REPORT_ITEM).parent
            beside_report.mkdir(parents=True, exist_ok=True)
            for name, src in tokenizer.items():
                copy_new(src, beside_report / name)
        # no timings and no dates: converting the same inputs again gives the same bytes
        report = {
            "format": PACKAGE_FORMAT,
            "model": first.source,
            "random_weights": first.random_weights,
            "seq_len": {n: low.seq_len for n, low in lowered_by_name.items()},
            "context": first.context,
            "forced": forced,
            "lut": lut or {},
            "rules_version": rules.RULES_VERSION,
            "signatures": {
                n: package_signature(signature_of(low.graph_module))
                for n, low in lowered_by_name.items()
            },
            "lowered": {n: low.report.to_dict() for n, low in lowered_by_name.items()},
            "emitted": [r.to_dict() for r in emitted],
            "tokenizer_files": list(tokenizer),
        }
        if list(lowered_by_name) == ["main"]:
            report["lowered"] = report["lowered"]["main"]
            report["seq_len"] = first.seq_len
        add_report(out.staged, report)
        out.commit()
    return {
        **report,
        "seconds": {**first.seconds, "emit": time.perf_counter() - t0},
        "emitted_reports": emitted,
    }


def _weight_bytes(lowered_by_name: dict, lut: dict[str, int] | None) -> int:
    """The bytes the package will store: every weight once (shared by content), at its
    palettized size where LUT applies (an estimate for the free-space check)."""
    seen, total = set(), 0
    for low in lowered_by_name.values():
        gm = low.graph_module
        for node in gm.graph.nodes:
            if node.op != "get_attr" or node.target in seen:
                continue
            seen.add(node.target)
            t = gm
            for part in node.target.split("."):
                t = getattr(t, part)
            if isinstance(t, torch.Tensor):
                total += t.numel() * 2  # stored in fp16
    if lut and {"embed", "ffn", "head"} <= set(lut):  # else some kind stays fp16: count all
        total = int(total * max(min(1.0, b / 16 * 1.05) for b in lut.values()))
    return total


def write_package(
    lowered_by_name: dict,
    path: Path,
    default: str | None = None,
    lut: dict[str, int] | None = None,
    say=None,
    output: Output | None = None,
) -> list[Report]:
    """Convert and write the package at PATH (a staging location: the caller moves it into
    place), describe it, make it reproducible, and check it; returns the emitted reports.
    coremltools' temporary files go into OUTPUT's staging folder."""
    say = say or (lambda msg: None)
    say(f"building the Core ML program ({', '.join(lowered_by_name)})")
    with output.tempdir() if output is not None else contextlib.nullcontext():
        metadata = _convert(lowered_by_name, default or next(iter(lowered_by_name)), path, lut)
    _describe(path, lowered_by_name, metadata)
    _stable_item_ids(path)
    say("checking the emitted program")
    return check_package(path)


def add_report(package: Path, report: dict) -> None:
    """Store REPORT in PACKAGE as its anefx item (``Data/anefx/report.json``), with the sha256
    of every other file of the package (``files``), and list the item in Manifest.json."""
    manifest = package / PACKAGE_MANIFEST
    doc = json.loads(manifest.read_text())
    entry = {
        "author": REPORT_AUTHOR,
        "description": "anefx conversion report",
        "name": REPORT_NAME,
        "path": f"{REPORT_AUTHOR}/{REPORT_NAME}",
    }
    doc["itemInfoEntries"][_item_id(entry["path"])] = entry
    _write_manifest(manifest, doc)
    item = package / REPORT_ITEM
    item.parent.mkdir(parents=True, exist_ok=True)
    files = package_files(package)  # Manifest.json included, as it is now final
    write_new(item, (json.dumps({**report, "files": files}, indent=1, default=str) + "\n").encode())


def _item_id(item_path: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"anefx:{item_path}"))


def _write_manifest(manifest: Path, doc: dict) -> None:
    doc["itemInfoEntries"] = dict(sorted(doc["itemInfoEntries"].items()))
    manifest.unlink()
    write_new(manifest, json.dumps(doc, indent=4, sort_keys=True).encode())


def _stable_item_ids(package: Path) -> None:
    """Replace the random UUIDs coremltools gives the package's items (Manifest.json) with
    ones derived from each item's path, so converting twice gives identical bytes."""
    manifest = package / PACKAGE_MANIFEST
    doc = json.loads(manifest.read_text())
    renamed = {old: _item_id(entry["path"]) for old, entry in doc["itemInfoEntries"].items()}
    doc["itemInfoEntries"] = {renamed[k]: v for k, v in doc["itemInfoEntries"].items()}
    doc["rootModelIdentifier"] = renamed[doc["rootModelIdentifier"]]
    _write_manifest(manifest, doc)


def _spec_file(package: Path) -> Path:
    found = sorted(package.glob("Data/com.apple.CoreML/*.mlmodel"))
    if not found:
        raise AnefxGraphError(f"{package}: no model spec inside the package")
    return found[0]


def _descriptions(lowered) -> dict[str, str]:
    """Feature name -> description for one lowered graph's inputs, outputs and states, by the
    role each has in the graph's signature."""
    sig = signature_of(lowered.graph_module)
    context = lowered.context
    by_role = {
        Role.TOKENS: "token ids, int32 (1, S)",
        Role.POSITIONS: "position of each token, int32 (1, S)",
        Role.MASK: "additive attention mask, (1, 1, S, S): 0 where attending is allowed, "
        "a large negative value elsewhere",
        Role.HIDDEN: "hidden state from the previous part, fp16",
    }
    if context:
        by_role[Role.MASK] = (
            f"additive attention mask (1, 1, S, {context}): 0 where a query may see a "
            "cache slot, a large negative value elsewhere"
        )
        by_role[Role.POSITIONS] = (
            f"absolute position of each token, int32 (1, S); {context} (= context) "
            "marks a padding slot, which writes nothing to the cache"
        )
    texts = {i.name: by_role.get(i.role, i.name) for i in sig.inputs}
    for st in pack_states(sig.states):
        texts[st.name] = (
            f"KV cache of layers {min(st.layers)}-{max(st.layers)}, "
            f"{'x'.join(map(str, st.shape))} fp16: one row per layer's K then V, "
            "(rows, kv_heads, head_dim, context)"
        )
    for st in sig.carried:
        what = (
            f"conv window of layer {st.layers[0]}: its last inputs, (1, channels, kernel - 1)"
            if st.kind == "conv"
            else f"delta-rule state of layer {st.layers[0]}, (1, value heads, key dim, value dim)"
        )
        texts[st.name] = f"{what} fp16, as the previous call returned it (zeros to start)"
        texts[carried_output(st)] = f"{what} fp16 after this call: the next call's input"
    for o in sig.outputs:
        texts[o.name] = o.description or o.name
    return texts


# coremltools stamps the day of the conversion into the package: a second conversion of the
# same inputs on another day would differ in that one field
_DATE_KEY = "com.github.apple.coremltools.conversion_date"


def _describe(package: Path, lowered_by_name: dict, metadata: dict[str, str]) -> None:
    """Write descriptions and metadata into the saved package's spec file (small; no weights),
    serialised deterministically (protobuf maps sorted) and without a conversion date."""
    from coremltools.proto import Model_pb2

    target = _spec_file(package)
    spec = Model_pb2.Model()
    spec.ParseFromString(target.read_bytes())
    desc = spec.description
    if desc.functions:
        for fn in desc.functions:
            texts = _descriptions(lowered_by_name[fn.name])
            for feature in [*fn.input, *fn.output, *fn.state]:
                feature.shortDescription = texts.get(feature.name, feature.shortDescription)
    else:
        texts = _descriptions(next(iter(lowered_by_name.values())))
        for feature in [*desc.input, *desc.output, *desc.state]:
            feature.shortDescription = texts.get(feature.name, feature.shortDescription)
    first = next(iter(lowered_by_name.values()))
    what = (
        f"context {first.context}, KV cache as state" if first.context else (f"seq {first.seq_len}")
    )
    meta = desc.metadata
    meta.shortDescription = f"anefx lowering of {first.source} ({what}, fp16, ANE layout)"
    meta.author = "anefx"
    meta.userDefined["anefx.source"] = str(first.source)
    meta.userDefined["anefx.random_weights"] = str(first.random_weights)
    meta.userDefined["anefx.seq_len"] = json.dumps(
        {n: low.seq_len for n, low in lowered_by_name.items()}
        if len(lowered_by_name) > 1
        else first.seq_len
    )
    meta.userDefined[MODULES_KEY] = json.dumps(_modules(lowered_by_name), separators=(",", ":"))
    for key, value in metadata.items():
        meta.userDefined[key] = value
    meta.userDefined.pop(_DATE_KEY, None)
    target.unlink()
    write_new(target, spec.SerializeToString(deterministic=True))
