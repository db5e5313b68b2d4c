"""Fold everything computed from the position ids alone into constant tables.

    before: pos(1,S) -> unsqueeze -> mul(inv_freq) -> cat -> cos -> [cast] -> cos(1,[1,]S,D)
    after:  onehot = cast(eq(arange(T)[:, None], pos(1,S)))   (T,S), shared by every table
            cos = reshape(transpose(matmul(cos_table(D,T), onehot)))  table evaluated once
The tables are evaluated by the captured graph itself (transformers' own rotary code, in the
precision it uses) for positions 0..T-1; the row selection is a one-hot matmul, which stays on
the ANE (a gather would not) and is exact: each output is one table entry times 1.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.core.signature import Role, has_signature, signature_of
from anefx.passes._util import PassResult, add_const, aten, emit, is_op, recompile, shape_of, val

_MARK = "anefx_position_select"


def _position_input(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's position ids, by their role in its signature (None: a graph without)."""
    if not has_signature(gm):
        return None
    return signature_of(gm).placeholder(gm, Role.POSITIONS)


def _position_only(gm: fx.GraphModule, pos: fx.Node) -> list[fx.Node]:
    """Nodes (in order) whose value depends on the position ids and constants only."""
    inside = {pos}
    order = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get(_MARK):
            continue
        ins = node.all_input_nodes
        if (
            ins
            and all(i in inside or i.op == "get_attr" for i in ins)
            and any(i in inside for i in ins)
        ):
            inside.add(node)
            order.append(node)
    return order


class FoldPositionTables:
    """Options: ``table_len`` = positions the tables cover (default: the captured length)."""

    name = "fold_position_tables"

    def __init__(self, table_len: int | None = None):
        self.table_len = table_len

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        pos = _position_input(gm)
        if pos is None:
            return PassResult(gm, False)
        region = _position_only(gm, pos)
        members = set(region)
        frontier = [n for n in region if any(u not in members for u in n.users)]
        seq = shape_of(pos)
        frontier = [f for f in frontier if seq and len(seq) == 2 and _row_shaped(f, seq[1])]
        if not frontier or not any(n.op == "call_function" for n in region):
            return PassResult(gm, False)
        table_len = self.table_len or seq[1]
        tables = self._evaluate(gm, pos, region, frontier, table_len)
        # a position-only value that is not one row per position (the KV-cache write
        # matrix, (context, S), when context == S) stays computed in the graph
        frontier = [f for f, t in zip(frontier, tables, strict=True) if t is not None]
        tables = [t for t in tables if t is not None]
        if not tables:
            return PassResult(gm, False)

        g = gm.graph
        first_user = min(
            (u for f in frontier for u in f.users if u not in members), key=lambda n: _index(g, n)
        )
        with g.inserting_before(first_user):
            # one-hot as (T, S) and tables as (D, T): the product is (D, S), the layout the
            # rotary multiply wants on the (B, C, 1, S) side, with no transpose of its own
            col = add_const(
                gm,
                torch.arange(table_len, dtype=val(pos).dtype, device=tables[0].device)[:, None],
                "positions",
            )
            hit = emit(g, aten.eq.Tensor, (col, pos), like=frontier[0])
            onehot = {}
            for f, table in zip(frontier, tables, strict=True):
                dtype = val(f).dtype
                if dtype not in onehot:
                    onehot[dtype] = emit(
                        g, aten._to_copy.default, (hit,), {"dtype": dtype}, like=frontier[0]
                    )
                t = add_const(gm, table.t().contiguous(), f"{f.name}_table", like=f)
                sel_t = emit(g, aten.matmul.default, (t, onehot[dtype]), like=f)
                sel = emit(g, aten.transpose.int, (sel_t, 0, 1), like=f)
                sel = emit(g, aten.reshape.default, (sel, list(shape_of(f))), like=f)
                for n in (hit, onehot[dtype], sel_t, sel, sel.args[0]):
                    n.meta[_MARK] = True
                f.replace_all_uses_with(sel, delete_user_cb=lambda u: u not in members)
        gm.graph.eliminate_dead_code()
        recompile(gm)
        return PassResult(gm, True)

    @staticmethod
    def _evaluate(gm, pos, region, frontier, table_len):
        """Run the position-only subgraph for positions 0..T-1: each frontier value's table,
        or None where row p does not depend on position p alone."""
        sub = fx.Graph()
        env = {pos: sub.placeholder("pos")}
        for node in region:
            for i in node.all_input_nodes:
                if i not in env:
                    env[i] = sub.node_copy(i, lambda n: env[n])
            env[node] = sub.node_copy(node, lambda n: env[n])
        sub.output(tuple(env[f] for f in frontier))
        mod = fx.GraphModule(gm, sub)
        pdtype = val(pos).dtype
        is_meta = any(
            isinstance(getattr(gm, n.target, None), torch.Tensor) and getattr(gm, n.target).is_meta
            for n in env
            if n.op == "get_attr"
        )
        if is_meta:
            return [
                torch.empty((table_len, shape_of(f)[-1]), dtype=val(f).dtype, device="meta")
                for f in frontier
            ]
        with torch.no_grad():
            full = mod(torch.arange(table_len, dtype=pdtype)[None])
            # the fold is only valid if row p of the output depends on position p alone
            gen = torch.Generator().manual_seed(0)
            probe = torch.randint(0, table_len, tuple(shape_of(pos)), generator=gen, dtype=pdtype)
            direct = mod(probe)
        tables = []
        for f_full, f_direct in zip(full, direct, strict=True):
            # rows are the second-to-last axis (checked by _row_shaped); drop the unit axes
            f_full = f_full.reshape(-1, f_full.shape[-1])
            f_direct = f_direct.reshape(-1, f_direct.shape[-1])
            if f_full.shape[0] != table_len or not torch.equal(f_full[probe[0].long()], f_direct):
                tables.append(None)
            else:
                tables.append(f_full.contiguous())
        return tables


def _row_shaped(node: fx.Node, seq: int) -> bool:
    """A floating (1, .., 1, S, D) value: one row of width D per position."""
    s = shape_of(node)
    return (
        s is not None
        and len(s) >= 2
        and s[-2] == seq
        and all(d == 1 for d in s[:-2])
        and val(node).is_floating_point()
    )


def _index(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1


fold_position_tables = FoldPositionTables()


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No trigonometry on positions is left: the rotary tables are constants."""
    return [
        f"{n.name}: {n.target} still computed in the graph"
        for n in gm.graph.nodes
        if is_op(n, aten.cos, aten.sin)
    ]


register_pass("fold_position_tables", FoldPositionTables, postcondition)
