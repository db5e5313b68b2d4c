"""A reference executor for saved Core ML programs: numpy, op by op, on any machine.

Core ML's ``predict`` needs macOS. This module reads a saved ``.mlpackage`` (the spec protobuf
and the weight blob) and runs one function of its mlprogram op by op in numpy, with Core ML's
op semantics as coremltools documents them (coremltools/converters/mil/mil/ops/defs).

Precision model: every floating-point op widens its inputs exactly to float32, computes in
float32 and rounds its result once (round to nearest even) to the dtype the program declares
for it: float16 in an fp16 package. This is what the ANE's fp16 datapath approximates (fp16
tensors between ops, wider arithmetic inside an op). For add, sub, mul, real_div and the
comparisons it is exactly IEEE fp16 arithmetic (float32 has the 2p + 2 bits that make the
double rounding innocuous); exp, tanh and erf (torch's, for gelu) are float32 functions, so
within one fp16 ulp of the correctly rounded value; matmul, conv, layer_norm, softmax and the
reductions accumulate in float32 (numpy's / BLAS's order) and round once. A result beyond the
fp16 range becomes +-inf, as in fp16. int32 and bool ops compute as such.

Nothing is approximated or skipped: an op type the executor does not implement raises
:class:`ExecError` (naming the op type, the op and the function) before anything runs; a
parameter value it does not implement (conv ``pad_type`` same, gather ``batch_dims``), an
undefined case (a gather index out of bounds) or a result that disagrees with the shape the
program declares raises when the op is reached. Weights are read once from the package's blob
(cached by file and offset, shared by every function of the package) and kept in their stored
dtype; constexpr (palettized / quantized) weights are decompressed once. A weight is read only
after its record is checked against the weight file (inside the package, within the file's
size, as many bytes as its shape needs): a truncated or damaged file is bad input naming the file
and the offset.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anefx.core.signature import CARRIED_SUFFIX, Input, Signature
from anefx.errors import AnefxGraphError, AnefxInputError
from anefx.targets.reader import (
    MANIFEST,
    check_part_program,
    check_parts,
    read_manifest,
    read_package,
)

__all__ = [
    "IMPLEMENTED_OPS",
    "ExecError",
    "Function",
    "Program",
    "TensorInfo",
    "load_package",
]


class ExecError(AnefxGraphError):
    """The program uses an op or parameter the executor does not implement, or breaks its own
    declared types; the message names the op type, the op and the function."""


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor of a function: an input, a state or an output (-1: a flexible dim)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


# ---------------------------------------------------------------------------------------------
# spec decoding

# MIL DataType name -> numpy dtype (sub-byte types are unpacked to one element per byte)
_NP_BY_NAME = {
    "BOOL": np.bool_,
    "FLOAT16": np.float16,
    "FLOAT32": np.float32,
    "FLOAT64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT4": np.int8,
    "UINT1": np.uint8,
    "UINT2": np.uint8,
    "UINT3": np.uint8,
    "UINT4": np.uint8,
    "UINT6": np.uint8,
}
_SUB_BYTE_BITS = {"INT4": 4, "UINT1": 1, "UINT2": 2, "UINT3": 3, "UINT4": 4, "UINT6": 6}
# MIL DataType name -> the blob reader's method
_BLOB_READERS = {
    "FLOAT16": "read_fp16_data",
    "FLOAT32": "read_float_data",
    "INT8": "read_int8_data",
    "UINT8": "read_uint8_data",
    "INT16": "read_int16_data",
    "UINT16": "read_uint16_data",
    "INT32": "read_int32_data",
    "UINT32": "read_uint32_data",
    "INT4": "read_int4_data",
    "UINT1": "read_uint1_data",
    "UINT2": "read_uint2_data",
    "UINT3": "read_uint3_data",
    "UINT4": "read_uint4_data",
    "UINT6": "read_uint6_data",
}
_CAST_TARGETS = {
    "fp16": np.float16,
    "fp32": np.float32,
    "int32": np.int32,
    "bool": np.bool_,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
}


def _type_name(enum_value: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(enum_value)


def _tensor_type(value_type, what: str) -> tuple[str, tuple[int, ...]]:
    """(MIL dtype name, shape) of a tensor ValueType; -1 for a dimension that is not constant."""
    kind = value_type.WhichOneof("type")
    if kind == "stateType":
        value_type = value_type.stateType.wrappedType
        kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise ExecError(f"{what}: a {kind} value; the executor handles tensors only")
    t = value_type.tensorType
    dims = tuple(
        int(d.constant.size) if d.WhichOneof("dimension") == "constant" else -1
        for d in t.dimensions
    )
    return _type_name(t.dataType), dims


def _np_dtype(type_name: str, what: str) -> np.dtype:
    if type_name not in _NP_BY_NAME:
        raise ExecError(f"{what}: dtype {type_name} is not supported by the executor")
    return np.dtype(_NP_BY_NAME[type_name])


def _immediate(value, type_name: str, shape: tuple[int, ...], what: str):
    """The numpy value of an immediate tensor (a str for a scalar string)."""
    tv = value.immediateValue.tensor
    kind = tv.WhichOneof("value")
    if type_name == "STRING":
        vals = list(tv.strings.values)
        return vals[0] if shape == () else np.array(vals).reshape(shape)
    dtype = _np_dtype(type_name, what)
    n = int(np.prod(shape, dtype=np.int64))
    if kind == "bytes":
        raw = np.frombuffer(tv.bytes.values, np.uint8)
        if type_name in _SUB_BYTE_BITS:
            from coremltools.optimize._utils import restore_elements_from_packed_bits

            arr = restore_elements_from_packed_bits(
                raw, _SUB_BYTE_BITS[type_name], n, type_name.startswith("INT")
            ).astype(dtype)
        else:
            arr = raw.view(dtype)
    elif kind in ("floats", "ints", "bools", "longInts", "doubles"):
        arr = np.array(list(getattr(tv, kind).values)).astype(dtype)
    else:
        raise ExecError(f"{what}: immediate value of kind {kind} is not supported")
    if arr.size != n:
        raise ExecError(f"{what}: immediate value has {arr.size} elements for shape {shape}")
    return arr.reshape(shape)


def _op_name(op_spec) -> str:
    """The op's own name (its "name" attribute), else its first output's."""
    attr = op_spec.attributes.get("name")
    if attr is not None and attr.WhichOneof("value") == "immediateValue":
        names = attr.immediateValue.tensor.strings.values
        if names:
            return names[0]
    return op_spec.outputs[0].name if op_spec.outputs else op_spec.type


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


# ---------------------------------------------------------------------------------------------
# the prepared program


@dataclass
class _Op:
    type: str
    name: str
    args: dict[str, list[str]]  # parameter -> var names (value bindings get synthetic names)
    outputs: list[tuple[str, tuple[int, ...], np.dtype]]
    release: list[str] = field(default_factory=list)  # vars dead after this op


@dataclass
class Function:
    """One function of the program: its inputs, states, outputs and ops."""

    name: str
    opset: int  # Core ML opset number: 8 for iOS18
    inputs: list[TensorInfo]
    states: list[TensorInfo]
    outputs: list[TensorInfo]
    ops: list[_Op] = field(repr=False)
    # constant vars in program order: (name, key into the program's cache, how to make it)
    consts: list[tuple[str, tuple, object]] = field(repr=False)


class Program:
    """A saved mlprogram, ready to run on numpy. Build with :func:`load_package`."""

    def __init__(self, spec, weights_dir: Path | None, path: str = "") -> None:
        self.path = path
        self.spec = spec  # the program's protobuf (small: the weights stay in their blob)
        self.weights_dir = weights_dir
        self._blobs: dict[str, _BlobFile] = {}
        self._cache: dict[tuple, np.ndarray] = {}  # const key -> value, shared by functions
        self._fn_consts: dict[str, dict[str, np.ndarray]] = {}
        if spec.WhichOneof("Type") != "mlProgram":
            raise AnefxInputError(f"{path}: not an mlprogram ({spec.WhichOneof('Type')})")
        prog = spec.mlProgram
        self.functions: dict[str, Function] = {
            name: self._prepare(name, fn) for name, fn in prog.functions.items()
        }
        default = spec.description.defaultFunctionName
        self.default_function = default or next(iter(self.functions), "main")

    # -- preparation ---------------------------------------------------------------------------

    def _prepare(self, fname: str, fn) -> Function:
        opset = int(fn.opset.removeprefix("CoreML")) if fn.opset.startswith("CoreML") else 0
        block = fn.block_specializations[fn.opset]
        inputs, states, types = [], [], {}
        for inp in fn.inputs:
            tname, shape = _tensor_type(inp.type, f"input {inp.name} of {fname}")
            info = TensorInfo(inp.name, shape, _np_dtype(tname, f"input {inp.name}"))
            (states if inp.type.WhichOneof("type") == "stateType" else inputs).append(info)
            types[inp.name] = info
        state_names = {s.name for s in states}
        ops: list[_Op] = []
        consts: list[tuple[str, tuple, object]] = []
        keys: dict[str, tuple] = {}  # const var -> cache key
        synthetic = 0
        for op_spec in block.operations:
            name = _op_name(op_spec)
            where = f"{op_spec.type} {name} in function {fname}"
            outputs = []
            for o in op_spec.outputs:
                tname, shape = _tensor_type(o.type, f"output {o.name} of {where}")
                dtype = None if tname == "STRING" else _np_dtype(tname, f"output of {where}")
                outputs.append((o.name, shape, dtype))
                if dtype is not None:
                    types[o.name] = TensorInfo(o.name, shape, dtype)
            if op_spec.type == "const":
                var = outputs[0][0]
                key, make = self._value(op_spec.attributes["val"], (fname, var), where)
                consts.append((var, key, make))
                keys[var] = key
                continue
            args: dict[str, list[str]] = {}
            for param, argument in op_spec.inputs.items():
                names = []
                for binding in argument.arguments:
                    if binding.WhichOneof("binding") == "name":
                        names.append(binding.name)
                        continue
                    synthetic += 1
                    var = f"\0{param}#{synthetic}"
                    key, make = self._value(binding.value, (fname, var), where)
                    consts.append((var, key, make))
                    keys[var] = key
                    names.append(var)
                args[param] = names
            op = _Op(op_spec.type, name, args, outputs)
            if op_spec.type.startswith("constexpr_"):
                # materialized once, like a const: keyed by its inputs so functions share it
                key = (
                    op.type,
                    tuple(sorted((p, tuple(keys.get(v, v) for v in vs)) for p, vs in args.items())),
                )
                if len(outputs) != 1 or not all(v in keys for vs in args.values() for v in vs):
                    raise ExecError(f"{where}: a constexpr op must have const inputs, one output")
                consts.append((outputs[0][0], key, op))
                keys[outputs[0][0]] = key
                continue
            ops.append(op)
        out_names = list(block.outputs)
        outputs = []
        for n in out_names:
            if n not in types:
                raise ExecError(f"function {fname}: output {n} is produced by no op")
            outputs.append(types[n])
        # liveness: drop every intermediate after its last use
        last: dict[str, int] = {}
        for i, op in enumerate(ops):
            for vs in op.args.values():
                for v in vs:
                    last[v] = i
        keep = set(out_names) | set(keys) | state_names
        for v, i in last.items():
            if v not in keep:
                ops[i].release.append(v)
        return Function(fname, opset, inputs, states, outputs, ops, consts)

    def _value(self, value, ident: tuple, what: str) -> tuple[tuple, object]:
        """(cache key, maker) of a const value: immediate (decoded now) or in a blob file."""
        tname, shape = _tensor_type(value.type, what)
        kind = value.WhichOneof("value")
        if kind == "immediateValue":
            val = _immediate(value, tname, shape, what)
            if isinstance(val, np.ndarray) and val.dtype.kind != "U":  # by content: shared
                return ("imm", val.dtype.str, val.shape, val.tobytes()), val
            return ("imm", *ident), val
        if kind == "blobFileValue":
            blob = value.blobFileValue
            if tname not in _BLOB_READERS:
                raise ExecError(f"{what}: blob values of dtype {tname} are not supported")
            if self.weights_dir is None:
                raise AnefxInputError(
                    f"{self.path}: {what} reads a weight blob; the package has no weights folder"
                )
            # as Core ML does, only the file name counts ("@model_path/weights/weight.bin"):
            # it must name a file in the weights folder, never a path out of it
            name = blob.fileName.split("/")[-1]
            if name in ("", ".", "..") or "\0" in name:
                raise AnefxInputError(
                    f"{self.path}: {what} reads the weight file {blob.fileName!r}, which is not a "
                    "file in the package's weights folder"
                )
            if min(shape, default=1) < 0:
                raise AnefxInputError(f"{self.path}: {what}: a weight of flexible shape {shape}")
            file = str(self.weights_dir / name)
            key = ("blob", file, int(blob.offset), tname, shape)
            return key, key
        raise ExecError(f"{what}: const value of kind {kind} is not supported")

    def _read_blob(self, key: tuple) -> np.ndarray:
        _, file, offset, tname, shape = key
        blob = self._blobs.get(file)
        if blob is None:
            blob = self._blobs[file] = _BlobFile(file)
        return blob.read(offset, tname, shape)

    def _consts(self, fn: Function) -> dict[str, np.ndarray]:
        """Every constant of FN by var name; loaded on the first call, then cached."""
        done = self._fn_consts.get(fn.name)
        if done is not None:
            return done
        env: dict[str, np.ndarray] = {}
        for name, key, make in fn.consts:
            val = self._cache.get(key)
            if val is None:
                if isinstance(make, _Op):
                    val = _run_op(make, fn, env, {})[0]
                elif isinstance(make, tuple):
                    val = self._read_blob(make)
                else:
                    val = make
                if isinstance(val, np.ndarray):
                    val = _frozen(val)
                self._cache[key] = val
            env[name] = val
        self._fn_consts[fn.name] = env
        return env

    # -- running -------------------------------------------------------------------------------

    def zero_states(self, function: str) -> dict[str, np.ndarray]:
        """Zero-filled states of FUNCTION (a fresh KV cache)."""
        return {s.name: np.zeros(s.shape, s.dtype) for s in self._function(function).states}

    def _function(self, function: str) -> Function:
        fn = self.functions.get(function)
        if fn is None:
            raise AnefxInputError(
                f"{self.path}: no function {function!r} (functions: {', '.join(self.functions)})"
            )
        return fn

    def run(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray],
        states: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run FUNCTION on INPUTS; return its outputs and the states after the call.

        STATES (None: zeros) are read by ``read_state`` and replaced by ``write_state`` /
        ``coreml_update_state``; they persist only through what this returns, so the caller
        threads them from call to call. Inputs are cast to the declared dtypes (a float array
        is rounded to fp16; an integer array must hold its values exactly).
        """
        fn = self._function(function)
        for op in [*fn.ops, *(m for _, _, m in fn.consts if isinstance(m, _Op))]:
            _check_supported(op, fn)
        feeds = _feeds(fn.inputs, inputs, f"function {fn.name}: input")
        if states is None:
            states = self.zero_states(function)
        held = {
            k: v.copy() for k, v in _feeds(fn.states, states, f"function {fn.name}: state").items()
        }
        env = dict(self._consts(fn))
        env.update(feeds)
        with np.errstate(all="ignore"):
            for op in fn.ops:
                for (name, _, _), val in zip(op.outputs, _run_op(op, fn, env, held), strict=True):
                    env[name] = val
                for v in op.release:
                    env.pop(v, None)
        return {o.name: env[o.name] for o in fn.outputs}, held


def load_package(path: str | Path) -> Program:
    """Read a saved .mlpackage (its spec and weight blob) as a :class:`Program`.

    The package is read, never written (:mod:`anefx.targets.reader`: its items confined to it,
    its spec size-bounded); a spec that parses but is not a well-formed program is refused as
    bad input naming the spec file."""
    spec, layout = read_package(path)
    try:
        return Program(spec, layout.weights_dir, str(layout.path))
    except (AnefxInputError, AnefxGraphError):
        raise
    except Exception as exc:  # a field the program needs is missing or malformed
        raise AnefxInputError(
            f"{layout.spec_file}: not a well-formed mlprogram ({type(exc).__name__}: {exc})"
        ) from None


# MIL blob storage (coremltools mlmodel/src/MILBlob/Blob/StorageFormat.hpp): a 64-byte file
# header (uint32 count, uint32 version = 2, reserved), then per weight a 64-byte metadata record
# (uint32 sentinel 0xDEADBEEF, uint32 dtype, uint64 size in bytes, uint64 data offset, uint64
# padding bits, reserved) at the offset the program names, and the data where it points.
_BLOB_HEADER = 64
_BLOB_SENTINEL = 0xDEADBEEF
_BITS = {
    "FLOAT16": 16,
    "FLOAT32": 32,
    "INT8": 8,
    "UINT8": 8,
    "INT16": 16,
    "UINT16": 16,
    "INT32": 32,
    "UINT32": 32,
    **_SUB_BYTE_BITS,
}


class _BlobFile:
    """One weight file, every read checked against its size before coremltools' reader (which
    maps the file and trusts the offsets) touches it."""

    def __init__(self, file: str) -> None:
        self.file = file
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            raise AnefxInputError(f"{file}: the weight file is missing") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise AnefxInputError(f"{file}: not a regular file (the weight file)")
        self.size = st.st_size
        head = self._bytes(0, _BLOB_HEADER)
        if len(head) < _BLOB_HEADER or struct.unpack_from("<I", head, 4)[0] != 2:
            raise AnefxInputError(
                f"{file}: not a Core ML weight file (no version 2 blob storage header)"
            )
        self._reader = None

    def _bytes(self, offset: int, n: int) -> bytes:
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.file, flags)
        except OSError as exc:
            raise AnefxInputError(f"{self.file}: cannot read ({exc.strerror})") from None
        try:
            return os.pread(fd, n, offset)
        finally:
            os.close(fd)

    def read(self, offset: int, tname: str, shape: tuple[int, ...]) -> np.ndarray:
        """The weight whose metadata record is at OFFSET, as SHAPE of TNAME."""
        at = f"{self.file}: the weight at offset {offset}"
        if offset < _BLOB_HEADER or offset + _BLOB_HEADER > self.size:
            raise AnefxInputError(f"{at} is beyond the file's {self.size} bytes (truncated?)")
        meta = self._bytes(offset, _BLOB_HEADER)
        sentinel, _, nbytes, data, _ = struct.unpack_from("<IIQQQ", meta)
        if sentinel != _BLOB_SENTINEL:
            raise AnefxInputError(f"{at}: no weight record there (damaged)")
        if data < offset + _BLOB_HEADER or data + nbytes > self.size:
            raise AnefxInputError(
                f"{at} needs bytes {data}..{data + nbytes}, the file has {self.size} (truncated?)"
            )
        count = int(np.prod(shape, dtype=object))
        need = (count * _BITS[tname] + 7) // 8
        if nbytes != need:
            raise AnefxInputError(
                f"{at} holds {nbytes} bytes; the program reads it as {tname} {shape} ({need} bytes)"
            )
        if self._reader is None:
            from coremltools.libmilstoragepython import _BlobStorageReader

            self._reader = _BlobStorageReader(self.file)
        try:
            arr = getattr(self._reader, _BLOB_READERS[tname])(offset)
        except Exception as exc:  # its own checks: sentinel, dtype, padding
            raise AnefxInputError(f"{at}: unreadable ({exc})") from None
        if tname == "FLOAT16":
            arr = arr.view(np.float16)
        arr = arr.astype(_NP_BY_NAME[tname], copy=False)
        if arr.size != count:
            raise AnefxInputError(f"{at}: {arr.size} elements for shape {shape}")
        return arr.reshape(shape)


def _feeds(specs: list[TensorInfo], given: Mapping[str, np.ndarray], what: str) -> dict:
    names = {s.name for s in specs}
    extra = sorted(set(given) - names)
    if extra:
        raise AnefxInputError(f"{what} {extra[0]} is not declared (declared: {sorted(names)})")
    out = {}
    for s in specs:
        if s.name not in given:
            raise AnefxInputError(f"{what} {s.name} is missing")
        arr = np.asarray(given[s.name])
        if not _shape_ok(arr.shape, s.shape):
            raise AnefxInputError(f"{what} {s.name}: shape {arr.shape}, declared {s.shape}")
        if arr.dtype != s.dtype:
            conv = arr.astype(s.dtype)
            if s.dtype.kind != "f" and not np.array_equal(conv, arr):
                raise AnefxInputError(
                    f"{what} {s.name}: {arr.dtype} values do not fit the declared {s.dtype}"
                )
            arr = conv
        out[s.name] = arr
    return out


def _shape_ok(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(
        d in (-1, s) for s, d in zip(shape, declared, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# op execution


class _Args:
    """The argument values of one op, by parameter name."""

    __slots__ = ("op", "fn", "env", "states")

    def __init__(self, op: _Op, fn: Function, env: dict, states: dict) -> None:
        self.op, self.fn, self.env, self.states = op, fn, env, states

    def fail(self, message: str) -> ExecError:
        return ExecError(f"{self.op.type} {self.op.name} in function {self.fn.name}: {message}")

    def __contains__(self, param: str) -> bool:
        return param in self.op.args

    def __getitem__(self, param: str):
        names = self.op.args.get(param)
        if names is None:
            raise self.fail(f"missing required parameter {param}")
        if len(names) != 1:
            raise self.fail(f"parameter {param} takes one value, got {len(names)}")
        return self.env[names[0]]

    def many(self, param: str) -> list:
        return [self.env[n] for n in self.op.args.get(param, [])]

    def name(self, param: str) -> str:
        return self.op.args[param][0]

    def const(self, param: str, default=None):
        """A parameter as a Python value (int, float, bool, str or list); DEFAULT if absent."""
        if param not in self.op.args:
            return default
        val = self[param]
        if isinstance(val, np.ndarray):
            return val.item() if val.ndim == 0 else val.tolist()
        return val


def _run_op(op: _Op, fn: Function, env: dict, states: dict) -> list[np.ndarray]:
    a = _Args(op, fn, env, states)
    try:
        result = _OPS[op.type](a)
    except ExecError:
        raise
    except Exception as exc:  # numpy's message, with the op named
        raise a.fail(f"{type(exc).__name__}: {exc}") from exc
    results = [] if result is None else list(result) if isinstance(result, tuple) else [result]
    if len(results) != len(op.outputs):
        raise a.fail(f"produced {len(results)} outputs, the program declares {len(op.outputs)}")
    out = []
    for (name, shape, dtype), val in zip(op.outputs, results, strict=True):
        val = np.asarray(val)
        if not _shape_ok(val.shape, shape):
            raise a.fail(f"output {name} has shape {val.shape}, the program declares {shape}")
        out.append(val if val.dtype == dtype else val.astype(dtype))
    return out


def _check_supported(op: _Op, fn: Function) -> None:
    if op.type not in _OPS:
        raise ExecError(
            f"op type {op.type!r} ({op.name} in function {fn.name}) is not implemented by the "
            "reference executor"
        )


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False)


def _floating(*xs: np.ndarray) -> bool:
    return any(x.dtype.kind == "f" for x in xs)


def _binary(f: Callable) -> Callable:
    def run(a: _Args):
        x, y = np.asarray(a["x"]), np.asarray(a["y"])
        if _floating(x, y):
            x, y = _f32(x), _f32(y)
        return f(x, y)

    return run


def _unary_float(f: Callable) -> Callable:
    def run(a: _Args):
        x = np.asarray(a["x"])
        if x.dtype.kind != "f":
            raise a.fail(f"input dtype {x.dtype}; the op takes fp16 or fp32")
        return f(_f32(x))

    return run


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _erf(x: np.ndarray) -> np.ndarray:
    import torch  # numpy has no erf; torch's float32 erf is correctly rounded to fp32 ulps

    return torch.erf(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _gelu(a: _Args):
    x = _f32(np.asarray(a["x"]))
    mode = a.const("mode", "EXACT")
    if mode == "EXACT":
        return np.float32(0.5) * x * (np.float32(1.0) + _erf(x / np.float32(np.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x**3)
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    raise a.fail(f"gelu mode {mode!r} is not implemented")


def _softmax(a: _Args):
    x = _f32(np.asarray(a["x"]))
    axis = a.const("axis", -1)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(a: _Args):
    x = _f32(np.asarray(a["x"]))
    rank = x.ndim
    axes = tuple(sorted({ax % rank for ax in a.const("axes", list(range(rank)))}))
    eps = np.float32(a.const("epsilon", 1e-5))
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    y = d / np.sqrt((d * d).mean(axis=axes, keepdims=True) + eps)
    norm_shape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    if "gamma" in a:
        y = y * _f32(np.asarray(a["gamma"])).reshape(norm_shape)
    if "beta" in a:
        y = y + _f32(np.asarray(a["beta"])).reshape(norm_shape)
    return y


def _reduce(f: Callable) -> Callable:
    def run(a: _Args):
        x = np.asarray(a["x"])
        if x.dtype.kind == "f":
            x = _f32(x)
        axes = a.const("axes")
        axes = tuple(range(x.ndim)) if axes is None else tuple(ax % x.ndim for ax in axes)
        return f(x, axis=axes, keepdims=bool(a.const("keep_dims", False)))

    return run


def _reduce_argmax(a: _Args):
    x = np.asarray(a["x"])
    if x.dtype.kind == "f":
        x = _f32(x)
    axis = a.const("axis", -1) % x.ndim
    out = np.argmax(x, axis=axis)  # ties: the first index (Core ML leaves it unspecified)
    return np.expand_dims(out, axis) if a.const("keep_dims", False) else out


def _matmul(a: _Args):
    x, y = np.asarray(a["x"]), np.asarray(a["y"])
    if _floating(x, y):
        x, y = _f32(x), _f32(y)
    if a.const("transpose_x", False) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if a.const("transpose_y", False) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _conv(a: _Args):
    x, w = np.asarray(a["x"]), np.asarray(a["weight"])
    nsp = x.ndim - 2
    if nsp < 1 or w.ndim != x.ndim:
        raise a.fail(f"x {x.shape} and weight {w.shape}: need (N, C, *spatial) and a kernel")
    strides = list(a.const("strides", [1] * nsp))
    dilations = list(a.const("dilations", [1] * nsp))
    groups = int(a.const("groups", 1))
    pad_type = a.const("pad_type", "valid")
    if pad_type == "valid":
        pads = [0] * (2 * nsp)
    elif pad_type == "custom":
        pads = list(a.const("pad", [0] * (2 * nsp)))
    else:
        raise a.fail(f"pad_type {pad_type!r} is not implemented (valid and custom are)")
    n, cin = x.shape[:2]
    cout, cin_g = w.shape[:2]
    kernel = w.shape[2:]
    if cin % groups or cin // groups != cin_g or cout % groups:
        raise a.fail(f"channels: x {cin}, weight {w.shape}, groups {groups}")
    x, w = _f32(x), _f32(w)
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[2 * i], pads[2 * i + 1]) for i in range(nsp)])
    sp = x.shape[2:]
    out_sp = [(sp[i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nsp)]
    if min(out_sp) < 1:
        raise a.fail(f"kernel {kernel} does not fit the input {sp}")
    if groups == 1 and all(k == 1 for k in kernel) and set(strides) == {1} and not any(pads):
        # a 1x1 conv is a matmul: (Cout, Cin) @ (N, Cin, H*W)
        out = np.matmul(w.reshape(cout, cin), x.reshape(n, cin, -1))
    else:
        out = np.zeros((n, cout, int(np.prod(out_sp))), np.float32)
        cout_g = cout // groups
        for g in range(groups):
            xg = x[:, g * cin_g : (g + 1) * cin_g]
            wg = w[g * cout_g : (g + 1) * cout_g]
            for k in np.ndindex(*kernel):
                window = tuple(
                    slice(k[i] * d, k[i] * d + (o - 1) * s + 1, s)
                    for i, (d, o, s) in enumerate(zip(dilations, out_sp, strides, strict=True))
                )
                xs = xg[(slice(None), slice(None), *window)].reshape(n, cin_g, -1)
                out[:, g * cout_g : (g + 1) * cout_g] += np.matmul(wg[(..., *k)], xs)
    if "bias" in a:
        out = out + _f32(np.asarray(a["bias"])).reshape(1, cout, 1)
    return out.reshape(n, cout, *out_sp)


def _reshape(a: _Args):
    x = np.asarray(a["x"])
    shape = [int(s) for s in np.asarray(a["shape"]).reshape(-1)]
    # iOS17 rule (the iOS15 one is its special case): a 0 copies the dimension of x at the same
    # position counted from the right (1 if x has none), then one -1 takes what is left
    shape = [
        (x.shape[x.ndim - len(shape) + i] if x.ndim - len(shape) + i >= 0 else 1) if s == 0 else s
        for i, s in enumerate(shape)
    ]
    if shape.count(-1) > 1:
        raise a.fail(f"shape {shape} has more than one -1")
    return x.reshape(shape)


def _slice_by_index(a: _Args):
    x = np.asarray(a["x"])
    rank = x.ndim
    begin = [int(v) for v in np.asarray(a["begin"]).reshape(-1)]
    end = [int(v) for v in np.asarray(a["end"]).reshape(-1)]
    stride = list(a.const("stride", None) or [1] * rank)
    begin_mask = a.const("begin_mask", None) or [False] * rank
    end_mask = a.const("end_mask", None) or [False] * rank
    squeeze_mask = a.const("squeeze_mask", None) or [False] * rank
    if not len(begin) == len(end) == len(stride) == rank:
        raise a.fail(f"begin/end/stride lengths {len(begin)}/{len(end)}/{len(stride)} != {rank}")
    index = []
    for i in range(rank):
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        if squeeze_mask[i]:
            index.append(slice(b, None, np.iinfo(np.int32).max))  # the element at begin
        else:
            index.append(slice(b, e, stride[i]))
    out = x[tuple(index)]
    squeeze = tuple(i for i in range(rank) if squeeze_mask[i])
    return np.squeeze(out, axis=squeeze) if squeeze else out


def _slice_update(a: _Args):
    """iOS18 slice_update: a copy of x with x[begin:end:stride] = update. Runtime begin / end
    (the KV cache's position) out of x's bounds are an error, never a clipped write; masks other
    than all-False are not emitted and not implemented."""
    x, update = np.asarray(a["x"]), np.asarray(a["update"])
    rank = x.ndim
    begin = [int(v) for v in np.asarray(a["begin"]).reshape(-1)]
    end = [int(v) for v in np.asarray(a["end"]).reshape(-1)]
    stride = list(a.const("stride", None) or [1] * rank)
    for mask in ("begin_mask", "end_mask", "squeeze_mask"):
        if any(a.const(mask, None) or []):
            raise a.fail(f"{mask} is not implemented")
    if not len(begin) == len(end) == len(stride) == rank:
        raise a.fail(f"begin/end/stride lengths {len(begin)}/{len(end)}/{len(stride)} != {rank}")
    for i in range(rank):
        if not 0 <= begin[i] <= end[i] <= x.shape[i] or stride[i] != 1:
            raise a.fail(
                f"axis {i}: [{begin[i]}:{end[i]}:{stride[i]}] is outside x's {x.shape[i]} "
                "(or not a unit stride): nothing is written out of bounds"
            )
    index = tuple(slice(b, e) for b, e in zip(begin, end, strict=True))
    if x[index].shape != update.shape:
        raise a.fail(f"update {update.shape} does not fill x{list(index)} {x[index].shape}")
    out = x.copy()
    out[index] = update.astype(x.dtype)
    return out


def _concat(a: _Args):
    values = [np.asarray(v) for v in a.many("values")]
    if not values:
        raise a.fail("no values")
    axis = a.const("axis") % values[0].ndim
    if a.const("interleave", False):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _gather(a: _Args):
    x, indices = np.asarray(a["x"]), np.asarray(a["indices"])
    axis = a.const("axis", 0) % x.ndim
    if a.const("batch_dims", 0) != 0:
        raise a.fail(f"batch_dims {a.const('batch_dims')} is not implemented (0 is)")
    size = x.shape[axis]
    idx = indices.astype(np.int64)
    if a.fn.opset < 7:  # iOS15/16 accept negative indices; iOS17+ calls them out of bounds
        idx = np.where(idx < 0, idx + size, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        bad = idx[(idx < 0) | (idx >= size)].reshape(-1)[0]
        raise a.fail(f"index {bad} out of bounds for axis {axis} of size {size} (undefined)")
    return np.take(x, idx, axis=axis)


def _cast(a: _Args):
    target = a.const("dtype")
    if target not in _CAST_TARGETS:
        raise a.fail(f"cast to {target!r} is not implemented")
    return np.asarray(a["x"]).astype(_CAST_TARGETS[target])  # float -> int truncates


def _tile(a: _Args):
    x = np.asarray(a["x"])
    reps = [int(r) for r in np.asarray(a["reps"]).reshape(-1)]
    if len(reps) != x.ndim:
        raise a.fail(f"reps {reps} for rank {x.ndim}")
    return np.tile(x, reps)


def _read_state(a: _Args):
    return a.states[a.name("input")]


def _write(a: _Args, state: str, value: np.ndarray) -> None:
    current = a.states[state]
    value = np.asarray(value)
    if value.shape != current.shape or value.dtype != current.dtype:
        raise a.fail(
            f"writes {value.dtype}{value.shape} to state {state} {current.dtype}{current.shape}"
        )
    a.states[state] = value.copy()


def _write_state(a: _Args):  # the serialized form of coreml_update_state
    _write(a, a.name("input"), a["data"])


def _coreml_update_state(a: _Args):
    _write(a, a.name("state"), a["value"])
    return a.states[a.name("state")]


def _lut_to_dense(a: _Args):
    """iOS18 constexpr_lut_to_dense: lut (*blocks, palettes, vector) indexed per block."""
    if "shape" in a:
        raise a.fail("the iOS16 form (packed indices, flat lut, shape) is not implemented")
    indices, lut = np.asarray(a["indices"]), np.asarray(a["lut"])
    k = indices.ndim
    if lut.ndim != k + 2 or any(i % b for i, b in zip(indices.shape, lut.shape[:k], strict=True)):
        raise a.fail(f"lut {lut.shape} does not tile indices {indices.shape}")
    vsize = lut.shape[-1]
    block_idx = tuple(
        (np.arange(n) // (n // b)).reshape([-1 if j == i else 1 for j in range(k)])
        for i, (n, b) in enumerate(zip(indices.shape, lut.shape[:k], strict=True))
    )
    vecs = lut[(*block_idx, indices.astype(np.int64))]  # indices.shape + (vsize,)
    if vsize == 1:
        return vecs[..., 0]
    axis = a.const("vector_axis")
    if axis is None:
        raise a.fail("a vector lut needs vector_axis")
    axis %= k
    shape = list(indices.shape)
    shape[axis] *= vsize
    return np.moveaxis(vecs, -1, axis + 1).reshape(shape)


def _blockwise_shift_scale(a: _Args):
    """iOS18 constexpr_blockwise_shift_scale: scale * (data - offset), per block."""
    data, scale = np.asarray(a["data"]), np.asarray(a["scale"])
    offset = np.asarray(a["offset"]) if "offset" in a else None
    if scale.ndim != data.ndim or any(d % s for d, s in zip(data.shape, scale.shape, strict=True)):
        raise a.fail(f"scale {scale.shape} does not tile data {data.shape}")

    def expand(t: np.ndarray) -> np.ndarray:
        for ax, (d, s) in enumerate(zip(data.shape, t.shape, strict=True)):
            t = np.repeat(t, d // s, axis=ax)
        return t

    x = _f32(data)
    if offset is not None:
        x = x - expand(_f32(offset))
    return expand(_f32(scale)) * x


_OPS: dict[str, Callable[[_Args], object]] = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.true_divide),
    "equal": _binary(np.equal),
    "greater": _binary(np.greater),
    "less": _binary(np.less),
    "greater_equal": _binary(np.greater_equal),
    "less_equal": _binary(np.less_equal),
    "relu": _unary_float(lambda x: np.maximum(x, np.float32(0))),
    "sigmoid": _unary_float(_sigmoid),
    "silu": _unary_float(lambda x: x * _sigmoid(x)),
    "tanh": _unary_float(np.tanh),
    "exp": _unary_float(np.exp),
    "softplus": _unary_float(lambda x: np.logaddexp(np.float32(0), x)),
    "gelu": _gelu,
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_argmax": _reduce_argmax,
    "matmul": _matmul,
    "conv": _conv,
    "reshape": _reshape,
    "transpose": lambda a: np.transpose(np.asarray(a["x"]), a.const("perm")),
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "concat": _concat,
    "gather": _gather,
    "cast": _cast,
    "tile": _tile,
    "identity": lambda a: a["x"],
    "read_state": _read_state,
    "write_state": _write_state,
    "coreml_update_state": _coreml_update_state,
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
}

IMPLEMENTED_OPS = frozenset({"const", *_OPS})


class ChainProgram:
    """A parts folder on the reference executor, with the interface of one program:
    ``run(function, inputs, states)`` runs every part in order, wiring each part's inputs
    from the model inputs or from an earlier part's outputs.

    Opening it validates the manifest, checks every part against its sha256, and checks that
    each part's program declares what the manifest says.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        check_parts(self.folder, self.manifest)
        self.parts = []
        for p in self.manifest["parts"]:
            program = load_package(self.folder / p["file"])
            check_part_program(self.folder / MANIFEST, p, program, self.manifest["functions"])
            self.parts.append((program, p))
        # validated with the manifest: each part's functions, as signatures
        self.signatures = [
            {fn: Signature.from_dict(io) for fn, io in p["functions"].items()}
            for _, p in self.parts
        ]

    @property
    def functions(self) -> list[str]:
        return list(self.manifest["functions"])

    def signature(self, function: str) -> Signature:
        """The chain as one function: the model inputs the parts read, the outputs no later part
        reads (the logits), every part's states."""
        inputs: dict[str, Input] = {}
        for sig in self.signatures:
            for i in sig[function].inputs:
                if i.source is not None and i.source.model is not None:
                    inputs.setdefault(i.source.model, dataclasses.replace(i, source=None))
        final = {(o["name"], i) for i, o in self._final(function)}
        return Signature(
            inputs=tuple(inputs.values()),
            outputs=tuple(
                o
                for i, sig in enumerate(self.signatures)
                for o in sig[function].outputs
                if (o.name, i) in final
            ),
            states=tuple(s for sig in self.signatures for s in sig[function].states),
        )

    def _final(self, function: str) -> list[tuple[int, dict]]:
        read = {
            (inp["from"]["part"], inp["from"]["output"])
            for _, p in self.parts
            for inp in p["functions"][function]["inputs"]
            if "part" in inp["from"]
        }
        return [
            (i, o)
            for i, (_, p) in enumerate(self.parts)
            for o in p["functions"][function]["outputs"]
            if (i, o["name"]) not in read
        ]

    def final_outputs(self, function: str) -> list[dict]:
        """The outputs no later part reads (the logits), in part order."""
        return [o for _, o in self._final(function)]

    def states(self, function: str) -> list[dict]:
        return [s for _, p in self.parts for s in p["functions"][function]["states"]]

    def zero_states(self, function: str) -> dict[str, np.ndarray]:
        """Zeroed states the parts hold (carried ones are inputs)."""
        return {
            s["name"]: np.zeros(s["shape"], np.float16)
            for s in self.states(function)
            if not s.get("carried")
        }

    def run(self, function: str, inputs: dict, states: dict | None = None):
        states = states or {}
        produced: list[dict] = []
        new_states: dict = {}
        final_carried: set[str] = set()
        for program, part in self.parts:
            io = part["functions"][function]
            feeds = {}
            for inp in io["inputs"]:
                src = inp["from"]
                if "model" in src:
                    feeds[inp["name"]] = inputs[src["model"]]
                else:
                    feeds[inp["name"]] = produced[src["part"]][src["output"]]
            held = [s for s in io["states"] if not s.get("carried")]
            # a carried state is the part's input, its new value the part's output
            final_carried.update(
                f"{s['name']}{CARRIED_SUFFIX}" for s in io["states"] if s.get("carried")
            )
            for s in io["states"]:
                if s.get("carried"):
                    feeds[s["name"]] = inputs[s["name"]]
            mine = {s["name"]: states[s["name"]] for s in held if s["name"] in states}
            outs, new = program.run(function, feeds, mine)
            produced.append(outs)
            new_states.update(new)
        final = {o["name"] for o in self.final_outputs(function)} | final_carried
        return {k: v for outs in produced for k, v in outs.items() if k in final}, new_states
