"""Reading an emitted Core ML program: its ops, palettized weights and states as the rules see
them, and the rule check of every function (``check_spec``).

The spec is coremltools' protobuf; dtypes are read by the protobuf's own enum names. Op names
carry their provenance (``<module>__<pass>__<node>``, targets/coreml.py writes them), so each
op is attributed to the module of the Hugging Face model it came from.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

from coremltools.proto import MIL_pb2

from anefx.core import rules
from anefx.lowering.checker import OpInfo, Report, Violation, check_ops

_MIL_KINDS = {
    "linear": "linear",
    "pow": "pow",
    "rsqrt": "rsqrt",
    "gather": "gather",
    "gather_nd": "gather",
    "gather_along_axis": "gather",
    "scatter": "scatter",
    "scatter_nd": "scatter",
    "scatter_along_axis": "scatter",
    "cond": "control_flow",
    "while_loop": "control_flow",
    "band_part": "band_part",
    "conv": "conv",
    "const": "const",
    "constexpr_lut_to_dense": "const",
    "constexpr_blockwise_shift_scale": "const",
}


def _dtype_name(data_type: int) -> str:
    """The MIL dtype's name as the rules spell it ("float16", "uint4"): the protobuf enum's own
    name, lower case (a value this coremltools does not know keeps its number)."""
    try:
        return MIL_pb2.DataType.Name(data_type).lower()
    except ValueError:
        return str(data_type)


# bytes per element; the sub-byte index types are packed (bits / 8)
_MIL_ITEMSIZE = {
    "uint1": 1 / 8,
    "uint2": 2 / 8,
    "uint3": 3 / 8,
    "uint4": 4 / 8,
    "int4": 4 / 8,
    "uint6": 6 / 8,
    "float16": 2,
    "float32": 4,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "float64": 8,
    "int64": 8,
}

# Emitted op names carry their provenance as "<module>__<pass>__<node>" with the module's dots
# written as "_" (Core ML keeps only [A-Za-z0-9_] in names); the package metadata key
# MODULES_KEY maps each written module back to its dotted path.
NAME_SEP = "__"
MODULES_KEY = "anefx.modules"


def encode_module(module: str | None) -> str:
    return (module or "").replace(".", "_")


def split_op_name(name: str, modules: dict[str, str]) -> tuple[str | None, str | None, str]:
    """(module, pass, node) of an emitted op name; unknown parts are None."""
    parts = name.split(NAME_SEP)
    if len(parts) < 2:
        return None, None, name
    module = modules.get(parts[0], parts[0] or None)
    if len(parts) >= 3:
        pass_ = None if parts[1] == "capture" else parts[1]
        return module, pass_, NAME_SEP.join(parts[2:])
    return module, None, parts[1]


def tensor_shape(ttype) -> tuple[tuple[int, ...], str, bool]:
    dims, dynamic = [], False
    for d in ttype.dimensions:
        if d.WhichOneof("dimension") == "constant":
            dims.append(int(d.constant.size))
        else:
            dims.append(-1)
            dynamic = True
    return tuple(dims), _dtype_name(ttype.dataType), dynamic


def stored_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.ceil(math.prod(shape) * _MIL_ITEMSIZE.get(dtype, 2))


def value_info(value) -> tuple[tuple[int, ...], str, tuple[str, int] | None]:
    """(shape, dtype, blob location or None) of a literal MIL value (a const's val, an input)."""
    shape, dtype, _ = tensor_shape(value.type.tensorType)
    blob = None
    if value.WhichOneof("value") == "blobFileValue":
        blob = (value.blobFileValue.fileName, int(value.blobFileValue.offset))
    return shape, dtype, blob


def _op_name(op) -> str:
    """The name of an op without outputs (write_state): its "name" attribute, else its type."""
    if "name" in op.attributes:
        names = op.attributes["name"].immediateValue.tensor.strings.values
        if len(names):
            return names[0]
    return op.type


def function_block(spec, function: str):
    fn = spec.mlProgram.functions[function]
    return fn.block_specializations[fn.opset]


@dataclass
class LutInfo:
    """One constexpr_lut_to_dense op as stored: its indices, its table and their real bytes."""

    name: str
    module: str | None
    pass_: str | None
    indices_shape: tuple[int, ...]
    indices_dtype: str
    lut_shape: tuple[int, ...]
    lut_dtype: str
    nbytes: int  # the indices and tables stored with the op (0 for inputs read from a const op)
    blobs: tuple = ()

    @property
    def bits(self) -> int | None:
        """Index width, from the indices' dtype (uint<n>), or None if not an unsigned int."""
        d = self.indices_dtype
        return int(d[4:]) if d.startswith("uint") and d[4:].isdigit() else None


def mil_luts(spec, function: str = "main") -> list[LutInfo]:
    """The palettized weights (iOS18 constexpr_lut_to_dense ops) of one function.

    coremltools writes the indices and the table as the op's own literal inputs (two blobs);
    an input can also name another op's output (a const, or a constexpr in joint compression),
    whose bytes that op already counts.
    """
    meta = spec.description.metadata.userDefined
    modules = json.loads(meta[MODULES_KEY]) if MODULES_KEY in meta else {}
    produced: dict[str, tuple[tuple[int, ...], str]] = {}
    out = []
    for op in function_block(spec, function).operations:
        for o in op.outputs:
            if o.type.WhichOneof("type") == "tensorType":
                produced[o.name] = tensor_shape(o.type.tensorType)[:2]
        if op.type != "constexpr_lut_to_dense" or not op.outputs:
            continue
        parts, nbytes, blobs = {}, 0, []
        for key in ("indices", "lut"):
            binding = op.inputs[key].arguments[0] if key in op.inputs else None
            if binding is None:
                parts[key] = ((), "missing")
            elif binding.WhichOneof("binding") == "value":
                shape, dtype, blob = value_info(binding.value)
                parts[key] = (shape, dtype)
                nbytes += stored_bytes(shape, dtype)
                blobs.append(blob)
            else:
                parts[key] = produced.get(binding.name, ((), "unknown"))
        name = op.outputs[0].name
        module, pass_, _ = split_op_name(name, modules)
        out.append(
            LutInfo(name, module, pass_, *parts["indices"], *parts["lut"], nbytes, tuple(blobs))
        )
    return out


def mil_ops(spec, function: str = "main") -> list[OpInfo]:
    """The ops of one function of an mlprogram spec as OpInfo records."""
    fn = spec.mlProgram.functions[function]
    block = function_block(spec, function)
    meta = spec.description.metadata.userDefined
    modules = json.loads(meta[MODULES_KEY]) if MODULES_KEY in meta else {}
    luts = {lut.name: lut for lut in mil_luts(spec, function)}
    out = []
    for inp in fn.inputs:
        t = inp.type
        if t.WhichOneof("type") != "tensorType":
            continue  # states are reported by the caller
        shape, dtype, dyn = tensor_shape(t.tensorType)
        out.append(OpInfo(inp.name, "input", "input", [shape], [dtype], dynamic=dyn))
    for op in block.operations:
        shapes, dtypes, dyn = [], [], False
        for o in op.outputs:
            if o.type.WhichOneof("type") != "tensorType":
                continue
            s, d, dd = tensor_shape(o.type.tensorType)
            shapes.append(s)
            dtypes.append(d)
            dyn |= dd
        name = op.outputs[0].name if op.outputs else _op_name(op)
        module, pass_, _ = split_op_name(name, modules)
        info = OpInfo(
            name,
            op.type,
            _MIL_KINDS.get(op.type, op.type),
            shapes,
            dtypes,
            module=module,
            pass_=pass_,
            dynamic=dyn,
        )
        if info.kind == "const" and shapes:
            info.const = True
            blobs: tuple = ()
            if op.type == "constexpr_lut_to_dense" and name in luts:
                # the stored bytes: packed indices + the tables, not the dense tensor it yields
                info.nbytes, blobs = luts[name].nbytes, luts[name].blobs
            elif op.type == "const" and "val" in op.attributes:
                shape, dtype, blob = value_info(op.attributes["val"])
                info.nbytes, blobs = stored_bytes(shape, dtype), (blob,)
            else:
                info.nbytes = stored_bytes(shapes[0], dtypes[0])
            if blobs and all(blobs):
                # one blob read by several consts (weights shared by content) counts once
                info.storage = hash(blobs)
        out.append(info)
    return out


def _lut_violations(luts: list[LutInfo]) -> list[Violation]:
    """The "lut" rule: the forms of constexpr_lut_to_dense Core ML defines, with an fp16 table."""
    out = []
    for lut in luts:
        problems = []
        bits = lut.bits
        if bits not in rules.LUT_BITS:
            problems.append(
                f"indices {lut.indices_dtype}: index bits must be one of {rules.LUT_BITS}"
            )
        if lut.lut_dtype != rules.LUT_DTYPE:
            problems.append(f"LUT {lut.lut_dtype}, not {rules.LUT_DTYPE}")
        k = len(lut.indices_shape)
        if len(lut.lut_shape) != k + 2:
            problems.append(f"LUT {lut.lut_shape} is not (groups per axis..., entries, vector)")
        else:
            if bits in rules.LUT_BITS and lut.lut_shape[k] != 1 << bits:
                problems.append(
                    f"LUT has {lut.lut_shape[k]} entries, {bits}-bit indices need {1 << bits}"
                )
            if any(
                g == 0 or n % g for n, g in zip(lut.indices_shape, lut.lut_shape[:k], strict=True)
            ):
                problems.append(f"LUT groups {lut.lut_shape[:k]} do not tile {lut.indices_shape}")
        if problems:
            out.append(
                Violation(
                    "lut",
                    rules.RULES_BY_ID["lut"].severity,
                    "constexpr_lut_to_dense",
                    lut.name,
                    list(lut.indices_shape),
                    lut.indices_dtype,
                    lut.module,
                    lut.pass_,
                    "; ".join(problems),
                    f"{sorted(rules.LUT_BITS)}-bit indices, {rules.LUT_DTYPE} tables of 2**bits",
                )
            )
    return out


def check_spec(spec) -> list[Report]:
    """Check every function of an mlprogram spec; one report per function."""
    reports = []
    for name in sorted(spec.mlProgram.functions):  # a protobuf map: no stable order
        ops = mil_ops(spec, name)
        stats = {
            "function": name,
            "ops": sum(1 for o in ops if o.kind not in ("input", "const")),
            "op_types": dict(Counter(o.op for o in ops if o.kind not in ("input", "const"))),
        }
        states = _states(spec, name)
        if states:
            stats["states"] = states
        luts = mil_luts(spec, name)
        if luts:
            stats["palettized"] = {
                "weights": len(luts),
                "bits": dict(sorted(Counter(str(lut.bits) for lut in luts).items())),
                "bytes": sum(lut.nbytes for lut in luts),
            }
        report = check_ops(ops, f"emitted:{name}", stats)
        report.violations.extend(_lut_violations(luts))
        reports.append(report)
    return reports


def _states(spec, function: str) -> list[dict]:
    """The state inputs (KV caches) of one function: name, shape, dtype."""
    out = []
    for inp in spec.mlProgram.functions[function].inputs:
        if inp.type.WhichOneof("type") == "stateType":
            shape, dtype, _ = tensor_shape(inp.type.stateType.wrappedType.tensorType)
            out.append({"name": inp.name, "shape": list(shape), "dtype": dtype})
    return out
