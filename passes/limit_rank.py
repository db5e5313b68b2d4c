"""Keep every tensor at rank <= 4 (the ANE limit, read from the rule table).

The grouped key/value repeat of GQA is the rank-5 source in Qwen graphs:
    before: k(1,Hkv,S,D) -> unsqueeze(2) -> expand(1,Hkv,n,S,D) -> view(1,Hkv*n,S,D) = kr
            scores = matmul(q(1,H,S,D), transpose(kr))
    after:  scores = view(matmul(view(q,(Hkv,n,S,D)), transpose(view(k,(Hkv,1,S,D)))), (1,H,S,S))
The repeat disappears into matmul broadcasting (no copy). A repeat used by anything else becomes
the rank-4 form view(k,(Hkv,1,S,D)) -> expand(Hkv,n,S,D) -> view(1,H,S,D).
"""

from __future__ import annotations

import math

import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.core.rules import MAX_RANK
from anefx.passes._util import (
    PassResult,
    aten,
    emit,
    is_op,
    mark_unlowered,
    recompile,
    shape_of,
    unlowered,
)


def _match_repeat(node: fx.Node):
    """view(expand(unsqueeze(k, d))) merging the new axis into its neighbour: (k, d, n)."""
    if not is_op(node, aten.view, aten.reshape):
        return None
    exp = node.args[0]
    if not is_op(exp, aten.expand):
        return None
    unsq = exp.args[0]
    if not is_op(unsq, aten.unsqueeze):
        return None
    k = unsq.args[0]
    ks, es, out = shape_of(k), shape_of(exp), shape_of(node)
    if ks is None or es is None or out is None or len(es) <= MAX_RANK or len(ks) != 4:
        return None
    d = unsq.args[1] % len(es)
    n = es[d]
    # head-major merge: k heads (axis d-1) and the repeat axis fold into one axis of out
    if d != 2 or ks[0] != 1 or out != (1, ks[1] * n, ks[2], ks[3]):
        return None
    return k, n


def _broadcast_matmul(g: fx.Graph, mm: fx.Node, rep_pos: int, k: fx.Node, n: int, tr: bool):
    """matmul with a repeated operand -> grouped matmul broadcasting over the repeat axis."""
    other = mm.args[1 - rep_pos]
    os_ = shape_of(other)
    ks = shape_of(k)
    hkv = ks[1]
    with g.inserting_before(mm):
        grouped = emit(g, aten.reshape.default, (other, [hkv, n, os_[2], os_[3]]), like=mm)
        kv = emit(g, aten.reshape.default, (k, [hkv, 1, ks[2], ks[3]]), like=mm)
        if tr:
            kv = emit(g, aten.transpose.int, (kv, -2, -1), like=mm)
        args = (grouped, kv) if rep_pos == 1 else (kv, grouped)
        prod = emit(g, aten.matmul.default, args, like=mm)
        out = emit(g, aten.reshape.default, (prod, list(shape_of(mm))), like=mm)
    mm.replace_all_uses_with(out)
    g.erase_node(mm)


def limit_rank(gm: fx.GraphModule) -> PassResult:
    """Rewrite the rank-5 GQA repeat into rank-4 forms."""
    g = gm.graph
    modified = False
    for node in list(g.nodes):
        m = _match_repeat(node)
        if m is None:
            continue
        k, n = m
        for user in list(node.users):
            tr = False
            mm = user
            if is_op(user, aten.transpose) and sorted(a % 4 for a in user.args[1:]) == [2, 3]:
                if len(user.users) != 1:
                    continue
                mm, tr = next(iter(user.users)), True
            via = user if tr else node
            if is_op(mm, aten.matmul) and len(shape_of(mm.args[0]) or ()) == 4:
                pos = list(mm.args).index(via)
                if all(len(shape_of(a) or ()) == 4 for a in mm.args):
                    _broadcast_matmul(g, mm, pos, k, n, tr)
                    if tr and not user.users:
                        g.erase_node(user)
                    modified = True
        if node.users:
            ks = shape_of(k)
            with g.inserting_before(node):
                kv = emit(g, aten.reshape.default, (k, [ks[1], 1, ks[2], ks[3]]), like=node)
                ex = emit(g, aten.expand.default, (kv, [ks[1], n, ks[2], ks[3]]), like=node)
                rep = emit(g, aten.reshape.default, (ex, [1, ks[1] * n, ks[2], ks[3]]), like=node)
            node.replace_all_uses_with(rep)
            modified = True
    if modified:
        g.eliminate_dead_code()
        recompile(gm)
    for node in g.nodes:  # what is not the GQA repeat stays, for the checker's rank rule
        s = shape_of(node)
        if s is not None and len(s) > MAX_RANK:
            mark_unlowered(node, "limit_rank", "a rank-5 tensor that is not the GQA repeat")
    return PassResult(gm, modified)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """Every tensor has rank <= MAX_RANK, but those the pass reported as not lowered."""
    out = []
    for n in gm.graph.nodes:
        s = shape_of(n)
        if s is not None and len(s) > MAX_RANK and not unlowered(n):
            out.append(f"{n.name}: rank {len(s)} tensor {list(s)} (limit {MAX_RANK})")
    return out


def _numel(shape) -> int:
    return math.prod(shape)


register_pass("limit_rank", lambda: limit_rank, postcondition)
