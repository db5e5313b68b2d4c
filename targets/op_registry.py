"""The op registry: how each fx op of a lowered graph becomes Core ML (MIL) ops.

One translator per op overload in :data:`TRANSLATORS`, as coremltools' torch frontend and the
reference executor (``coreml_exec._OPS``) keep theirs; the emitter (targets/coreml.py) looks
every call_function node up here. A translator receives a :class:`Call`: the node's arguments
bound by name to the op's schema (defaults filled in), the MIL builder and the name the MIL op
gets. It translates what it reads and refuses, with an :class:`AnefxGraphError` naming the node,
its op and its source module, every value it cannot express. After it returns, an argument it
did not read must still hold the schema's default, else the call is refused too: an argument
is never dropped silently. An op without an entry, an unknown kwarg and a runtime value where
Core ML needs a constant are refused the same way.

The checker may not import targets/, so core/ops.py lists the same ops (``EMITTABLE``):
a lowered graph holding another op is a checker error (``unsupported_op``) before conversion
starts. tests/test_op_registry.py holds the two lists equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import torch
import torch.fx as fx

from anefx.core.annotations import MODULE
from anefx.core.ops import KV_WRITE, LAYER_NORM
from anefx.errors import AnefxGraphError

aten = torch.ops.aten

__all__ = ["MIL_DTYPES", "TRANSLATORS", "Call", "Emitter", "refusal", "translate"]


class Emitter(Protocol):
    """What a translator uses of the emitter (targets/coreml.py ``_Emitter``)."""

    mb: Any  # coremltools' MIL Builder
    env: dict[fx.Node, Any]  # node -> its MIL value (None: a transpose folded into a matmul)
    shared: dict  # values computed once per function for several ops (kv_write's begin)

    def scalar(self, x: Any, like_dtype: torch.dtype | None = None) -> Any: ...

    # a state's rows written in place (the packed Core ML state); None: CACHE is no state
    def write_state_rows(self, c: Any, cache: fx.Node, rows: Any, begin: Any) -> Any | None: ...


# torch dtype -> the MIL dtype the emitter gives a tensor of it: every float is fp16 in the
# package, every integer int32 (Core ML has no int64 tensors; ids and positions fit int32)
MIL_DTYPES = {
    torch.float16: "fp16",
    torch.float32: "fp16",
    torch.int32: "int32",
    torch.int64: "int32",
    torch.bool: "bool",
}
_INT32 = np.iinfo(np.int32)


def refusal(node: fx.Node, why: str) -> AnefxGraphError:
    """The error for a node the emitter cannot translate: its name, op and source module."""
    module = node.meta.get(MODULE) or "?"
    return AnefxGraphError(f"cannot emit node {node.name} ({node.target}) from {module}: {why}")


def _tensor_typed(arg: torch.Argument) -> bool:
    """A schema argument that takes tensors (Tensor, Tensor?, Tensor[])."""
    return "Tensor" in str(arg.type)


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (list, tuple)) and any(_has_node(v) for v in value)


def _plain(value: Any) -> Any:
    """VALUE with tuples as lists, to compare with a schema default."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _bind(node: fx.Node) -> tuple[dict[str, Any], dict[str, Any]]:
    """NODE's arguments by schema name (defaults filled in), and the schema's defaults."""
    schema = node.target._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(node.args) > len(positional):
        raise refusal(
            node, f"{len(node.args)} positional arguments; {schema.name} takes {len(positional)}"
        )
    params = {a.name: v for a, v in zip(positional, node.args, strict=False)}
    known = {a.name for a in schema.arguments}
    for key, value in node.kwargs.items():
        if key not in known:
            raise refusal(node, f"unknown kwarg {key}={value!r}")
        if key in params:
            raise refusal(node, f"argument {key} given twice")
        params[key] = value
    defaults = {}
    for a in schema.arguments:
        if a.has_default_value():
            defaults[a.name] = a.default_value
            params.setdefault(a.name, a.default_value)
        elif a.name not in params:
            raise refusal(node, f"argument {a.name} is missing")
        if not _tensor_typed(a) and _has_node(params[a.name]):
            raise refusal(
                node, f"{a.name} is a value computed in the graph; Core ML needs a constant there"
            )
    return params, defaults


class Call:
    """One call_function node as its translator sees it: arguments by schema name, the result's
    meta tensor (``out``), the builder (``mb``) and the MIL op's name (``name``)."""

    def __init__(self, emitter: Emitter, node: fx.Node, name: str) -> None:
        self.emitter, self.mb, self.node, self.name = emitter, emitter.mb, node, name
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            raise refusal(node, "no propagated result (meta['val']): run shape propagation")
        if not all(isinstance(s, int) for s in out.shape):
            raise refusal(node, f"symbolic result shape {tuple(out.shape)}")
        if out.dtype not in MIL_DTYPES:
            raise refusal(node, f"result dtype {out.dtype} has no Core ML form here")
        self.out: torch.Tensor = out
        self.params, self.defaults = _bind(node)
        self.read: set[str] = set()

    def refuse(self, why: str) -> AnefxGraphError:
        return refusal(self.node, why)

    def __getitem__(self, param: str) -> Any:
        self.read.add(param)
        return self.params[param]

    def node_of(self, param: str) -> fx.Node:
        """The graph node PARAM holds (refused when it holds a Python value)."""
        value = self[param]
        if not isinstance(value, fx.Node):
            raise self.refuse(f"{param} is {value!r}, not a tensor of the graph")
        return value

    def tensor(self, param: str) -> Any:
        """PARAM's MIL value; PARAM must hold a tensor of the graph."""
        return self.emitter.env[self.node_of(param)]

    def meta(self, param: str) -> torch.Tensor:
        """The propagated meta tensor of a tensor argument."""
        return _meta_of(self, self.node_of(param))

    def float_tensor(self, param: str) -> Any:
        """PARAM's MIL value; PARAM must be a floating tensor (the op is fp16 in Core ML)."""
        dtype = self.meta(param).dtype
        if MIL_DTYPES.get(dtype) != "fp16":
            raise self.refuse(f"{param} is {dtype}; the Core ML op takes fp16")
        return self.tensor(param)

    def operand(self, param: str, like: torch.dtype) -> Any:
        """PARAM as a binary op's operand: its MIL value, or a Python scalar as a const of the
        tensor operand's dtype LIKE (as torch gives a wrapped scalar the tensor's type)."""
        value = self[param]
        if isinstance(value, fx.Node):
            return self.emitter.env[value]
        if not isinstance(value, (bool, int, float)):
            raise self.refuse(f"{param} is {value!r}, neither a tensor nor a number")
        if isinstance(value, int) and not isinstance(value, bool):
            if MIL_DTYPES.get(like) == "int32" and not _INT32.min <= value <= _INT32.max:
                raise self.refuse(f"{param}={value} does not fit int32")
        with np.errstate(over="ignore"):  # an overflow is refused below, not warned about
            scalar = self.emitter.scalar(value, like)
        if isinstance(scalar, np.floating) and math.isfinite(value) and not np.isfinite(scalar):
            raise self.refuse(f"{param}={value} overflows fp16")
        return scalar

    def accept(self, *params: str) -> None:
        """Mark PARAMS translated by what the translator writes anyway (their effect is in the
        result's shape, or they have none at inference)."""
        for param in params:
            self[param]

    def only(self, param: str, allowed: Iterable[Any], why: str) -> Any:
        """PARAM's value, refused (with WHY) unless it equals one of ALLOWED."""
        value = self[param]
        if not any(_plain(value) == _plain(a) for a in allowed):
            raise self.refuse(f"{param}={value!r} is not translated ({why})")
        return value

    def check_unread(self) -> None:
        """Refuse the call if an argument the translator did not read is not its default."""
        for param, value in self.params.items():
            if param in self.read:
                continue
            if param not in self.defaults or _plain(value) != _plain(self.defaults[param]):
                raise self.refuse(f"argument {param}={value!r} is not translated")


def _meta_of(call: Call, node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise call.refuse(f"input {node.name} has no propagated shape")
    return val


def _mil_dtype(call: Call, value: Any) -> str:
    """The MIL dtype of an operand: a node's (mapped) dtype, or a scalar const's."""
    if isinstance(value, fx.Node):
        dtype = _meta_of(call, value).dtype
        if dtype not in MIL_DTYPES:
            raise call.refuse(f"input {value.name} is {dtype}, which has no Core ML form here")
        return MIL_DTYPES[dtype]
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    return "fp16" if isinstance(value, np.floating) else "int32"


def translate(emitter: Emitter, node: fx.Node, name: str) -> Any:
    """NODE's MIL value, made with its entry in :data:`TRANSLATORS` (None for a transpose
    folded into the matmuls that read it)."""
    translator = TRANSLATORS.get(node.target)
    if translator is None:
        raise refusal(node, "no Core ML translation for this op")
    call = Call(emitter, node, name)
    result = translator(call)
    call.check_unread()
    return result


# ---------------------------------------------------------------------------------------------
# data movement


def _reshape(c: Call) -> Any:
    # the requested shape (maybe with a -1) is the result's, resolved: write that
    c.accept("shape" if "shape" in c.params else "size")
    return c.mb.reshape(x=c.tensor("self"), shape=list(c.out.shape), name=c.name)


def _permute(c: Call) -> Any:
    rank = c.meta("self").dim()
    dims = c["dims"]
    perm = [d % rank for d in dims] if rank else list(dims)
    if sorted(perm) != list(range(rank)):
        raise c.refuse(f"dims {list(dims)} is not a permutation of {rank} axes")
    return c.mb.transpose(x=c.tensor("self"), perm=perm, name=c.name)


def _swaps_last_two(c: Call) -> tuple[int, int, bool]:
    """(dim0, dim1) of a transpose.int, non-negative, and whether they are the last two axes
    (the transpose matmul's transpose_x / transpose_y flags mean)."""
    rank = c.meta("self").dim()
    i, j = c["dim0"] % max(rank, 1), c["dim1"] % max(rank, 1)
    return i, j, rank >= 2 and {i, j} == {rank - 2, rank - 1}


def _transpose(c: Call) -> Any:
    i, j, last_two = _swaps_last_two(c)
    if last_two and all(u.target is aten.matmul.default for u in c.node.users):
        return None  # folded into matmul's transpose_x / transpose_y
    perm = list(range(c.meta("self").dim()))
    perm[i], perm[j] = perm[j], perm[i]
    return c.mb.transpose(x=c.tensor("self"), perm=perm, name=c.name)


def _cat(c: Call) -> Any:
    tensors = c["tensors"]
    rank = c.out.dim()
    axis = c["dim"] % rank
    want = MIL_DTYPES[c.out.dtype]
    for t in tensors:
        if not isinstance(t, fx.Node):
            raise c.refuse(f"tensors holds {t!r}, not a tensor of the graph")
        val = _meta_of(c, t)
        if val.dim() != rank:  # torch skips a legacy empty 1-D input; Core ML would not
            raise c.refuse(f"input {t.name} has rank {val.dim()}, the result {rank}")
        if _mil_dtype(c, t) != want:
            raise c.refuse(f"input {t.name} is {val.dtype}; Core ML's concat does not promote")
    return c.mb.concat(values=[c.emitter.env[t] for t in tensors], axis=axis, name=c.name)


def _slice(c: Call) -> Any:
    src = c.meta("self")
    rank = src.dim()
    dim = c["dim"] % rank
    start, end, step = c["start"], c["end"], c["step"]
    size = src.shape[dim]
    if not isinstance(step, int) or step < 1:
        raise c.refuse(f"step {step!r}: slice_by_index is written for a positive step")
    start = 0 if start is None else start
    end = size if end is None else end
    start, end = (
        max(0, min(start + size if start < 0 else start, size)),
        max(0, min(end + size if end < 0 else end, size)),
    )
    if end <= start:
        raise c.refuse(f"an empty slice [{start}:{end}] of axis {dim}: Core ML has no empty tensor")
    begin = [0] * rank
    stop = list(src.shape)
    stride = [1] * rank
    begin[dim], stop[dim], stride[dim] = start, end, step
    return c.mb.slice_by_index(
        x=c.tensor("self"), begin=begin, end=stop, stride=stride, name=c.name
    )


def _kv_write(c: Call) -> Any:
    """anefx::kv_write(cache, rows, positions): ROWS (.., S) written along the cache's last axis
    from the first position: MIL slice_update, begin [0, .., 0, p] with p read from POSITIONS
    at run time. Into a state the emitter writes the packed state's row in place."""
    cache, rows = c.meta("cache"), c.meta("rows")
    if rows.dim() != cache.dim() or tuple(rows.shape[:-1]) != tuple(cache.shape[:-1]):
        raise c.refuse(f"rows {tuple(rows.shape)} do not match cache {tuple(cache.shape)}")
    if cache.dtype != rows.dtype and MIL_DTYPES[cache.dtype] != MIL_DTYPES[rows.dtype]:
        raise c.refuse(f"rows {rows.dtype} into a {cache.dtype} cache")
    positions = c.meta("positions")
    if MIL_DTYPES.get(positions.dtype) != "int32" or positions.numel() < 1:
        raise c.refuse(f"positions {positions.dtype}{tuple(positions.shape)}: int ids expected")
    mb = c.mb
    # begin [0, .., 0, p]: the rows land at the first token's slot of the last axis; computed
    # once per positions input and rank, shared by every layer's writes
    key = ("kv_write_begin", c.node_of("positions"), cache.dim())
    begin = c.emitter.shared.get(key)
    if begin is None:
        flat = mb.reshape(x=c.tensor("positions"), shape=[-1], name=f"{c.name}_positions")
        first = mb.slice_by_index(x=flat, begin=[0], end=[1], name=f"{c.name}_first")
        lead = np.zeros(cache.dim() - 1, np.int32)
        begin = c.emitter.shared[key] = mb.concat(
            values=[lead, first], axis=0, name=f"{c.name}_begin"
        )
    state = c.emitter.write_state_rows(c, c.node_of("cache"), c.tensor("rows"), begin)
    if state is not None:
        return state
    end = mb.add(x=begin, y=np.array(rows.shape, np.int32), name=f"{c.name}_end")
    return mb.slice_update(
        x=c.tensor("cache"), update=c.tensor("rows"), begin=begin, end=end, name=c.name
    )


def _expand(c: Call) -> Any:
    src = c.meta("self").shape
    # the requested size (maybe with -1s) is the result's, resolved: tile to that; implicit
    # marks an expand autograd inserted, the value is the same
    c.accept("size", "implicit")
    if len(src) != c.out.dim():
        raise c.refuse(f"expand adds leading axes ({tuple(src)} -> {tuple(c.out.shape)})")
    reps = [int(o // i) if i == 1 else 1 for i, o in zip(src, c.out.shape, strict=True)]
    return c.mb.tile(x=c.tensor("self"), reps=reps, name=c.name)


def _embedding(c: Call) -> Any:
    if c.meta("weight").dim() != 2:
        raise c.refuse(f"weight of rank {c.meta('weight').dim()}; an embedding table is 2-D")
    if MIL_DTYPES.get(c.meta("indices").dtype) != "int32":
        raise c.refuse(f"indices are {c.meta('indices').dtype}, not integers")
    # padding_idx, scale_grad_by_freq and sparse change only the gradient: the lookup is the same
    c.accept("padding_idx", "scale_grad_by_freq", "sparse")
    return c.mb.gather(x=c.tensor("weight"), indices=c.tensor("indices"), axis=0, name=c.name)


# _to_copy's dtype -> the cast's target (fp32 is fp16 in the package, as every float)
_CASTS = {torch.float16: "fp16", torch.float32: "fp16", torch.int32: "int32", torch.bool: "bool"}


def _device_type(device: Any) -> str | None:
    return None if device is None else torch.device(device).type


def _to_copy(c: Call) -> Any:
    dtype = c["dtype"]
    if dtype not in _CASTS:
        why = "a copy without a dtype change" if dtype is None else f"a cast to {dtype}"
        raise c.refuse(f"dtype={dtype}: {why} is not translated (fp16, fp32, int32, bool are)")
    # what a capture on the CPU (or meta) writes; anything else asks for a placement or a
    # memory layout a Core ML program has no word for
    c.only("layout", [None, torch.strided], "dense tensors only")
    if _device_type(c["device"]) not in (None, "cpu", "meta"):
        raise c.refuse(f"device={c['device']!r} is not translated (cpu or meta)")
    c.only("pin_memory", [None, False], "host memory placement")
    c.accept("non_blocking")  # a scheduling hint: the value is the same
    formats = [None, torch.preserve_format, torch.contiguous_format]
    c.only("memory_format", formats, "Core ML tensors have one layout")
    return c.mb.cast(x=c.tensor("self"), dtype=_CASTS[dtype], name=c.name)


# ---------------------------------------------------------------------------------------------
# matmul, conv, norm


def _matmul(c: Call) -> Any:
    xs, flags, dtypes = [], [], []
    for param in ("self", "other"):
        operand = c.node_of(param)
        dtypes.append(_mil_dtype(c, operand))
        if operand.target is aten.transpose.int and c.emitter.env.get(operand) is None:
            # a transpose of the last two axes its translator left to this op (_transpose)
            xs.append(c.emitter.env[_bind(operand)[0]["self"]])
            flags.append(True)
        else:
            xs.append(c.emitter.env[operand])
            flags.append(False)
    if dtypes[0] != dtypes[1]:
        raise c.refuse(f"operands {dtypes[0]} and {dtypes[1]}: Core ML's matmul does not promote")
    return c.mb.matmul(x=xs[0], y=xs[1], transpose_x=flags[0], transpose_y=flags[1], name=c.name)


def _pairs(value: Any) -> list[int]:
    """A conv's int[2] argument as two ints (torch accepts one int for both axes)."""
    values = [value] if isinstance(value, int) else list(value)
    return values * 2 if len(values) == 1 else values


def _conv2d(c: Call) -> Any:
    x, weight = c.meta("input"), c.meta("weight")
    if x.dim() != 4 or weight.dim() != 4:
        raise c.refuse(
            f"input rank {x.dim()}, weight rank {weight.dim()}: only a batched "
            "(N, C, H, W) conv2d is translated"
        )
    why = "the emitter writes stride 1, no padding and dilation 1"
    for param, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
        if _pairs(c[param]) != [default, default]:
            raise c.refuse(f"{param}={c[param]!r} is not translated ({why})")
    groups = c["groups"]
    # grouped (a depthwise conv: groups = channels) as Core ML's conv takes it: each of the
    # groups reads C / groups input channels, the weight (Cout, C / groups, kh, kw)
    cin, cout = x.shape[1], weight.shape[0]
    if (
        not isinstance(groups, int)
        or groups < 1
        or cin % groups
        or cout % groups
        or weight.shape[1] * groups != cin
    ):
        raise c.refuse(
            f"groups={groups!r} does not fit input channels {cin} and weight {tuple(weight.shape)}"
        )
    kwargs = {
        "x": c.tensor("input"),
        "weight": c.tensor("weight"),
        "strides": [1, 1],
        "pad_type": "valid",
        "dilations": [1, 1],
        "groups": groups,
        "name": c.name,
    }
    if c["bias"] is not None:
        kwargs["bias"] = c.tensor("bias")
    return c.mb.conv(**kwargs)


def _layer_norm(c: Call) -> Any:
    x = c.meta("x")
    axis, eps, weight = c["axis"] % x.dim(), c["eps"], c["weight"]
    if eps > 0 and not np.float16(eps) > 0:  # the fp16 epsilon would be 0 or negative
        raise c.refuse(f"eps={eps} is 0 in fp16")
    kwargs = {
        "x": c.float_tensor("x"),
        "axes": [axis],
        "epsilon": np.float16(eps),
        "name": c.name,
    }
    if weight is not None:
        if tuple(c.meta("weight").shape) != (x.shape[axis],):
            raise c.refuse(f"weight {tuple(c.meta('weight').shape)} for axis {axis} of {x.shape}")
        kwargs["gamma"] = c.tensor("weight")
    return c.mb.layer_norm(**kwargs)


# ---------------------------------------------------------------------------------------------
# elementwise


def _binary(mil_op: str, compare: bool = False) -> Callable[[Call], Any]:
    """A binary op (x OP y) as the MIL op MIL_OP; COMPARE: its result is bool."""

    def translate_binary(c: Call) -> Any:
        if "alpha" in c.params:
            c.only("alpha", [1], "other * alpha")
        raw = (c["self"], c["other"])
        # a Python scalar takes the dtype of the tensor operand, as in torch
        like = next((_meta_of(c, v).dtype for v in raw if isinstance(v, fx.Node)), c.out.dtype)
        x, y = c.operand("self", like), c.operand("other", like)
        dx, dy = (
            _mil_dtype(c, r if isinstance(r, fx.Node) else made)
            for r, made in zip(raw, (x, y), strict=True)
        )
        result = MIL_DTYPES[c.out.dtype]
        if dx != dy or (not compare and (result != dx or dx == "bool")):
            raise c.refuse(
                f"operands {dx} and {dy}, result {result}: Core ML's {mil_op} does not promote"
            )
        return getattr(c.mb, mil_op)(x=x, y=y, name=c.name)

    return translate_binary


def _rsub(c: Call) -> Any:  # other - self
    c.only("alpha", [1], "self * alpha")
    x = c.node_of("self")
    other = c.operand("other", c.out.dtype)
    if _mil_dtype(c, other) != _mil_dtype(c, x) or MIL_DTYPES[c.out.dtype] != _mil_dtype(c, x):
        raise c.refuse(f"other={c['other']!r} and a {_meta_of(c, x).dtype} input do not agree")
    return c.mb.sub(x=other, y=c.tensor("self"), name=c.name)


def _neg(c: Call) -> Any:
    x = c.tensor("self")
    if MIL_DTYPES[c.out.dtype] == "bool":
        raise c.refuse("negation of a bool tensor")
    return c.mb.mul(x=x, y=c.emitter.scalar(-1, c.out.dtype), name=c.name)


def _unary(mil_op: str) -> Callable[[Call], Any]:
    def translate_unary(c: Call) -> Any:
        return getattr(c.mb, mil_op)(x=c.float_tensor("self"), name=c.name)

    return translate_unary


def _softplus(c: Call) -> Any:
    """log(1 + exp(x)): Core ML's softplus. torch's threshold (linear above it) differs from it
    by at most exp(-threshold), below fp16's resolution for the default 20."""
    c.only("beta", [1], "Core ML's softplus has no beta")
    c.only("threshold", [20], "Core ML's softplus has no threshold; the default 20 is exact")
    return c.mb.softplus(x=c.float_tensor("self"), name=c.name)


def _gelu(c: Call) -> Any:
    approximate = c.only("approximate", ["none", "tanh"], "Core ML's gelu modes")
    mode = "TANH_APPROXIMATION" if approximate == "tanh" else "EXACT"
    return c.mb.gelu(x=c.float_tensor("self"), mode=mode, name=c.name)


def _softmax(c: Call) -> Any:
    if "dtype" in c.params:
        c.only("dtype", [None], "a softmax computed in another dtype")
    else:
        c.only("half_to_float", [False], "a softmax computed in fp32")
    return c.mb.softmax(x=c.float_tensor("self"), axis=c["dim"] % c.out.dim(), name=c.name)


# ---------------------------------------------------------------------------------------------
# reductions


def _axes(c: Call, dims: Any) -> list[int]:
    rank = c.meta("self").dim()
    dims = [dims] if isinstance(dims, int) else dims
    if not dims:
        raise c.refuse(f"dim={dims!r}: a reduction over every axis is not translated")
    return [d % rank for d in dims]


def _sum(c: Call) -> Any:
    src = c.meta("self").dtype
    axes, keep, dtype = _axes(c, c["dim"]), c["keepdim"], c["dtype"]
    if dtype is not None and MIL_DTYPES.get(dtype) != MIL_DTYPES.get(src):
        raise c.refuse(f"dtype={dtype} would cast the {src} input: not translated")
    if MIL_DTYPES[c.out.dtype] != MIL_DTYPES.get(src):
        raise c.refuse(f"a {src} sum gives {c.out.dtype}: Core ML's reduce_sum keeps the dtype")
    return c.mb.reduce_sum(x=c.tensor("self"), axes=axes, keep_dims=bool(keep), name=c.name)


def _amax(c: Call) -> Any:
    axes, keep = _axes(c, c["dim"]), c["keepdim"]
    return c.mb.reduce_max(x=c.tensor("self"), axes=axes, keep_dims=bool(keep), name=c.name)


def _argmax(c: Call) -> Any:
    dim = c["dim"]
    if dim is None:
        raise c.refuse("dim=None: the argmax of the flattened tensor is not translated")
    return c.mb.reduce_argmax(
        x=c.tensor("self"),
        axis=dim % c.meta("self").dim(),
        keep_dims=bool(c["keepdim"]),
        output_dtype="int32",
        name=c.name,
    )


TRANSLATORS: dict[torch._ops.OpOverload, Callable[[Call], Any]] = {
    aten.reshape.default: _reshape,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.cat.default: _cat,
    aten.slice.Tensor: _slice,
    aten.expand.default: _expand,
    aten.embedding.default: _embedding,
    aten._to_copy.default: _to_copy,
    aten.matmul.default: _matmul,
    aten.conv2d.default: _conv2d,
    LAYER_NORM: _layer_norm,
    KV_WRITE: _kv_write,
    aten.add.Tensor: _binary("add"),
    aten.sub.Tensor: _binary("sub"),
    aten.mul.Tensor: _binary("mul"),
    aten.div.Tensor: _binary("real_div"),
    aten.eq.Tensor: _binary("equal", compare=True),
    aten.gt.Tensor: _binary("greater", compare=True),
    aten.gt.Scalar: _binary("greater", compare=True),
    aten.lt.Tensor: _binary("less", compare=True),
    aten.lt.Scalar: _binary("less", compare=True),
    aten.ge.Scalar: _binary("greater_equal", compare=True),
    aten.le.Scalar: _binary("less_equal", compare=True),
    aten.rsub.Scalar: _rsub,
    aten.neg.default: _neg,
    aten.silu.default: _unary("silu"),
    aten.sigmoid.default: _unary("sigmoid"),
    aten.relu.default: _unary("relu"),
    aten.tanh.default: _unary("tanh"),
    aten.exp.default: _unary("exp"),
    aten.softplus.default: _softplus,
    aten.gelu.default: _gelu,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.sum.dim_IntList: _sum,
    aten.amax.default: _amax,
    aten.argmax.default: _argmax,
}
"""fx op overload -> its translator; core/ops.py ``EMITTABLE`` names the same ops."""
