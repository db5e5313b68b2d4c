"""Carry the (B, C, 1, S) layout through the decoder instead of permuting around every conv.

    before: conv(1,Co,1,S) -> permute -> reshape(1,S,H,D) -> norm(-1) -> transpose(1,2) -> ...
    after:  conv(1,Co,1,S) -> reshape(1,H,D,S) -> norm(axis 2) -> ... -> reshape(1,C,1,S) -> conv
Left per decoder layer: 0 transposes, 8 reshapes (q, k, v to heads; q, k into the grouped-head
batch matmul broadcasts over; scores to (1,H,S,S) for the mask and back; output to (1,H*D,1,S)).
Why each is needed: docs/pipeline.md, section 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from anefx.core.annotations import MODULE, MODULE_CLASS, PROVENANCE
from anefx.core.ops import LAYER_NORM
from anefx.core.pass_registry import register_pass
from anefx.core.signature import AxisMap, has_signature, set_axis_map, signature_of
from anefx.passes._util import (
    PassResult,
    aten,
    const_value,
    is_op,
    keep_unlowered,
    mark_unlowered,
    recompile,
    shape_of,
    unlowered,
)

_ELEMENTWISE = (
    aten.add,
    aten.sub,
    aten.mul,
    aten.div,
    aten.neg,
    aten.silu,
    aten.sigmoid,
    aten.exp,
    aten.softplus,
    aten.tanh,
    aten.relu,
    aten.gelu,
    aten.rsqrt,
    aten.sqrt,
    aten.eq,
    aten.ne,
    aten.lt,
    aten.gt,
    aten.le,
    aten.ge,
    aten.where,
    aten.abs,
    aten.reciprocal,
    aten.pow,
    aten._to_copy,
    aten.maximum,
    aten.minimum,
    aten.clamp,
)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze)
_REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin)


def _sequence_axes(gm: fx.GraphModule) -> dict[str, frozenset]:
    """Placeholder name -> its axes that run along the tokens of the call ("S" in the
    signature's layout of that input; a state's context axis "T" is not one)."""
    if not has_signature(gm):
        return {}
    sig = signature_of(gm)
    return {
        i.name: frozenset(a for a, name in enumerate(i.axes) if name == "S") for i in sig.inputs
    }


@dataclass(frozen=True)
class Layout:
    """A logical tensor held as ``node`` (physical shape ``pshape``).

    ``dims[i]`` is the physical axis of logical axis i; None only for logical size-1 axes.
    Physical axes that no logical axis maps to have size 1.
    """

    node: fx.Node
    pshape: tuple[int, ...]
    dims: tuple[int | None, ...]
    shape: tuple[int, ...]
    # logical axes that carry the token sequence: the (B, C, 1, S) layout wants them last
    seq: frozenset = frozenset()

    @staticmethod
    def identity(node: fx.Node, shape: tuple[int, ...], seq=frozenset()) -> Layout:
        return Layout(node, tuple(shape), tuple(range(len(shape))), tuple(shape), frozenset(seq))


class _Sweep:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.g = fx.Graph()
        self.env: dict[fx.Node, object] = {}
        self.like: fx.Node | None = None
        self.changed = False
        self._consts: dict = {}

    # -- emission helpers ---------------------------------------------------------------
    def call(self, target, args, kwargs=None, fresh: bool = False) -> fx.Node:
        """Emit a node; FRESH marks a layout change this pass adds (not a re-emitted op)."""
        node = self.g.call_function(target, args, kwargs or {})
        if self.like is not None:
            for key in PROVENANCE:
                if key in self.like.meta:
                    node.meta[key] = self.like.meta[key]
            if not fresh:
                node.meta["anefx_pass"] = self.like.meta.get("anefx_pass")
                # the op re-emitted: a pass's report that it left it stays with it
                keep_unlowered(self.like, node)
        return node

    def const(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        name = f"_anefx_{hint}_{len(self._consts)}"
        while hasattr(self.gm, name):
            name += "_"
        self.gm.register_buffer(name, tensor.contiguous(), persistent=False)
        node = self.g.get_attr(name)
        if self.like is not None:
            for key in (MODULE, MODULE_CLASS):
                if key in self.like.meta:
                    node.meta[key] = self.like.meta[key]
        self._consts[name] = node
        return node

    def relayout(self, lay: Layout, target: dict[int, int], pshape: tuple[int, ...]) -> fx.Node:
        """Physical tensor for LAY with logical axis i at physical axis target[i]."""
        moved = [lay.dims[i] for i in sorted(target, key=lambda i: target[i])]
        # size-1 axes first: the last axis stays a real one (the ANE pads it to 64 bytes)
        rest = [a for a in range(len(lay.pshape)) if a not in moved]
        perm = rest + moved
        node, shape = lay.node, lay.pshape
        tensor = const_value(self.gm, node) if node.op == "get_attr" else None
        nonunit = [a for a in range(len(shape)) if shape[a] != 1]
        # moving only size-1 axes moves no data: that is a reshape, not a permute
        if [a for a in perm if shape[a] != 1] == nonunit:
            perm = list(range(len(perm)))
        identity = list(range(len(perm)))
        if perm != identity:
            shape = tuple(shape[a] for a in perm)
            if tensor is not None:
                tensor = tensor.permute(perm)
            else:
                node = self.call(aten.permute.default, (node, perm), fresh=True)
                self.changed = True
        if tuple(pshape) != tuple(shape):
            if tensor is not None:
                tensor = tensor.reshape(pshape)
            else:
                node = self.call(aten.reshape.default, (node, list(pshape)), fresh=True)
                self.changed = True
        if tensor is not None and (perm != identity or tuple(pshape) != tuple(lay.pshape)):
            node = self.const(tensor, "relayout")
        return node

    def materialize(self, lay: Layout | fx.Node) -> fx.Node:
        if not isinstance(lay, Layout):  # a value the sweep left in its own layout
            return lay
        if lay.dims == tuple(range(len(lay.shape))) and lay.pshape == lay.shape:
            return lay.node
        target = {i: i for i, s in enumerate(lay.shape) if s != 1}
        return self.relayout(lay, target, lay.shape)

    def to_frame(self, arg, ref: Layout) -> fx.Node | object | None:
        """ARG (a Layout or scalar) as a physical tensor broadcasting against REF's frame."""
        if not isinstance(arg, Layout):
            return arg
        off = len(ref.shape) - len(arg.shape)
        if off < 0:
            return None
        target: dict[int, int] = {}
        pshape = [1] * len(ref.pshape)
        for i, s in enumerate(arg.shape):
            if s == 1:
                continue
            axis = ref.dims[i + off]
            if axis is None:
                return None
            target[i] = axis
            pshape[axis] = s
        if len(arg.pshape) == len(pshape) and all(arg.dims[i] == a for i, a in target.items()):
            if tuple(arg.pshape) == tuple(pshape):
                return arg.node
        return self.relayout(arg, target, tuple(pshape))

    # -- op rules -----------------------------------------------------------------------
    def fallback(self, node: fx.Node) -> Layout | fx.Node:
        def conv(a):
            return self.materialize(a) if isinstance(a, Layout) else a

        args = fx.node.map_aggregate(node.args, lambda a: conv(self._lookup(a)))
        kwargs = fx.node.map_aggregate(node.kwargs, lambda a: conv(self._lookup(a)))
        new = self.call(node.target, args, kwargs)
        shape = shape_of(node)
        return Layout.identity(new, shape) if shape is not None else new

    def _lookup(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def elementwise(self, node: fx.Node):
        out = shape_of(node)
        args = [self._lookup(a) for a in node.args]
        lays = [a for a in args if isinstance(a, Layout)]
        cands = [a for a in lays if a.shape == out]
        if not cands:
            return self.fallback(node)
        # prefer a computed operand already in a non-trivial layout over a constant
        cands.sort(key=lambda a: (a.node.op == "get_attr", a.dims == tuple(range(len(a.dims)))))
        ref = cands[0]
        mapped = []
        for a in args:
            m = self.to_frame(a, ref) if isinstance(a, Layout) else a
            if m is None:
                return self.fallback(node)
            mapped.append(m)
        new = self.call(node.target, tuple(mapped), dict(node.kwargs))
        seq = set()
        for a in lays:
            off = len(out) - len(a.shape)
            seq |= {i + off for i in a.seq if a.shape[i] != 1}
        return Layout(new, ref.pshape, ref.dims, out, frozenset(seq))

    def axis_op(self, node: fx.Node, axis_pos: int):
        lay = self._lookup(node.args[0])
        out = shape_of(node)
        axis = node.args[axis_pos] % len(lay.shape)
        phys = lay.dims[axis]
        if phys is None:
            return self.fallback(node)
        args = list(node.args)
        args[0] = lay.node
        args[axis_pos] = phys
        for i, a in enumerate(args):
            if i != 0 and isinstance(a, fx.Node):
                args[i] = self.materialize(self._lookup(a))
        new = self.call(node.target, tuple(args), dict(node.kwargs))
        pshape = list(lay.pshape)
        pshape[phys] = out[axis]
        return Layout(new, tuple(pshape), lay.dims, out, lay.seq)

    def reduction(self, node: fx.Node):
        lay = self._lookup(node.args[0])
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if not keep or len(node.args) < 2:
            return self.fallback(node)
        axes = [lay.dims[d % len(lay.shape)] for d in node.args[1]]
        if None in axes:
            return self.fallback(node)
        new = self.call(node.target, (lay.node, axes, True, *node.args[3:]), dict(node.kwargs))
        pshape = tuple(1 if i in axes else s for i, s in enumerate(lay.pshape))
        return Layout(new, pshape, lay.dims, shape_of(node), lay.seq)

    def cat(self, node: fx.Node):
        parts = [self._lookup(a) for a in node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else 0
        out = shape_of(node)
        dim %= len(out)
        ranked = sorted(
            parts, key=lambda a: (a.node.op == "get_attr", a.dims == tuple(range(len(a.dims))))
        )
        ref = ranked[0]
        if ref.dims[dim] is None or any(len(p.shape) != len(out) for p in parts):
            return self.fallback(node)
        mapped = []
        for p in parts:
            m = self.to_frame(p, ref)
            if m is None:
                return self.fallback(node)
            mapped.append(m)
        axis = ref.dims[dim]
        new = self.call(node.target, (mapped, axis))
        pshape = list(ref.pshape)
        pshape[axis] = out[dim]
        return Layout(new, tuple(pshape), ref.dims, out, frozenset().union(*(p.seq for p in parts)))

    def permute(self, node: fx.Node):
        lay = self._lookup(node.args[0])
        r = len(lay.shape)
        if is_op(node, aten.transpose):
            perm = list(range(r))
            a, b = node.args[1] % r, node.args[2] % r
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = [p % r for p in node.args[1]]
        self.changed = True
        seq = frozenset(i for i, p in enumerate(perm) if p in lay.seq)
        return Layout(lay.node, lay.pshape, tuple(lay.dims[p] for p in perm), shape_of(node), seq)

    def view(self, node: fx.Node):
        lay = self._lookup(node.args[0])
        out = shape_of(node)
        res = _reshape_layout(lay, out)
        if res is None:
            return self.fallback(node)
        pshape, dims, groups = res
        new = lay.node
        if pshape != lay.pshape:
            new = self.call(aten.reshape.default, (lay.node, list(pshape)), fresh=True)
        self.changed |= node.op == "call_function"
        seq = frozenset(o for ga, gb in groups if any(d in lay.seq for d in ga) for o in gb)
        return Layout(new, pshape, dims, out, seq)

    def matmul(self, node: fx.Node):
        a, b = (self._lookup(x) for x in node.args)
        if not (isinstance(a, Layout) and isinstance(b, Layout)) or len(shape_of(node)) != 4:
            return self.fallback(node)
        if min(len(a.shape), len(b.shape)) < 2:
            return self.fallback(node)
        a, b = _lift4(a), _lift4(b)  # a shared (context, S) operand broadcasts over the heads
        a = self._batch_aligned(a)
        b = self._batch_aligned(b)
        # which of the last two physical axes holds M (of a) and N (of b)
        ta = a.dims[2] == 3  # a is physically (.., K, M)
        tb = b.dims[3] == 2  # b is physically (.., N, K)
        # a sequence axis goes last, as in (B, C, 1, S): the result is stored transposed when
        # its rows (M) run along the sequence and its columns (N) do not
        out_t = 2 in a.seq and 3 not in b.seq
        tr = lambda n: self.call(aten.transpose.int, (n, -2, -1), fresh=True)  # noqa: E731
        if not out_t:
            pa = tr(a.node) if ta else a.node
            pb = tr(b.node) if tb else b.node
            new = self.call(aten.matmul.default, (pa, pb))
        else:
            bt = b.node if tb else tr(b.node)
            at = a.node if ta else tr(a.node)
            new = self.call(aten.matmul.default, (bt, at))
        out = shape_of(node)
        batch = tuple(max(x, y) for x, y in zip(a.pshape[:2], b.pshape[:2], strict=True))
        seq = ((a.seq | b.seq) & {0, 1}) | ({2} & a.seq) | ({3} & b.seq)
        if out_t:
            return Layout(new, (*batch, out[3], out[2]), (0, 1, 3, 2), out, frozenset(seq))
        return Layout(new, (*batch, out[2], out[3]), (0, 1, 2, 3), out, frozenset(seq))

    def _batch_aligned(self, lay: Layout) -> Layout:
        ok = (
            all(lay.shape[i] == 1 and lay.pshape[i] == 1 or lay.dims[i] == i for i in (0, 1))
            and {lay.dims[2], lay.dims[3]} == {2, 3}
            and len(lay.pshape) == 4
        )
        if ok:
            return lay
        target = {i: i for i in range(4) if lay.shape[i] != 1 or i >= 2}
        # keep the physical order of the two matrix axes: then only size-1 axes move and the
        # relayout is a reshape, with matmul's transpose flag doing the rest
        d2, d3 = lay.dims[2], lay.dims[3]
        if d2 is not None and d3 is not None and d2 > d3:
            target[2], target[3] = 3, 2
        target = {i: t for i, t in target.items() if lay.shape[i] != 1 or lay.dims[i] is not None}
        pshape = [1, 1, 1, 1]
        for i, t in target.items():
            pshape[t] = lay.shape[i]
        dims = tuple(target.get(i) for i in range(4))
        node = self.relayout(lay, target, tuple(pshape))
        return Layout(node, tuple(pshape), dims, lay.shape, lay.seq)

    def conv(self, node: fx.Node):
        lay = self._lookup(node.args[0])
        canonical = len(lay.pshape) == 4 and all(
            lay.dims[i] == i or (lay.shape[i] == 1 and lay.pshape[i] == 1) for i in range(4)
        )
        x = lay.node if canonical else self.materialize(lay)
        rest = [
            self.materialize(self._lookup(a)) if isinstance(a, fx.Node) else a
            for a in node.args[1:]
        ]
        new = self.call(node.target, (x, *rest), dict(node.kwargs))
        return Layout.identity(new, shape_of(node), lay.seq - {1})

    # -- driver -------------------------------------------------------------------------
    def run(self) -> fx.Graph:
        sequence = _sequence_axes(self.gm)
        for node in self.gm.graph.nodes:
            self.like = node
            if node.op == "placeholder":
                new = self.g.placeholder(node.name)
                new.meta = {"anefx_pass": None, **node.meta}
                shape = shape_of(node)
                seq = sequence.get(node.name, frozenset())
                self.env[node] = Layout.identity(new, shape, seq) if shape is not None else new
            elif node.op == "get_attr":
                new = self.g.get_attr(node.target)
                new.meta = {"anefx_pass": None, **node.meta}
                self.env[node] = Layout.identity(new, shape_of(node))
            elif node.op == "output":
                outs = fx.node.map_aggregate(
                    node.args[0],
                    lambda a: self.materialize(self.env[a]) if isinstance(a, fx.Node) else a,
                )
                self.g.output(outs)
            else:
                self.env[node] = self.rule(node)
        self._record_layouts()
        return self.g

    def _record_layouts(self) -> None:
        """Say, on each re-emitted value held in another layout than its logical one, where its
        logical axes went (AxisMap), so later stages (diff) read it back without guessing. The
        map is that of the value the node was emitted for: views of it kept in the same
        physical tensor (the head's reshape of the final norm) come later in graph order."""
        done: set[fx.Node] = set()
        for lay in self.env.values():  # the original graph's order: a producer before its views
            if not isinstance(lay, Layout) or lay.node.op != "call_function" or lay.node in done:
                continue
            done.add(lay.node)
            if lay.pshape != lay.shape or lay.dims != tuple(range(len(lay.shape))):
                set_axis_map(lay.node, AxisMap(tuple(lay.shape), tuple(lay.dims)))

    def rule(self, node: fx.Node):
        if shape_of(node) is None or any(
            isinstance(self._lookup(a), fx.Node) and self._lookup(a).op != "get_attr"
            for a in node.all_input_nodes
            if not isinstance(self._lookup(a), Layout)
        ):
            return self.fallback(node)
        if is_op(node, aten.permute, aten.transpose):
            return self.permute(node)
        if is_op(node, *_VIEWS):
            return self.view(node)
        if is_op(node, aten._to_copy) and set(node.kwargs) - {"dtype"}:
            return self.fallback(node)
        if is_op(node, *_ELEMENTWISE):
            return self.elementwise(node)
        if is_op(node, aten.softmax, aten._softmax):
            return self.axis_op(node, 1)
        if node.target is LAYER_NORM:
            return self.axis_op(node, 2)
        if is_op(node, aten.slice):
            return self.axis_op(node, 1)
        if is_op(node, aten.cat):
            return self.cat(node)
        if is_op(node, *_REDUCTIONS):
            return self.reduction(node)
        if is_op(node, aten.matmul):
            return self.matmul(node)
        if is_op(node, aten.conv2d):
            return self.conv(node)
        if is_op(node, aten.embedding, aten.index_select):
            return self.enter(node)
        return self.fallback(node)

    def enter(self, node: fx.Node) -> Layout:
        """A row lookup (1, S, C) enters the channels-first layout (1, C, 1, S) right away."""
        lay = self.fallback(node)
        ids = self._lookup(node.args[1 if is_op(node, aten.embedding) else 2])
        seq = ids.seq if isinstance(ids, Layout) else frozenset()
        lay = Layout(lay.node, lay.pshape, lay.dims, lay.shape, seq)
        if len(lay.shape) != 3 or lay.shape[0] != 1:
            return lay
        _, s, c = lay.shape
        pshape = (1, c, 1, s)
        node = self.relayout(lay, {1: 3, 2: 1}, pshape)
        return Layout(node, pshape, (None, 3, 1), lay.shape, seq)


def _lift4(lay: Layout) -> Layout:
    """LAY with its logical rank padded to 4 by leading size-1 axes (no data moves)."""
    pad = 4 - len(lay.shape)
    if pad <= 0:
        return lay
    seq = frozenset(i + pad for i in lay.seq)
    return Layout(lay.node, lay.pshape, (None,) * pad + lay.dims, (1,) * pad + lay.shape, seq)


def _reshape_layout(lay: Layout, out: tuple[int, ...]):
    """Physical (pshape, dims) of view(LAY, OUT) without moving data, or None."""
    a = [(i, s) for i, s in enumerate(lay.shape) if s != 1]
    b = [(j, s) for j, s in enumerate(out) if s != 1]
    groups = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i >= len(a) or j >= len(b):
            return None
        ga, gb, pa, pb = [a[i][0]], [b[j][0]], a[i][1], b[j][1]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                ga.append(a[i][0])
                pa, i = pa * a[i][1], i + 1
            else:
                if j >= len(b):
                    return None
                gb.append(b[j][0])
                pb, j = pb * b[j][1], j + 1
        groups.append((ga, gb))
    axis_of = {lay.dims[d]: d for d, _ in a}
    order = sorted(axis_of)
    group_of = {d: g for g, (ga, _) in enumerate(groups) for d in ga}
    seq = []  # (kept slot or None, slot it came from, out dim)
    k = 0
    while k < len(order):
        ga, gb = groups[group_of[axis_of[order[k]]]]
        axes = [lay.dims[d] for d in ga]
        if order[k : k + len(ga)] != axes:
            return None  # the merged axes are not physically adjacent and in order
        if len(ga) == 1 and len(gb) == 1:
            seq.append((order[k], order[k], gb[0]))
        else:
            seq += [(None, order[k], o) for o in gb]
        k += len(ga)
    rank = max(len(lay.pshape), len(seq))
    slots = _place(seq, rank)
    pshape = [1] * rank
    dims: list[int | None] = [None] * len(out)
    for (_, _, o), slot in zip(seq, slots, strict=True):
        pshape[slot] = out[o]
        dims[o] = slot
    return tuple(pshape), tuple(dims), groups


def _place(seq, rank: int) -> list[int]:
    """Slots for SEQ: kept items stay put, new ones go near their origin, order preserved."""
    slots: list[int | None] = [s for s, _, _ in seq]
    idx = 0
    while idx < len(seq):
        if slots[idx] is not None:
            idx += 1
            continue
        end = idx
        while end < len(seq) and slots[end] is None:
            end += 1
        lo = slots[idx - 1] if idx > 0 else -1
        hi = slots[end] if end < len(seq) else rank
        count = end - idx
        if count > hi - lo - 1:
            return list(range(rank - len(seq), rank))
        # the channel axis (1) is where the ANE layout wants a merged or split feature axis
        start = min(max(1, lo + 1), hi - count)
        for t in range(count):
            slots[idx + t] = start + t
        idx = end
    return slots  # type: ignore[return-value]


def sink_layout_changes(gm: fx.GraphModule) -> PassResult:
    """Re-emit the graph with every value in the layout that needs the fewest copies."""
    sweep = _Sweep(gm)
    graph = sweep.run()
    before = _copies(gm.graph)
    graph.eliminate_dead_code()
    after = _copies(graph)
    # keep the re-emission only if it removes layout copies (a second run finds none)
    if not sweep.changed or after >= before:
        _report_permuted_convs(gm)
        return PassResult(gm, False)
    gm.graph = graph
    recompile(gm)
    _report_permuted_convs(gm)
    return PassResult(gm, True)


def _permuted_convs(gm: fx.GraphModule) -> list[fx.Node]:
    """Permutes of a conv output that stay inside the graph (not on the way out of it)."""
    return [
        n
        for n in gm.graph.nodes
        if is_op(n, aten.permute)
        and is_op(n.args[0], aten.conv2d)
        and not all(
            u.op == "output" or is_op(u, aten.reshape) and all(w.op == "output" for w in u.users)
            for u in n.users
        )
    ]


def _report_permuted_convs(gm: fx.GraphModule) -> None:
    """A conv output the sweep could not carry on in its layout (an op it has no rule for
    reads it): the permute stays, said in the report (a copy, not an error on the ANE)."""
    for n in _permuted_convs(gm):
        mark_unlowered(n, "sink_layout_changes", "a layout change the sweep could not remove")


def report_summary(gm: fx.GraphModule) -> dict | None:
    """The layout changes left in the graph, by module, when there are any."""
    left = [n for n in _permuted_convs(gm) if unlowered(n)]
    if not left:
        return None
    modules = sorted({n.meta.get(MODULE) or "?" for n in left})
    return {"layout_changes_left": {"count": len(left), "modules": modules[:8]}}


def _copies(graph: fx.Graph) -> int:
    return sum(1 for n in graph.nodes if is_op(n, aten.permute, aten.transpose, aten.reshape))


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No conv output is permuted again, except where it leaves the graph or where the pass
    reported it could not carry the layout on."""
    return [
        f"{n.name}: output of {n.args[0].name} permuted inside the graph"
        for n in _permuted_convs(gm)
        if not unlowered(n)
    ]


register_pass(
    "sink_layout_changes", lambda: sink_layout_changes, postcondition, summary=report_summary
)
