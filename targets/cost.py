"""``anefx cost``: the bytes and MACs of every function of an emitted artifact, and an ESTIMATE of
tokens/s on the chips of the rule table (``core/rules.py CHIPS``).

Read from the saved program itself (the spec, not the weights' values), op by op:

- **weights read**: the stored bytes of every constant an op reads, once per call (a palettized
  weight counts its indices and tables: that is what is read); a ``gather`` from a constant
  table reads only the rows it returns.
- **state read / written**: a ``read_state`` is the state itself, not a copy; an op reading the
  state (or a view of it) reads the bytes of that input; a ``write_state`` of a freshly computed
  tensor writes all of it; a ``slice_update`` into the state writes in place, only its update
  rows, and a ``write_state`` of that result writes nothing more.
- **views**: ``slice_by_index`` and a ``reshape`` / ``expand_dims`` / ``squeeze`` that keeps the
  innermost axis are views when they read the state (no bytes of their own); on activations
  every op writes its outputs (a reshape counts as the copy the op counts call it).
- **activations written**: the bytes of every other op's outputs; **activations read**: the
  bytes of its non-constant, non-state inputs (reported, not in the estimate: an input was
  written by the op before, and the ANE keeps small tensors on chip).
- **carried states** (a hybrid's conv windows and delta-rule states, inputs and outputs of the
  program, core/signature.py): their inputs are read from memory at every call (counted, as
  the state is), their outputs written (part of the activations written, reported apart).
- **MACs**: conv, matmul and linear.

The estimate: decode is memory bound, a step costs (weights + state read + state written +
activations written) / the chip's ANE bandwidth, plus the dispatch floor per part; a prefill
call costs the larger of that and 2 x MACs / the chip's peak ops. Every figure it prints is an
estimate from these inputs, labelled so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from anefx.core import rules
from anefx.core.signature import Role, Signature, State, carried_output
from anefx.errors import AnefxInputError
from anefx.targets.mil_program import (
    function_block,
    mil_luts,
    stored_bytes,
    tensor_shape,
    value_info,
)

_VIEWS = ("slice_by_index", "reshape", "expand_dims", "squeeze")


@dataclass
class FunctionCost:
    """One function of one program: bytes per call and what they are."""

    part: str
    function: str
    ops: int = 0
    weight_bytes: int = 0
    state_read: int = 0
    state_written: int = 0
    activations_written: int = 0
    activations_read: int = 0
    macs: int = 0
    # bytes written by ops whose output has the size of a state (the cache-sized tensors)
    state_sized_written: int = 0
    carried_read: int = 0  # carried states read as inputs
    carried_written: int = 0  # ... and returned as outputs (within activations_written)

    @property
    def moved(self) -> int:
        """The bytes the estimate charges: weights, state traffic (held and carried) and
        activations written."""
        return (
            self.weight_bytes
            + self.state_read
            + self.state_written
            + self.carried_read
            + self.activations_written
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "moved": self.moved}


def _flag(block_consts: dict, op, param: str) -> bool:
    """A boolean parameter of OP (a named const or an immediate), False when absent."""
    if param not in op.inputs:
        return False
    binding = op.inputs[param].arguments[0]
    value = (
        block_consts.get(binding.name) if binding.WhichOneof("binding") == "name" else binding.value
    )
    if value is None:
        return False
    vals = value.immediateValue.tensor.bools.values
    return bool(vals[0]) if len(vals) else False


def program_cost(
    spec, function: str, part: str = "", carried: tuple[State, ...] = ()
) -> FunctionCost:
    """The cost of one call of FUNCTION of the program SPEC (see the module docstring);
    CARRIED are the function's carried states (from its signature)."""
    fn = spec.mlProgram.functions[function]
    block = function_block(spec, function)
    cost = FunctionCost(part, function)
    types: dict[str, tuple[tuple[int, ...], str]] = {}
    states: set[str] = set()
    state_bytes: set[int] = set()
    for inp in fn.inputs:
        if inp.type.WhichOneof("type") == "stateType":
            shape, dtype, _ = tensor_shape(inp.type.stateType.wrappedType.tensorType)
            states.add(inp.name)
            state_bytes.add(stored_bytes(shape, dtype))
        elif inp.type.WhichOneof("type") == "tensorType":
            types[inp.name] = tensor_shape(inp.type.tensorType)[:2]
    for state in carried:
        cost.carried_read += stored_bytes(*types.get(state.name, ((), "float16")))
    returned = {carried_output(state) for state in carried}
    luts = {lut.name: lut.nbytes for lut in mil_luts(spec, function)}
    weights: dict[str, int] = {}  # constant var -> its stored bytes
    const_values: dict[str, object] = {}
    alias: set[str] = set()  # vars that are the state itself (read_state, in-place updates)
    views: set[str] = set()  # vars that are views of the state
    read_weights: set[str] = set()

    def nbytes(var: str) -> int:
        shape, dtype = types.get(var, ((), "float16"))
        return stored_bytes(shape, dtype)

    for op in block.operations:
        outs = [o.name for o in op.outputs]
        for o in op.outputs:
            if o.type.WhichOneof("type") == "tensorType":
                types[o.name] = tensor_shape(o.type.tensorType)[:2]
        if op.type == "const":
            const_values[outs[0]] = op.attributes["val"]
            shape, dtype, _ = value_info(op.attributes["val"])
            weights[outs[0]] = stored_bytes(shape, dtype)
            continue
        if op.type.startswith("constexpr_"):
            weights[outs[0]] = luts.get(outs[0], nbytes(outs[0]))
            continue
        args = {
            p: [b.name for b in a.arguments if b.WhichOneof("binding") == "name"]
            for p, a in op.inputs.items()
        }
        first = args.get("x", args.get("input", [None]))[0]
        if op.type == "read_state":
            alias.update(outs)
            continue
        if op.type == "write_state":
            data = args.get("data", [None])[0]
            if data not in alias:
                cost.state_written += nbytes(data)
            continue
        cost.ops += 1
        if op.type == "slice_update" and first in alias:
            update = args["update"][0]
            cost.state_written += nbytes(update)
            cost.activations_read += nbytes(update)
            alias.update(outs)
            continue
        if op.type in _VIEWS and (first in alias or first in views):
            in_shape, out_shape = types.get(first, ((),))[0], types.get(outs[0], ((),))[0]
            if op.type == "slice_by_index" or in_shape[-1:] == out_shape[-1:]:
                views.update(outs)
                continue
        for o in outs:
            written = nbytes(o)
            cost.activations_written += written
            if o in returned:
                cost.carried_written += written
            if written in state_bytes:
                cost.state_sized_written += written
        for param, names in args.items():
            for var in names:
                if var in alias or var in views:
                    cost.state_read += nbytes(var)
                elif var in weights:
                    if op.type == "gather" and param == "x":
                        cost.weight_bytes += nbytes(outs[0])  # the rows it returns
                    elif var not in read_weights:
                        read_weights.add(var)
                        cost.weight_bytes += weights[var]
                elif var in types:
                    cost.activations_read += nbytes(var)
        cost.macs += _macs(op, args, types, const_values)
    return cost


def _macs(op, args: dict, types: dict, consts: dict) -> int:
    out = types.get(op.outputs[0].name, ((),))[0] if op.outputs else ()
    if op.type == "conv":
        weight = types.get(args["weight"][0], ((),))[0]
        return math.prod(out) * math.prod(weight[1:]) if weight else 0
    if op.type == "matmul":
        x = types.get(args["x"][0], ((),))[0]
        if len(x) < 2:
            return 0
        k = x[-2] if _flag(consts, op, "transpose_x") else x[-1]
        return math.prod(out) * k
    if op.type == "linear":
        weight = types.get(args["weight"][0], ((),))[0]
        return math.prod(out) * weight[-1] if weight else 0
    return 0


# ---------------------------------------------------------------------------------------------
# an artifact: a package or a folder of parts


@dataclass
class ArtifactCost:
    """The cost of every function of every part of an artifact, and what a call of each
    function costs over all parts."""

    path: str
    kind: str  # "package" | "parts"
    context: int | None
    tokens: dict[str, int]  # function -> tokens per call (its S)
    functions: list[FunctionCost] = field(default_factory=list)

    @property
    def parts(self) -> int:
        return len({f.part for f in self.functions})

    def total(self, function: str) -> FunctionCost:
        """FUNCTION summed over the parts (one decode step, one prefill call)."""
        total = FunctionCost("all", function)
        counted = [f.name for f in fields(FunctionCost) if f.name not in ("part", "function")]
        for f in self.functions:
            if f.function == function:
                for key in counted:
                    setattr(total, key, getattr(total, key) + getattr(f, key))
        return total

    def names(self) -> list[str]:
        return list(dict.fromkeys(f.function for f in self.functions))

    def estimate(self, chip: rules.Chip) -> dict[str, dict]:
        """ESTIMATED seconds and tokens/s of one call of each function on CHIP."""
        out = {}
        for name in self.names():
            t = self.total(name)
            floor = rules.DISPATCH_FLOOR_S * self.parts
            memory = t.moved / (chip.ane_gbps * 1e9) if chip.ane_gbps else None
            compute = 2 * t.macs / (chip.ane_tops * 1e12) if chip.ane_tops else None
            known = [s for s in (memory, compute) if s is not None]
            if memory is None:  # without bandwidth, a memory-bound step cannot be estimated
                seconds = None
            else:
                seconds = max(known) + floor
            tokens = self.tokens.get(name, 1)
            out[name] = {
                "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds else None,
                "tokens_per_call": tokens,
                "memory_s": memory,
                "compute_s": compute,
                "dispatch_s": floor,
            }
        return out

    def to_dict(self, chips: list[rules.Chip]) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "context": self.context,
            "parts": self.parts,
            "functions": [f.to_dict() for f in self.functions],
            "totals": {n: self.total(n).to_dict() for n in self.names()},
            "estimate": {
                c.name: {
                    "ESTIMATE": True,
                    "ane_gbps": c.ane_gbps,
                    "ane_tops": c.ane_tops,
                    "source": c.source,
                    "dispatch_floor_s": rules.DISPATCH_FLOOR_S,
                    "functions": self.estimate(c),
                }
                for c in chips
            },
        }


def _tokens(signature: Signature) -> int | None:
    for i in signature.inputs:
        if i.role in (Role.TOKENS, Role.HIDDEN) and len(i.shape) >= 2:
            return int(i.shape[-1] if i.role is Role.HIDDEN else i.shape[1])
    return None


def artifact_cost(path: str | Path, verify: bool = True) -> ArtifactCost:
    """The cost of the package or parts folder at PATH, checked against its digests first
    (VERIFY False: the caller wrote it a moment ago, e.g. convert's own estimate)."""
    from anefx.targets.reader import (
        artifact_kind,
        check_package,
        check_parts,
        read_manifest,
        read_spec,
    )

    path = Path(path)
    kind = artifact_kind(path)
    if kind == "parts":
        manifest = read_manifest(path)
        if verify:
            check_parts(path, manifest)
        files = [(p["name"], path / p["file"]) for p in manifest["parts"]]
        carried = {
            (p["name"], fn): Signature.from_dict(io).carried
            for p in manifest["parts"]
            for fn, io in (p.get("functions") or {}).items()
            if isinstance(io, dict) and "inputs" in io
        }
        seq = manifest.get("seq_len") or {}
        context = manifest.get("context")
    else:
        report = check_package(path) if verify else _stored_report(path)
        files = [(path.name, path)]
        sigs = {n: Signature.from_dict(d) for n, d in (report.get("signatures") or {}).items()}
        carried = {(path.name, n): s.carried for n, s in sigs.items()}
        seq = {n: t for n, s in sigs.items() if (t := _tokens(s)) is not None}
        context = report.get("context")
    result = ArtifactCost(str(path), kind, context, dict(seq) if isinstance(seq, dict) else {})
    for part, file in files:
        spec = read_spec(file)
        for fn in sorted(spec.mlProgram.functions):
            result.functions.append(program_cost(spec, fn, part, carried.get((part, fn), ())))
    if not result.functions:
        raise AnefxInputError(f"{path}: no function to cost")
    return result


def _stored_report(path: Path) -> dict:
    """The anefx report inside a package anefx just wrote (no digest check)."""
    from anefx.targets.artifact import REPORT_ITEM
    from anefx.targets.reader import read_json

    return read_json(path / REPORT_ITEM, 64 << 20, "the package's report")


def chips_named(name: str | None) -> list[rules.Chip]:
    """The chip NAME (case-insensitive), or every chip of the table for None."""
    if name is None:
        return list(rules.CHIPS.values())
    by_lower = {c.lower(): c for c in rules.CHIPS}
    if name.lower() not in by_lower:
        raise AnefxInputError(
            f"--chip: {name!r} is not in the table; known: {', '.join(rules.CHIPS)}"
        )
    return [rules.CHIPS[by_lower[name.lower()]]]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def render(cost: ArtifactCost, chips: list[rules.Chip]) -> str:
    """The cost as a table, then the ESTIMATE per chip."""
    rows = [*cost.functions, *(cost.total(n) for n in cost.names())]
    carried = any(f.carried_read for f in rows)  # a hybrid's conv and delta-rule states
    lines = [
        f"{cost.path}: {cost.kind}, {cost.parts} part(s), context {cost.context}",
        f"  {'part':<24}{'function':<10}{'ops':>6}{'weights MB':>12}{'state rd MB':>13}"
        f"{'state wr MB':>13}{'act wr MB':>11}{'GMACs':>9}"
        + (f"{'carried rd/wr MB':>18}" if carried else ""),
    ]
    for f in rows:
        lines.append(
            f"  {f.part[:23]:<24}{f.function:<10}{f.ops:>6}{_mb(f.weight_bytes):>12}"
            f"{_mb(f.state_read):>13}{_mb(f.state_written):>13}"
            f"{_mb(f.activations_written):>11}{f.macs / 1e9:>9.2f}"
            + (f"{_mb(f.carried_read) + ' / ' + _mb(f.carried_written):>18}" if carried else "")
        )
    lines.append(
        f"  ESTIMATE (not measured): bytes / ANE bandwidth + {rules.DISPATCH_FLOOR_S * 1e6:g} us "
        "per part, or 2 x MACs / peak ops if larger (core/rules.py CHIPS, device-facts.md)"
    )
    for chip in chips:
        est = cost.estimate(chip)
        said = ", ".join(
            f"{n} ~{e['tokens_per_s']:,.1f} tok/s" if e["tokens_per_s"] else f"{n} n/a"
            for n, e in est.items()
        )
        bw = f"{chip.ane_gbps:g} GB/s" if chip.ane_gbps else "no bandwidth figure"
        tops = f", {chip.ane_tops:g} TOPS" if chip.ane_tops else ""
        lines.append(f"  {chip.name:<8} ({bw}{tops}): {said}")
    return "\n".join(lines)


def one_line(cost: ArtifactCost, chip: rules.Chip) -> str:
    """The ESTIMATE convert prints at its end."""
    est = cost.estimate(chip)
    said = ", ".join(
        f"{n} ~{e['tokens_per_s']:,.0f} tok/s" for n, e in est.items() if e["tokens_per_s"]
    )
    return (
        f"estimate on {chip.name} ({chip.ane_gbps:g} GB/s ANE, not measured): {said}; "
        f"`anefx cost` for the figures"
    )
