"""The constraint checker: the rule table applied to an fx graph or to an emitted Core ML program.

Both readers turn their ops into :class:`OpInfo` records with a canonical ``kind`` (``linear``,
``gather``, ``conv``, ...): ``fx_ops`` here, ``mil_ops`` in targets/mil_program.py (the Core ML
program reader, which imports coremltools' protobuf; this module does not), so each rule in
core/rules.py is evaluated by one function here (``check_ops``) whatever the source. The result
is a :class:`Report`: data first, rendered as a table or JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from anefx.core import rules
from anefx.core.annotations import MODULE, MODULE_CLASS, unlowered
from anefx.core.ops import EMITTABLE, LAYER_NORM
from anefx.core.signature import has_signature, pack_states, signature_of

# ---------------------------------------------------------------------------------------------
# records


@dataclass
class OpInfo:
    """One op as the rules see it."""

    name: str
    op: str  # the op's own name (aten.linear.default, conv, ...)
    kind: str  # canonical kind shared by fx and MIL
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    module: str | None = None
    pass_: str | None = None
    module_class: str | None = None  # the transformers class of the source module
    const: bool = False
    nbytes: int = 0
    dynamic: bool = False
    # identity of the stored bytes: a weight read by several ops (or functions) counts once
    storage: Hashable | None = None


@dataclass
class Violation:
    rule: str
    severity: str
    op: str
    node: str
    shape: list[int] | None
    dtype: str | None
    module: str | None
    pass_: str | None
    message: str  # what breaks the rule, with the limit: "W=151936 > 16384"
    limit: str | None = None  # the rule table's bound, as text
    module_class: str | None = None  # the transformers class of the source module


def module_pattern(module: str) -> str:
    """A module path with its indices as *: every decoder layer's copy of a module is one
    construct ("model.layers.3.self_attn.indexer" -> "model.layers.*.self_attn.indexer")."""
    return ".".join("*" if part.isdigit() else part for part in module.split("."))


def op_name(op: str) -> str:
    """An op's short name for summaries: "aten.topk.default" -> "topk"."""
    if op.startswith("<built-in function "):
        return op.removeprefix("<built-in function ").rstrip(">")
    parts = op.split(".")
    return parts[1] if len(parts) == 3 else op


@dataclass
class Report:
    """Violations of one graph or program, with counts and a little context."""

    stage: str  # "captured" | "lowered" | "emitted:<function>"
    violations: list[Violation] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "error"]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "warning"]

    def counts(self) -> dict[str, int]:
        c = Counter(v.rule for v in self.violations)
        return {r.id: c[r.id] for r in rules.RULES if c[r.id]}

    def blocking(self) -> list[dict]:
        """What blocks the graph, construct by construct: the errors of ops grouped by the
        transformers class of their source module and its path with indices as * (each
        decoder layer's copy is one construct), with their ops and rules counted; the most
        errors first. Package-level errors (no op: size, states) are not constructs."""
        groups: dict[tuple[str, str], dict] = {}
        for v in self.errors:
            if v.node == "-" or v.op in ("state", "package"):
                continue
            module = module_pattern(v.module) if v.module else "-"
            key = (v.module_class or "-", module)
            group = groups.setdefault(
                key,
                {
                    "class": key[0],
                    "module": key[1],
                    "errors": 0,
                    "ops": Counter(),
                    "rules": Counter(),
                    "nodes": set(),
                },
            )
            group["errors"] += 1
            group["rules"][v.rule] += 1
            if v.node not in group["nodes"]:  # an op breaking two rules is one op
                group["nodes"].add(v.node)
                group["ops"][op_name(v.op)] += 1
        out = sorted(groups.values(), key=lambda g: (-g["errors"], g["class"], g["module"]))
        for group in out:
            del group["nodes"]
            group["ops"] = dict(group["ops"].most_common())
            group["rules"] = dict(group["rules"].most_common())
        return out

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "rules_version": rules.RULES_VERSION,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "counts": self.counts(),
            "blocking": self.blocking(),
            "stats": self.stats,
            "violations": [
                {("pass" if k == "pass_" else k): v for k, v in asdict(x).items()}
                for x in self.violations
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def render(self, limit_per_rule: int = 8) -> str:
        """A human-readable table: counts per rule, then the violations (a few per rule)."""
        lines = [f"ANE constraint report ({self.stage})"]
        for key in (
            "model",
            "function",
            "seq_len",
            "dtype",
            "nodes",
            "ops",
            "weight_bytes",
            "lm_head_slices",
            "context",
        ):
            if key in self.stats:
                val = self.stats[key]
                if key == "weight_bytes":
                    val = f"{val / 1e9:.3f} GB"
                lines.append(f"  {key:<15} {val}")
        moe = self.stats.get("moe")
        if moe and moe.get("blocks"):
            shared = ""
            if moe.get("shared_expert_width"):
                gate = " gated" if moe.get("shared_expert_gated") else ""
                shared = f" + a{gate} shared expert of width {moe['shared_expert_width']}"
            lines.append(
                f"  {'moe':<15} {moe['blocks']} block(s) x {moe['experts']} experts, top "
                f"{moe['top_k']}{shared}: every expert evaluated densely, expert compute "
                f"x{moe['compute_multiplier']:g} ({moe['expert_groups']} conv groups per block)"
            )
        for u in (moe or {}).get("unmatched", []):
            lines.append(f"  {'moe':<15} {u['module']} not densified: {u['reason']}")
        states = self.stats.get("states") or []
        for carried, what in ((False, "the KV cache"), (True, "carried as inputs/outputs")):
            mine = [st for st in states if bool(st.get("carried")) == carried]
            if mine:
                shapes = sorted({"x".join(map(str, st["shape"])) for st in mine})
                lines.append(
                    f"  {'states':<15} {len(mine)} x ({', '.join(shapes)}) "
                    f"{mine[0]['dtype'].replace('torch.', '')}: {what}"
                )
        for text in self.stats.get("substitutions") or []:
            lines.append(f"  {'substituted':<15} {text}")
        lines.append("")
        if not self.violations:
            lines.append("  no violations: every op fits the ANE rules")
        else:
            lines.append(f"  {'rule':<15} {'severity':<8} {'count':>6}  meaning")
            for rid, n in self.counts().items():
                r = rules.RULES_BY_ID[rid]
                lines.append(f"  {rid:<15} {r.severity:<8} {n:>6}  {r.summary}")
            lines.append("")
            head = (
                f"  {'severity':<8} {'rule':<14} {'op':<26} {'shape':<22} {'module':<36} "
                f"{'pass':<22} why"
            )
            lines.append(head)
            shown = Counter()
            for v in sorted(self.violations, key=lambda v: (v.severity != "error", v.rule)):
                shown[v.rule] += 1
                if shown[v.rule] > limit_per_rule:
                    continue
                shape = "x".join(map(str, v.shape)) if v.shape else "-"
                origin = v.pass_ or ("capture" if v.node != "-" else "-")
                lines.append(
                    f"  {v.severity:<8} {v.rule:<14} {v.op[:26]:<26} {shape[:22]:<22} "
                    f"{(v.module or '-')[:36]:<36} {origin[:22]:<22} {v.message}"
                )
            for rid, n in shown.items():
                if n > limit_per_rule:
                    lines.append(f"  ... {n - limit_per_rule} more {rid} (see --json)")
            blocking = self.blocking()
            if blocking:
                lines.append("")
                lines.append(
                    "  blocked by (the errors by the transformers class and module of their op):"
                )
                for group in blocking:
                    lines.append(f"  {blocking_text(group)}")
        lines.append("")
        lines.append(f"  {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)


def blocking_text(group: dict, ops: int = 6) -> str:
    """One construct of Report.blocking as text: "Qwen4ExpTextQSAIndexer
    (model.layers.*.self_attn.indexer): topk 1, scatter 1 [routing 1, scatter 1]"."""
    shown = list(group["ops"].items())
    text = ", ".join(f"{op} {n}" for op, n in shown[:ops])
    if len(shown) > ops:
        text += f", {len(shown) - ops} more op kinds"
    why = ", ".join(f"{rule} {n}" for rule, n in group["rules"].items())
    return f"{group['class']} ({group['module']}): {text} [{why}]"


# ---------------------------------------------------------------------------------------------
# rule evaluation (shared)

_FLOAT = {"float16", "float32", "float64", "bfloat16"}


def check_ops(ops: list[OpInfo], stage: str, stats: dict | None = None) -> Report:
    """Apply every rule of the table to OPS."""
    report = Report(stage, stats=dict(stats or {}))
    add = report.violations.append

    def violation(rule_id: str, op: OpInfo, shape, dtype, message: str, limit: str) -> None:
        add(
            Violation(
                rule=rule_id,
                severity=rules.RULES_BY_ID[rule_id].severity,
                op=op.op,
                node=op.name,
                shape=list(shape) if shape is not None else None,
                dtype=dtype,
                module=op.module,
                pass_=op.pass_,
                message=message,
                limit=limit,
                module_class=op.module_class,
            )
        )

    def over(names: str, values: tuple[int, ...], bound: int) -> str:
        """ "W=151936 > 16384" for the axes above BOUND."""
        return ", ".join(
            f"{n}={v} > {bound}" for n, v in zip(names, values, strict=True) if v > bound
        )

    weight_bytes = 0
    seen_storage: set[Hashable] = set()
    for op in ops:
        if op.const:
            if op.storage is None or op.storage not in seen_storage:
                weight_bytes += op.nbytes
                if op.storage is not None:
                    seen_storage.add(op.storage)
        if op.kind in rules.OFF_ANE_KINDS:
            rid = rules.OFF_ANE_KINDS[op.kind]
            violation(
                rid,
                op,
                op.shapes[0] if op.shapes else None,
                op.dtypes[0] if op.dtypes else None,
                rules.RULES_BY_ID[rid].summary,
                "not on the ANE",
            )
        if op.dynamic:
            violation(
                "dynamic_shape", op, None, None, f"{op.op} has a symbolic shape", "static shapes"
            )
        for shape, dtype in zip(op.shapes, op.dtypes, strict=False):
            if dtype in _FLOAT and dtype != rules.COMPUTE_DTYPE:
                violation(
                    "fp16",
                    op,
                    shape,
                    dtype,
                    f"{dtype} tensor, not {rules.COMPUTE_DTYPE}",
                    rules.COMPUTE_DTYPE,
                )
            if len(shape) > rules.MAX_RANK:
                violation(
                    "rank",
                    op,
                    shape,
                    dtype,
                    f"rank {len(shape)} > {rules.MAX_RANK}",
                    f"rank <= {rules.MAX_RANK}",
                )
                continue
            if op.const:
                continue  # weights are read by ops, not laid out as ANE activations
            n, c, h, w = rules.rank4(shape)
            nc, hw = rules.DIM_LIMITS["C"], rules.DIM_LIMITS["W"]
            if n > rules.DIM_LIMITS["N"] or c > nc:
                violation("dim_nc", op, shape, dtype, over("NC", (n, c), nc), f"N, C <= {nc}")
            if h > rules.DIM_LIMITS["H"] or w > hw:
                violation("dim_hw", op, shape, dtype, over("HW", (h, w), hw), f"H, W <= {hw}")
            if shape and shape[-1] < rules.MIN_TRAILING_DIM and op.kind not in ("input",):
                violation(
                    "trailing_dim",
                    op,
                    shape,
                    dtype,
                    f"last axis {shape[-1]} < {rules.MIN_TRAILING_DIM}",
                    f"last axis >= {rules.MIN_TRAILING_DIM}",
                )
        if op.kind == "conv" and op.shapes and len(op.shapes[0]) == 4:
            cout = op.shapes[0][1]
            if cout > rules.MAX_CONV_OUT_CHANNELS:
                violation(
                    "conv_width",
                    op,
                    op.shapes[0],
                    op.dtypes[0],
                    f"{cout} output channels > {rules.MAX_CONV_OUT_CHANNELS}",
                    f"output channels <= {rules.MAX_CONV_OUT_CHANNELS}",
                )
    states = report.stats.get("states") or []
    # the states the program holds: an fx graph's are packed into one by the emitter
    held = report.stats.get("program_states", len(states))
    if held > rules.MAX_STATES_PER_PROGRAM:
        add(
            Violation(
                "state_count",
                rules.RULES_BY_ID["state_count"].severity,
                "state",
                ", ".join(st["name"] for st in states[:4]) + ("..." if len(states) > 4 else ""),
                [held],
                None,
                None,
                None,
                f"{held} Core ML states in one program",
                f"at most {rules.MAX_STATES_PER_PROGRAM} (device-facts.md)",
            )
        )
    for st in states:
        if st.get("carried"):  # an input and an output, not a Core ML state
            continue
        shape = tuple(st["shape"])
        bad = [d for d in shape[-2:] if d % rules.STATE_ALIGN]
        if bad:
            add(
                Violation(
                    "state_align",
                    rules.RULES_BY_ID["state_align"].severity,
                    "state",
                    st["name"],
                    list(shape),
                    str(st["dtype"]).replace("torch.", ""),
                    None,
                    None,
                    f"state {st['name']} {'x'.join(map(str, shape))}: {bad} not a multiple of "
                    f"{rules.STATE_ALIGN} (ANE state binding)",
                    f"multiple of {rules.STATE_ALIGN}",
                )
            )
    if weight_bytes > rules.WEIGHTS_WARN_BYTES:
        sev = "error" if weight_bytes > rules.WEIGHTS_ERROR_BYTES else "warning"
        bound = rules.WEIGHTS_ERROR_BYTES if sev == "error" else rules.WEIGHTS_WARN_BYTES
        report.violations.append(
            Violation(
                "weights_size",
                sev,
                "package",
                "-",
                None,
                None,
                None,
                None,
                f"{weight_bytes / 2**30:.2f} GiB of weights in one package > {bound >> 30} GiB",
                f"<= {rules.WEIGHTS_WARN_BYTES >> 30} GiB (error above "
                f"{rules.WEIGHTS_ERROR_BYTES >> 30} GiB)",
            )
        )
    report.stats.setdefault("weight_bytes", weight_bytes)
    return report


# ---------------------------------------------------------------------------------------------
# fx reader

_FX_KINDS = {
    "linear": "linear",
    "pow": "pow",
    "rsqrt": "rsqrt",
    "embedding": "gather",
    "index_select": "gather",
    "index": "gather",
    "gather": "gather",
    "scatter": "scatter",
    "scatter_add": "scatter",
    "scatter_reduce": "scatter",
    "index_put": "scatter",
    "index_put_": "scatter",
    "slice_scatter": "scatter",
    "select_scatter": "scatter",
    "cond": "control_flow",
    "while_loop": "control_flow",
    "triu": "band_part",
    "tril": "band_part",
    "conv2d": "conv",
    "convolution": "conv",
}


# int64 arithmetic: Core ML has no int64 (its converter narrows to int32, which the products of
# hashed token ids overflow). The int32 index arithmetic anefx emits itself (the argmax head's
# slice offsets) is Core ML's own and is not flagged.
_INTEGER = {torch.int64}


def _fx_kind(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "const"
    if node.target is LAYER_NORM:
        return "layer_norm"
    packet = getattr(node.target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))
    if "grouped_mm" in name:  # aten._grouped_mm and transformers' fallback custom op
        return "grouped_mm"
    if name in rules.INT_ARITH_OPS:
        v = node.meta.get("val")
        first = v[0] if isinstance(v, (tuple, list)) and v else v
        if isinstance(first, torch.Tensor) and first.dtype in _INTEGER:
            return "int_arith"
    kind = _FX_KINDS.get(name, name)
    if kind == "conv" or name == "conv1d":
        # (input, weight, bias, stride, padding, dilation, ...) as aten spells every conv
        dilation = node.args[5] if len(node.args) > 5 else node.kwargs.get("dilation", 1)
        dilation = [dilation] if isinstance(dilation, int) else list(dilation or [1])
        if any(d != 1 for d in dilation):
            return "dilated_conv"
    return kind


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def fx_ops(gm: fx.GraphModule) -> list[OpInfo]:
    """The graph's nodes as OpInfo records (needs meta['val'] from shape propagation)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        v = node.meta.get("val")
        vals = v if isinstance(v, (tuple, list)) else [v]
        tensors = [t for t in vals if isinstance(t, torch.Tensor)]
        dynamic = any(not isinstance(s, int) for t in tensors for s in t.shape)
        shapes = [tuple(int(s) if isinstance(s, int) else -1 for s in t.shape) for t in tensors]
        dtypes = [_dtype_name(t.dtype) for t in tensors]
        info = OpInfo(
            name=node.name,
            op=str(node.target) if node.op == "call_function" else node.op,
            kind=_fx_kind(node),
            shapes=shapes,
            dtypes=dtypes,
            module=node.meta.get(MODULE),
            pass_=node.meta.get("anefx_pass"),
            module_class=node.meta.get(MODULE_CLASS),
            dynamic=dynamic,
        )
        if node.op == "get_attr":
            if not node.users:
                continue
            t = gm
            for part in node.target.split("."):
                t = getattr(t, part)
            if isinstance(t, torch.Tensor):
                info.const = True
                info.nbytes = t.numel() * t.element_size()
                info.storage = weight_key(t)
                info.op = "weight" if info.nbytes > 4096 else "const"
        out.append(info)
    return out


def weight_key(t: torch.Tensor) -> Hashable | None:
    """What identifies the bytes a weight constant stores: the same view of the same storage
    is stored once, as the emitter shares an identical constant; different views (the slices of
    a split head or MLP, a tied head beside its embedding table) are stored each. Keying on the
    storage alone counted a split weight's first slice only (Qwen3-32B on meta: 47 of 65 GB).
    A meta tensor has no data pointer: its StorageImpl's address is stable and shared the same
    way (the id of the Python storage object is not: a new one per call)."""
    try:
        storage = t.untyped_storage()
    except Exception:  # a tensor subclass without storage
        return None
    base = storage.data_ptr() or storage._cdata
    return (base, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _unsupported_ops(gm: fx.GraphModule) -> list[Violation]:
    """The "unsupported_op" rule: nodes the Core ML emitter cannot translate (an op outside
    core/ops.py EMITTABLE, or a call_module / call_method node)."""
    rule = rules.RULES_BY_ID["unsupported_op"]
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        op = str(node.target) if node.op == "call_function" else f"{node.op} {node.target}"
        if node.op == "call_function" and op in EMITTABLE:
            continue
        v = node.meta.get("val")
        t = v if isinstance(v, torch.Tensor) else None
        out.append(
            Violation(
                rule=rule.id,
                severity=rule.severity,
                op=op,
                node=node.name,
                shape=None if t is None else [s if isinstance(s, int) else -1 for s in t.shape],
                dtype=None if t is None else _dtype_name(t.dtype),
                module=node.meta.get(MODULE),
                pass_=node.meta.get("anefx_pass"),
                message=f"no Core ML translation for {op}",
                limit="an op of core/ops.py EMITTABLE",
                module_class=node.meta.get(MODULE_CLASS),
            )
        )
    return out


def check_graph(gm: fx.GraphModule, stage: str, stats: dict | None = None) -> Report:
    """Check an fx graph (after shape propagation); its states come from its signature."""
    ops = fx_ops(gm)
    base = {
        "nodes": len(ops),
        "ops": sum(1 for o in ops if o.kind not in ("input", "const")),
    }
    if has_signature(gm) and signature_of(gm).states:
        base["states"] = [
            {"name": s.name, "shape": list(s.shape), "dtype": s.dtype}
            | ({"carried": True} if s.carried else {})
            for s in signature_of(gm).states
        ]
        base["program_states"] = len(pack_states(signature_of(gm).states))
    base.update(stats or {})
    report = check_ops(ops, stage, base)
    if stage.startswith("lowered"):  # a captured graph is reported by its own rules
        report.violations.extend(_unsupported_ops(gm))
    # a node a pass could not lower: its violations say which pass left it and why
    why = {n.name: reason for n in gm.graph.nodes if (reason := unlowered(n))}
    for v in report.violations:
        if v.node in why:
            v.message = f"{v.message} (left by {why[v.node]})"
    return report


# ---------------------------------------------------------------------------------------------
