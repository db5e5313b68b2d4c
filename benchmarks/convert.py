"""Benchmark: anefx vs the stock torch.export -> ct.convert path on the same random weights.

    .venv/bin/python benchmarks/convert.py --preset qwen3-0.6b [--seq 64] [--out DIR]
        [--context 512] [--no-stateful] [--no-naive] [--in-process]

Both paths start from the same transformers model (``load_model("preset:NAME", fp16, seed)``)
and end with a saved .mlpackage; the shared load is excluded from both times. By default each
path runs in its own child process (this script re-invoked with ``--only PATH``) so that each
gets its own peak RSS; the children load the preset from the same seed, and a weight
fingerprint proves the weights are identical. ``--in-process`` instead loads the model once and
passes the same object to both paths (then only the process-wide peak RSS is meaningful).

Then (unless --no-stateful) a third run, in a child of its own too, times the stateful decoder
package: ``lower_decoder`` (prefill S = --seq, decode S = 1, KV cache of --context slots as
state) + ``emit_functions`` into one two-function package, and reads the decode and prefill
functions back from it for the same per-layer op counts (``decode_*``, ``stateful_prefill_*``),
to compare with ANEMLL's decode function. If only this run fails, its error is reported in
``stateful_error`` and the other numbers still stand.

A family whose layers differ (a Qwen3.5 hybrid: ``Family.layer_kinds`` labels each layer
"linear" or "full") is counted per kind of layer as well: ``layer_kinds`` and
``by_layer_kind`` hold, for each kind, the medians over its layers of the prefill package, the
decode function and the stateful prefill function (ops, transposes, reshapes, copies, the op
types of a representative layer) and the naive path's estimate; the summary shows those in
place of the all-layer medians and of ANEMLL's Qwen3 figures. ``--no-naive`` skips the stock
path (its numbers are then null): a hybrid's stock graph takes ct.convert minutes.

Printed: a human-readable summary, then as the LAST line one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

PATHS = ("naive", "anefx")  # naive first in --in-process mode: it cannot touch the weights
STATEFUL = "stateful"  # the two-function decoder package; optional (--no-stateful), runs last

# ANEMLL and the earlier naive measurement on this kind of machine (Qwen3-0.6B shape, 64-token
# prefill), from ../shared/reference/prior-art.md; printed for comparison, never recomputed.
REFERENCE = {
    "anemll_prefill_ops_per_layer": 85,
    "anemll_prefill_transposes_per_layer": 9,
    "anemll_prefill_reshapes_per_layer": 9,
    "anemll_decode_ops_per_layer": 79,
    "anemll_decode_transposes_per_layer": 6,
    "anemll_decode_reshapes_per_layer": 6,
    "anemll_decode_layer_op_types": {
        "mul": 12,
        "slice": 10,
        "concat": 10,
        "conv": 7,
        "transpose": 6,
        "reshape": 6,
        "add": 5,
        "layer_norm": 4,
        "expand_dims": 4,
        "squeeze": 3,
        "tile": 2,
        "matmul": 2,
        "read_state": 2,
        "write_state": 2,
        "slice_update": 2,
        "softmax": 1,
        "silu": 1,
    },  # fmt: skip
    # embeddings + LM head + decode + prefill parts (175 s), and with the decode/prefill merge
    "anemll_conversion_with_merge_s": 225,
    "anemll_conversion_s": 175,
    "anemll_peak_rss_gb": 6.7,
    "prior_naive_s": {"export": 11.0, "convert": 27.0, "save": 1.3},
    "prior_naive_peak_rss_gb": 3.3,
}


def _quiet() -> None:
    # coremltools' progress bars and torch/transformers warnings would bury the summary
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def peak_rss_gb() -> float:
    """Peak RSS of this process so far (ru_maxrss is in KB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def dir_mb(path: Path) -> float:
    """Size of a package folder in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def weight_fingerprint(model) -> str:
    """A cheap hash of every parameter (name, shape, first 4096 values) to prove equal weights."""
    h = hashlib.blake2b(digest_size=8)
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:4096].float().numpy().tobytes())
    return h.hexdigest()


def load(preset: str, seed: int):
    """The stock transformers model with seeded random fp16 weights, and its load time."""
    import torch

    from anefx.models.load import load_model

    t0 = time.perf_counter()
    loaded = load_model(f"preset:{preset}", dtype=torch.float16, seed=seed)
    return loaded.model, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# program analysis


def analyse(
    package: Path,
    n_layers: int,
    name_to_module: dict[str, str] | None = None,
    function: str = "main",
    spec=None,
    kinds: list[str] | None = None,
) -> dict:
    """Read a saved package back: op counts per layer, copies, and the rule check.

    FUNCTION picks one function of a multifunction package (its rule check only); SPEC, if
    given, is the package's already read spec. KINDS (one label per layer, from the family)
    adds the same counts per kind of layer under ``by_kind`` when the layers differ."""
    from anefx.targets.coreml import read_spec
    from anefx.targets.mil_program import check_spec
    from anefx.targets.op_counts import layer_stats, program_ops

    spec = spec if spec is not None else read_spec(package)
    # a layer's KV-cache writes count in that layer, as in ANEMLL's op counts
    ops = program_ops(spec, function)
    if name_to_module is not None:
        for o in ops:
            o.module = o.module or _module_of(o.name, name_to_module)
    op_kinds = Counter(o.op for o in ops)
    errors: Counter = Counter()
    warns: Counter = Counter()
    for report in check_spec(spec):
        if report.stats.get("function", function) != function:
            continue
        errors.update(v.rule for v in report.errors)
        warns.update(v.rule for v in report.warnings)
    return {
        "ops": len(ops),
        "ops_per_layer_avg": round(len(ops) / n_layers, 2),
        "transposes_per_layer_avg": round(op_kinds["transpose"] / n_layers, 2),
        "reshapes_per_layer_avg": round(op_kinds["reshape"] / n_layers, 2),
        "op_types": dict(op_kinds.most_common()),
        "errors": dict(errors),
        "warnings": dict(warns),
        "package_mb": round(dir_mb(package), 1),
        **layer_stats(ops, n_layers),
        **({"by_kind": kind_stats(ops, kinds)} if kinds and any(kinds) else {}),
    }


def layer_kinds(model) -> list[str]:
    """The family's label of each decoder layer ("linear" / "full" for a hybrid; all "" when
    the layers are alike, or for a model of no known family)."""
    from anefx.models.families import known_family

    family = known_family(model.config)
    n_layers = model.config.num_hidden_layers
    return family.layer_kinds(model.config) if family is not None else [""] * n_layers


def kind_stats(ops: list, kinds: list[str]) -> dict[str, dict]:
    """Per kind of layer (in order of first appearance): the medians over the layers of that
    kind, as layer_stats gives them over all layers (a hybrid's linear-attention and
    full-attention layers differ too much for one median to describe either)."""
    from anefx.targets.op_counts import layer_histograms

    per_layer, _ = layer_histograms(ops, len(kinds))
    out: dict[str, dict] = {}
    for kind in dict.fromkeys(kinds):
        layers = [i for i, k in enumerate(kinds) if k == kind]
        totals = [sum(per_layer[i].values()) for i in layers]
        med = statistics.median(totals)
        # the first layer of the kind closest to the median count: its op types
        rep = min(layers, key=lambda i: abs(sum(per_layer[i].values()) - med))
        out[kind] = {
            "layers": len(layers),
            "ops_per_layer": med,
            "ops_per_layer_max": max(totals),
            "transposes_per_layer": statistics.median(per_layer[i]["transpose"] for i in layers),
            "reshapes_per_layer": statistics.median(per_layer[i]["reshape"] for i in layers),
            "copies_per_layer": statistics.median(
                per_layer[i]["transpose"] + per_layer[i]["reshape"] for i in layers
            ),
            "layer_op_types": dict(per_layer[rep].most_common()),
            "layer_op_types_index": rep,
        }
    return out


def _module_of(mil_name: str, name_to_module: dict[str, str]) -> str | None:
    """Best-effort module of a MIL op the torch frontend named after an fx node.

    The frontend names ops "<node>" or "<node>_<suffix>" (e.g. mul_3_cast_fp16); the longest
    fx node name that is such a prefix wins. Helper ops it invents (embedding casts) may match a
    wrong node, so the naive per-layer numbers are estimates; the averages below are exact.
    """
    parts = mil_name.split("_")
    for k in range(len(parts), 0, -1):
        mod = name_to_module.get("_".join(parts[:k]))
        if mod:
            return mod
    return None


# ---------------------------------------------------------------------------------------------
# the two paths


def run_anefx(model, seq: int, out: Path) -> dict:
    """anefx.lower + anefx.emit; time everything after the load."""
    import torch

    import anefx

    package = out / "anefx.mlpackage"
    t0 = time.perf_counter()
    low = anefx.lower(model, seq, dtype=torch.float16)
    t1 = time.perf_counter()
    # force: warnings never block emit, and a lowered error must show up in the numbers below
    # rather than abort the benchmark
    report = anefx.emit(low, package, force=True)
    t2 = time.perf_counter()
    s = low.seconds
    emit_s = report["seconds"]["emit"]  # build the MIL program + ct.convert + save
    stages = {
        "export": s["export"],
        "decompose": s["decompose"],
        # unlifting the exported program into a GraphModule (inside capture, after its timers)
        "unlift": (t1 - t0) - sum(s.values()),
        "passes": s["passes"],
        "check": s["check"],  # shape propagation + the rule check of the lowered graph
        "emit": emit_s,
        "emit_check": (t2 - t1) - emit_s,  # read the saved package back and check it
    }
    pass_times = _pass_times(low.log)
    return {
        "total_s": (t2 - t0) - s["load"],
        "stage_s": stages,
        "passes_s": s["passes"] + s["check"],
        "pass_s": pass_times,
        "peak_rss_gb": peak_rss_gb(),
        "analysis": analyse(package, model.config.num_hidden_layers, kinds=layer_kinds(model)),
    }


def check_state_outputs(low, what: str) -> None:
    """A stateful graph must return its logits, then one updated tensor per state.

    Session and the emitter take the last len(states) outputs as the new cache; a graph that
    lost them fails later with a confusing argument-count or zip error."""
    out = low.graph_module.graph.output_node().args[0]
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    want = len(low.signature.outputs) + len(low.states)
    if low.states and n_out != want:
        raise RuntimeError(
            f"the lowered {what} graph returns {n_out} outputs, expected {want} "
            f"({len(low.signature.outputs)} logits + {len(low.states)} states): a pass dropped the "
            "KV-cache outputs (split_lm_head does so on vocabularies wider than one slice)"
        )


def run_stateful(model, seq: int, out: Path, context: int = 512) -> dict:
    """lower_decoder + emit_functions: the stateful package with functions prefill (S = SEQ)
    and decode (S = 1) and a KV cache of CONTEXT slots; time everything after the load."""
    import torch

    from anefx.generation import lower_decoder
    from anefx.targets.coreml import emit_functions, read_spec

    package = out / "stateful.mlpackage"
    t0 = time.perf_counter()
    dec = lower_decoder(model, batch=seq, context=context, dtype=torch.float16)
    t1 = time.perf_counter()
    check_state_outputs(dec.prefill, "prefill")
    check_state_outputs(dec.decode, "decode")
    marks: list[tuple[str, float, float]] = []  # emit's progress messages: (text, time, RSS)
    report = emit_functions(
        {"prefill": dec.prefill, "decode": dec.decode},
        package,
        force=True,
        default="decode",
        progress=lambda msg: marks.append((msg, time.perf_counter(), peak_rss_gb())),
    )
    t2 = time.perf_counter()
    lows = (dec.prefill, dec.decode)
    both = lambda key: sum(low.seconds.get(key, 0.0) for low in lows)
    stages = {
        "export": both("export"),
        "decompose": both("decompose"),
        "unlift": (t1 - t0) - sum(sum(low.seconds.values()) for low in lows),
        "passes": both("passes"),
        "check": both("check"),
    }
    emit_phases, emit_rss = _emit_phases(marks, t1, t2)
    if emit_phases:
        stages.update(emit_phases)
    else:  # emit_functions said nothing we know: its own total and the rest
        emit_s = report["seconds"]["emit"]  # the MIL program, ct.convert, save
        stages.update({"emit": emit_s, "emit_check": (t2 - t1) - emit_s})
    n_layers, kinds = model.config.num_hidden_layers, layer_kinds(model)
    spec = read_spec(package)
    return {
        "total_s": (t2 - t0) - both("load"),
        "stage_s": stages,
        "peak_rss_gb": peak_rss_gb(),
        "peak_rss_by_stage_gb": emit_rss,
        "context": context,
        "batch": seq,
        # a hybrid's conv and delta-rule states: program inputs and outputs, not Core ML states
        "carried_states": len(dec.decode.signature.carried),
        "decode": analyse(package, n_layers, function="decode", spec=spec, kinds=kinds),
        "prefill": analyse(package, n_layers, function="prefill", spec=spec, kinds=kinds),
    }


# emit_functions' progress messages (by their start) -> stage names (the phase each begins)
_EMIT_PHASES = {
    "building the Core ML program": "emit",
    "checking the emitted program": "emit_check",
}


def _phase(msg: str) -> str | None:
    return next((name for start, name in _EMIT_PHASES.items() if msg.startswith(start)), None)


def _emit_phases(
    marks: list[tuple[str, float, float]], start: float, end: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of each emit phase from the progress MARKS (a phase lasts until the next mark,
    the last one until END), and the process's peak RSS when each phase ended ("lower": at
    START, before the emit). Empty if a message is unknown or the first comes late."""
    known = [(_phase(msg), t, rss) for msg, t, rss in marks]
    if not known or any(name is None for name, _, _ in known) or known[0][1] - start > 1.0:
        return {}, {}
    seconds, rss_at_end = {}, {"lower": round(known[0][2], 2)}
    for i, (name, t, _) in enumerate(known):
        t_next = known[i + 1][1] if i + 1 < len(known) else end
        seconds[name] = t_next - (start if i == 0 else t)
        rss_at_end[name] = round(known[i + 1][2] if i + 1 < len(known) else peak_rss_gb(), 2)
    return seconds, rss_at_end


def _pass_times(log) -> dict[str, float]:
    """Seconds per pass from the pass log (each includes the manager's verify after it)."""
    out: dict[str, float] = {}
    for rec in log.records:
        out[rec.name] = out.get(rec.name, 0.0) + rec.seconds
    return out


def _stock_cleanup(ep) -> dict[str, int]:
    """Remove what ct.convert cannot take from a stock export: alias and _assert* nodes.

    alias is a no-op view (its uses get its input); _assert_tensor_metadata and friends are
    runtime checks with no result. Nothing else of the stock graph is touched.
    """
    removed: Counter = Counter()
    graph = ep.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        name = getattr(packet, "__name__", None) or getattr(node.target, "__name__", "")
        if name == "alias":
            node.replace_all_uses_with(node.args[0])
        elif not name.startswith("_assert"):
            continue
        graph.erase_node(node)
        removed[name] += 1
    graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return dict(removed)


def run_naive(model, seq: int, out: Path) -> dict:
    """The stock way: torch.export -> run_decompositions -> ct.convert -> save."""
    import coremltools as ct
    import torch

    from anefx.models.capture import PrefillWrapper, example_inputs, module_path

    package = out / "naive.mlpackage"
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(
            PrefillWrapper(model), example_inputs(seq, torch.float16), strict=False
        )
    stages["export"] = time.perf_counter() - t0
    t = time.perf_counter()
    ep = ep.run_decompositions({})
    stages["decompose"] = time.perf_counter() - t
    t = time.perf_counter()
    removed = _stock_cleanup(ep)
    stages["cleanup"] = time.perf_counter() - t
    # fx node -> source module, to attribute the converted ops to layers afterwards (untimed)
    name_to_module = {n.name: m for n in ep.graph.nodes if (m := module_path(n))}
    t = time.perf_counter()
    mlmodel = ct.convert(
        ep,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    stages["convert"] = time.perf_counter() - t
    t = time.perf_counter()
    mlmodel.save(str(package))
    stages["save"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    rss = peak_rss_gb()
    del mlmodel, ep  # the analysis re-reads the package from disk, like the anefx path
    return {
        "total_s": total,
        "stage_s": stages,
        "removed_nodes": removed,
        "peak_rss_gb": rss,
        "analysis": analyse(
            package, model.config.num_hidden_layers, name_to_module, kinds=layer_kinds(model)
        ),
    }


RUNNERS = {"anefx": run_anefx, "naive": run_naive, STATEFUL: run_stateful}


def run_path(
    path: str, preset: str, seq: int, seed: int, out: Path, model=None, context: int = 512
) -> dict:
    """Run one path (loading the preset unless MODEL is given); numbers as a dict."""
    load_s = 0.0
    if model is None:
        model, load_s = load(preset, seed)
    kwargs = {"context": context} if path == STATEFUL else {}
    result = RUNNERS[path](model, seq, out, **kwargs)
    result["load_s"] = load_s
    result["fingerprint"] = weight_fingerprint(model)
    return result


def run_child(path: str, args: argparse.Namespace, required: bool = True) -> dict:
    """Run one path in a fresh interpreter so its peak RSS is its own.

    A failing optional path (not REQUIRED) gives {"error": ...} instead of exiting."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--preset",
        args.preset,
        "--seq",
        str(args.seq),
        "--seed",
        str(args.seed),
        "--out",
        str(args.out),
        "--context",
        str(args.context),
        "--only",
        path,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        if not required:
            lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
            return {"error": lines[-1]}
        raise SystemExit(f"{path} path failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# report


def git_revision() -> str | None:
    """The repository's commit (+ "-dirty"): the code changes often, numbers need a version."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None


def _r2(d: dict) -> dict:
    return {k: round(v, 2) for k, v in d.items()}


STATEFUL_KEYS = (
    "stateful_s", "stateful_package_mb", "stateful_peak_rss_gb", "stateful_context",
    "stateful_batch", "stateful_stage_s", "stateful_peak_rss_by_stage_gb", "decode_ops_per_layer",
    "decode_ops_per_layer_max", "decode_copies_per_layer", "decode_transposes_per_layer",
    "decode_reshapes_per_layer", "decode_layer_op_types", "decode_ops",
    "decode_ops_outside_layers", "decode_errors", "decode_warnings",
    "stateful_prefill_ops_per_layer", "stateful_prefill_copies_per_layer",
    "stateful_prefill_transposes_per_layer", "stateful_prefill_reshapes_per_layer",
    "stateful_prefill_layer_op_types", "stateful_prefill_ops", "stateful_prefill_errors",
    "stateful_prefill_warnings", "stateful_error",
)  # fmt: skip


def stateful_keys(st: dict | None) -> dict:
    """The stateful package's numbers for the JSON record (None values if it did not run)."""
    if not st or "error" in st:
        rec = dict.fromkeys(STATEFUL_KEYS)
        rec["stateful_error"] = st["error"] if st else "not run (--no-stateful)"
        return rec
    d, p = st["decode"], st["prefill"]
    rec = {
        "stateful_s": round(st["total_s"], 2),
        "stateful_package_mb": d["package_mb"],
        "stateful_peak_rss_gb": round(st["peak_rss_gb"], 2),
        "stateful_context": st["context"],
        "stateful_batch": st["batch"],
        "stateful_stage_s": _r2(st["stage_s"]),
        "stateful_peak_rss_by_stage_gb": st["peak_rss_by_stage_gb"],
        "decode_ops_per_layer": d["ops_per_layer"],
        "decode_ops_per_layer_max": d["ops_per_layer_max"],
        "decode_copies_per_layer": d["copies_per_layer"],
        "decode_transposes_per_layer": d["transposes_per_layer"],
        "decode_reshapes_per_layer": d["reshapes_per_layer"],
        "decode_layer_op_types": d["layer_op_types"],
        "decode_ops": d["ops"],
        "decode_ops_outside_layers": d["outside_layers"],
        "decode_errors": d["errors"],
        "decode_warnings": d["warnings"],
        "stateful_prefill_ops_per_layer": p["ops_per_layer"],
        "stateful_prefill_copies_per_layer": p["copies_per_layer"],
        "stateful_prefill_transposes_per_layer": p["transposes_per_layer"],
        "stateful_prefill_reshapes_per_layer": p["reshapes_per_layer"],
        "stateful_prefill_layer_op_types": p["layer_op_types"],
        "stateful_prefill_ops": p["ops"],
        "stateful_prefill_errors": p["errors"],
        "stateful_prefill_warnings": p["warnings"],
        "stateful_error": None,
    }
    assert tuple(rec) == STATEFUL_KEYS
    return rec


def summarise(
    args: argparse.Namespace, a: dict, n: dict | None, mode: str, st: dict | None = None
) -> dict:
    """The final JSON record from the paths' results (N: the naive path, None if not run
    (--no-naive): its numbers are None; ST: the stateful package, if run)."""
    aa, na = a["analysis"], (n["analysis"] if n else {})
    r2 = _r2
    prints = {a["fingerprint"]} | ({n["fingerprint"]} if n else set())
    if st and "fingerprint" in st:
        prints.add(st["fingerprint"])
    return {
        "preset": args.preset,
        "seq": args.seq,
        "seed": args.seed,
        "mode": mode,
        "revision": git_revision(),
        "same_weights": len(prints) == 1,
        "anefx_s": round(a["total_s"], 2),
        "naive_s": round(n["total_s"], 2) if n else None,
        "ratio": round(a["total_s"] / n["total_s"], 3) if n else None,
        "passes_s": round(a["passes_s"], 2),
        "load_s": round(a["load_s"] or (n["load_s"] if n else 0.0), 2),
        "peak_rss_gb": round(a["peak_rss_gb"], 2),
        "naive_peak_rss_gb": round(n["peak_rss_gb"], 2) if n else None,
        "ops_per_layer": aa["ops_per_layer"],
        "ops_per_layer_max": aa["ops_per_layer_max"],
        "ops_layer0": aa["ops_layer0"],
        "copies_per_layer": aa["copies_per_layer"],
        "transposes_per_layer": aa["transposes_per_layer"],
        "reshapes_per_layer": aa["reshapes_per_layer"],
        "layer_op_types": aa["layer_op_types"],
        "anefx_ops": aa["ops"],
        "anefx_ops_outside_layers": aa["outside_layers"],
        "naive_ops": na.get("ops"),
        "naive_ops_per_layer_avg": na.get("ops_per_layer_avg"),
        "naive_transposes_per_layer_avg": na.get("transposes_per_layer_avg"),
        "naive_reshapes_per_layer_avg": na.get("reshapes_per_layer_avg"),
        "naive_ops_per_layer_est": na.get("ops_per_layer"),
        "naive_layer_op_types_est": na.get("layer_op_types"),
        "naive_removed_nodes": n["removed_nodes"] if n else None,
        "anefx_stage_s": r2(a["stage_s"]),
        "naive_stage_s": r2(n["stage_s"]) if n else None,
        "anefx_pass_s": r2(a["pass_s"]),
        "anefx_errors": aa["errors"],
        "anefx_warnings": aa["warnings"],
        "naive_errors": na.get("errors"),
        "naive_warnings": na.get("warnings"),
        "package_mb": aa["package_mb"],
        "naive_package_mb": na.get("package_mb"),
        "reference": REFERENCE,
        **stateful_keys(st),
        **kind_keys(aa, na, st),
    }


# per kind of layer: the JSON name prefix of each function's numbers (the prefill package's,
# the decode function's, the stateful prefill function's, as in the record), and the numbers
_KIND_PREFIXES = ("", "decode_", "stateful_prefill_")
_KIND_STATS = (
    "ops_per_layer", "ops_per_layer_max", "copies_per_layer", "transposes_per_layer",
    "reshapes_per_layer", "layer_op_types",
)  # fmt: skip


def kind_keys(aa: dict, na: dict, st: dict | None) -> dict:
    """For a family whose layers differ (a hybrid): ``layer_kinds`` (layers of each kind) and
    ``by_layer_kind`` (per kind: the prefill package's, the decode function's and the stateful
    prefill function's medians, keyed as the record's own, and the naive estimate). Nothing
    for a family whose layers are alike: its record is as before."""
    if "by_kind" not in aa:
        return {}
    ran = st is not None and "error" not in st
    functions = {"": aa["by_kind"]}
    if ran:
        functions["decode_"] = st["decode"]["by_kind"]
        functions["stateful_prefill_"] = st["prefill"]["by_kind"]
    by_kind = {}
    for kind, stats in aa["by_kind"].items():
        row: dict = {"layers": stats["layers"]}
        for prefix in _KIND_PREFIXES:
            for key in _KIND_STATS:
                row[prefix + key] = functions[prefix][kind][key] if prefix in functions else None
        naive = na.get("by_kind", {}).get(kind, {})
        row["naive_ops_per_layer_est"] = naive.get("ops_per_layer")
        row["naive_layer_op_types_est"] = naive.get("layer_op_types")
        by_kind[kind] = row
    return {
        "layer_kinds": {k: v["layers"] for k, v in by_kind.items()},
        "by_layer_kind": by_kind,
        "carried_states": st["carried_states"] if ran else None,
    }


def render(rec: dict) -> str:
    """A human-readable summary of the JSON record."""
    ref = REFERENCE
    ratio = rec["ratio"]
    hybrid = bool(rec.get("by_layer_kind"))
    lines = [
        f"anefx vs stock conversion: {rec['preset']}, seq {rec['seq']}, fp16 random weights "
        f"(seed {rec['seed']}, same weights: {rec['same_weights']}, {rec['mode']})",
        f"  revision {rec['revision']}; shared load (excluded) {rec['load_s']:.2f} s",
        "",
        f"  anefx   {rec['anefx_s']:7.2f} s   peak RSS {rec['peak_rss_gb']:.2f} GB   "
        f"package {rec['package_mb']:.1f} MB",
    ]
    lines += [f"    {k:<12} {v:7.2f} s" for k, v in rec["anefx_stage_s"].items()]
    lines.append(f"    passes + checker = {rec['passes_s']:.2f} s")
    if rec["naive_s"] is None:
        lines += ["  naive   not run (--no-naive)", ""]
    else:
        lines.append(
            f"  naive   {rec['naive_s']:7.2f} s   peak RSS {rec['naive_peak_rss_gb']:.2f} GB   "
            f"package {rec['naive_package_mb']:.1f} MB"
        )
        lines += [f"    {k:<12} {v:7.2f} s" for k, v in rec["naive_stage_s"].items()]
        prior = ref["prior_naive_s"]
        lines += [
            f"    (prior measurement: export {prior['export']} s + convert {prior['convert']} s "
            f"+ save {prior['save']} s, {ref['prior_naive_peak_rss_gb']} GB; "
            f"removed here: {rec['naive_removed_nodes']})",
            f"  anefx / naive time = {ratio:.2f} ({'slower' if ratio > 1 else 'faster'})",
            "",
        ]
    if not hybrid:  # a hybrid's layers are counted per kind, after the stateful package
        lines += [
            "  per decoder layer            anefx        naive        ANEMLL prefill (64 tok)",
            f"    ops                    {rec['ops_per_layer']:>8}   "
            f"{_or_dash(rec['naive_ops_per_layer_avg']):>10}   "
            f"{ref['anemll_prefill_ops_per_layer']:>8}",
            f"    transposes             {rec['transposes_per_layer']:>8}   "
            f"{_or_dash(rec['naive_transposes_per_layer_avg']):>10}   "
            f"{ref['anemll_prefill_transposes_per_layer']:>8}",
            f"    reshapes               {rec['reshapes_per_layer']:>8}   "
            f"{_or_dash(rec['naive_reshapes_per_layer_avg']):>10}   "
            f"{ref['anemll_prefill_reshapes_per_layer']:>8}",
            f"    (anefx: median over layers; max {rec['ops_per_layer_max']}, layer 0 "
            f"{rec['ops_layer0']}, {rec['anefx_ops_outside_layers']} ops outside the layers; "
            "naive: all ops / layers)",
            f"    anefx layer ops: {_fmt_counts(rec['layer_op_types'])}",
            f"    naive layer ops (estimated): "
            f"{_fmt_counts(rec['naive_layer_op_types_est'] or {}) or '-'}",
            "",
        ]
    lines += [
        f"  ANE rule errors   anefx: {_fmt_counts(rec['anefx_errors']) or 'none'}",
        f"                    naive: {_naive_counts(rec['naive_errors'])}",
        f"  ANE warnings      anefx: {_fmt_counts(rec['anefx_warnings']) or 'none'}",
        f"                    naive: {_naive_counts(rec['naive_warnings'])}",
        "",
    ]
    lines += render_stateful(rec)
    if hybrid:
        lines += ["", *render_kinds(rec)]
    return "\n".join(lines)


def render_stateful(rec: dict) -> list[str]:
    """The summary of the stateful two-function package, against ANEMLL's decode function
    (a hybrid: its times and rule checks; its layers are in render_kinds)."""
    ref = REFERENCE
    if rec["stateful_error"]:
        return [f"  stateful decoder package: {rec['stateful_error']}"]
    hybrid = bool(rec.get("by_layer_kind"))
    n_carried = rec.get("carried_states") or 0
    carried = f"; {n_carried} states carried as inputs and outputs" if n_carried else ""
    lines = [
        f"  stateful decoder package (functions prefill S={rec['stateful_batch']} and decode "
        f"S=1, KV cache of {rec['stateful_context']} as state{carried}): "
        f"{rec['stateful_s']:.2f} s   "
        f"peak RSS {rec['stateful_peak_rss_gb']:.2f} GB   package "
        f"{rec['stateful_package_mb']:.1f} MB",
    ]
    lines += [f"    {k:<12} {v:7.2f} s" for k, v in rec["stateful_stage_s"].items()]
    if rec["stateful_peak_rss_by_stage_gb"]:
        lines.append(
            "    peak RSS at the end of: "
            + ", ".join(f"{k} {v:.2f} GB" for k, v in rec["stateful_peak_rss_by_stage_gb"].items())
        )
    checks = [
        f"  ANE rule errors   decode: {_fmt_counts(rec['decode_errors']) or 'none'}; "
        f"prefill: {_fmt_counts(rec['stateful_prefill_errors']) or 'none'}",
        f"  ANE warnings      decode: {_fmt_counts(rec['decode_warnings']) or 'none'}; "
        f"prefill: {_fmt_counts(rec['stateful_prefill_warnings']) or 'none'}",
    ]
    if hybrid:  # ANEMLL's figures are of Qwen3 layers: nothing of theirs to set beside these
        return lines + checks
    lines += [
        f"    (ANEMLL, same shape: about {ref['anemll_conversion_s']} s for embeddings, head, "
        f"decode and prefill parts; about {ref['anemll_conversion_with_merge_s']} s with the "
        "decode/prefill merge)",
        "",
        "  per decoder layer        anefx decode   ANEMLL decode   anefx prefill   ANEMLL prefill",
    ]
    rows = (
        ("ops", "ops_per_layer", "ops_per_layer"),
        ("transposes", "transposes_per_layer", "transposes_per_layer"),
        ("reshapes", "reshapes_per_layer", "reshapes_per_layer"),
    )
    for label, key, ref_key in rows:
        lines.append(
            f"    {label:<20} {rec['decode_' + key]:>12} "
            f"{ref['anemll_decode_' + ref_key]:>15} "
            f"{rec['stateful_prefill_' + key]:>15} {ref['anemll_prefill_' + ref_key]:>16}"
        )
    anemll_copies = (
        ref["anemll_decode_transposes_per_layer"] + ref["anemll_decode_reshapes_per_layer"]
    )
    anemll_prefill_copies = (
        ref["anemll_prefill_transposes_per_layer"] + ref["anemll_prefill_reshapes_per_layer"]
    )
    lines += [
        f"    {'copies':<20} {rec['decode_copies_per_layer']:>12} {anemll_copies:>15} "
        f"{rec['stateful_prefill_copies_per_layer']:>15} {anemll_prefill_copies:>16}",
        f"    (anefx: median over layers of the emitted functions; decode max "
        f"{rec['decode_ops_per_layer_max']}, {rec['decode_ops_outside_layers']} decode ops "
        "outside the layers)",
        f"    anefx decode layer ops:  {_fmt_counts(rec['decode_layer_op_types'])}",
        f"    ANEMLL decode layer ops: {_fmt_counts(ref['anemll_decode_layer_op_types'])}",
    ]
    return lines + checks


def render_kinds(rec: dict) -> list[str]:
    """A hybrid's layers, kind by kind: ops and copies (transposes + reshapes) per layer of
    the prefill package, the stateful prefill function and the decode function, medians over
    the layers of the kind; the naive path's all-ops estimate beside them."""

    def num(v) -> str:
        return "-" if v is None else f"{v:g}"

    lines = [
        "  per decoder layer, by kind (median over the layers of each kind, as the family labels"
        " them)",
        f"    {'':<24}{'prefill pkg':>12}{'stateful prefill':>18}{'decode':>8}{'naive (est.)':>14}",
    ]
    for kind, row in rec["by_layer_kind"].items():
        lines.append(f"    {kind} ({row['layers']} layer{'s' if row['layers'] != 1 else ''})")
        for label, key in (
            ("ops", "ops_per_layer"),
            ("transposes", "transposes_per_layer"),
            ("reshapes", "reshapes_per_layer"),
            ("copies", "copies_per_layer"),
        ):
            naive = num(row["naive_ops_per_layer_est"]) if key == "ops_per_layer" else ""
            lines.append(
                f"      {label:<22}{num(row[key]):>12}{num(row['stateful_prefill_' + key]):>18}"
                f"{num(row['decode_' + key]):>8}{naive:>14}"
            )
        lines.append(
            f"      ops max: prefill pkg {num(row['ops_per_layer_max'])}, stateful prefill "
            f"{num(row['stateful_prefill_ops_per_layer_max'])}, decode "
            f"{num(row['decode_ops_per_layer_max'])}"
        )
        for label, prefix in (
            ("prefill pkg", ""),
            ("stateful prefill", "stateful_prefill_"),
            ("decode", "decode_"),
        ):
            types = row[prefix + "layer_op_types"]
            if types is not None:
                lines.append(f"      {label} layer ops: {_fmt_counts(types)}")
        if row["naive_layer_op_types_est"]:
            lines.append(
                f"      naive layer ops (estimated): {_fmt_counts(row['naive_layer_op_types_est'])}"
            )
    return lines


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _naive_counts(d: dict | None) -> str:
    """The naive path's rule counts ("not run" without it)."""
    return "not run" if d is None else (_fmt_counts(d) or "none")


def _or_dash(v):
    """A number, or "-" for one not measured (the naive path not run)."""
    return "-" if v is None else v


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from anefx.cli import int_range
    from anefx.core.rules import DIM_LIMITS
    from anefx.models.presets import PRESETS

    # the ranges anefx checks, checked here first: a bad value fails at once, not after the
    # load and the conversions before the one that refuses it
    width = DIM_LIMITS["W"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default="qwen3-0.6b", choices=PRESETS, help="model preset (random weights)"
    )
    p.add_argument(
        "--seq", type=int_range(1, width), default=64, help="prefill length (default 64)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", type=Path, help="folder for the packages")
    p.add_argument(
        "--context",
        type=int_range(1, width),
        default=512,
        help="KV cache length of the stateful package (default 512; its prefill batch is --seq)",
    )
    p.add_argument(
        "--no-stateful",
        dest="stateful",
        action="store_false",
        help="skip the stateful two-function package (lower_decoder + emit_functions)",
    )
    p.add_argument(
        "--no-naive",
        dest="naive",
        action="store_false",
        help="skip the stock export + ct.convert path (minutes for a hybrid's stock graph)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="load once and run both paths on the same model object in this process",
    )
    # internal: a child process runs one path and prints its numbers as one JSON line
    p.add_argument("--only", choices=PATHS + (STATEFUL,), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stateful and args.seq > args.context:
        p.error(
            f"--seq {args.seq} (the stateful package's prefill batch) must not exceed --context "
            f"{args.context}; or --no-stateful"
        )
    if args.out is None:
        args.out = Path("build") / "bench" / f"{args.preset}-seq{args.seq}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        rec = run_path(args.only, args.preset, args.seq, args.seed, args.out, None, args.context)
        print(json.dumps(rec))
        return 0
    st = None
    if args.in_process:
        model, load_s = load(args.preset, args.seed)
        paths = PATHS if args.naive else ("anefx",)
        res = {p: run_path(p, args.preset, args.seq, args.seed, args.out, model) for p in paths}
        res[paths[0]]["load_s"] = load_s
        if args.stateful:
            try:
                st = run_path(
                    STATEFUL, args.preset, args.seq, args.seed, args.out, model, args.context
                )
            except Exception as exc:  # the conversion benchmark above still stands
                st = {"error": f"{type(exc).__name__}: {exc}"}
        mode = "one process: anefx peak RSS is the process-wide peak"
    else:
        # one path at a time: on two cores concurrent runs would distort both timings
        res = {p: run_child(p, args) for p in PATHS if args.naive or p != "naive"}
        if args.stateful:
            st = run_child(STATEFUL, args, required=False)
        mode = "one child process per path"
    rec = summarise(args, res["anefx"], res.get("naive"), mode, st)
    print(render(rec))
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
