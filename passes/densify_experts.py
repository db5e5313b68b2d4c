"""Mixture of experts: data-dependent routing becomes a dense, comparison-weighted sum.

    before: p = softmax(router(h)) (N,E); w, i = topk(p, k); sort/histc/index by i;
            grouped_mm(h[i], Wgu (E,H,2I)) -> act -> grouped_mm(., Wd (E,I,H)) * w -> index_put/sum
    after:  sel = sum(z[:,None,:] > z[:,:,None], -1) < k (z the logits) ; d = norm(p * sel) (N,E)
            per expert group G: act(linear(h, Wg_G), linear(h, Wu_G)) * linear(d_G, R_G) (N,|G|I)
            out = sum_G linear(., Wd_G) (N,H)      every expert runs: compute x E/k
    shared expert (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE), before and after alike:
            out + sigmoid(linear(h, Wsg (1,H))) (N,1) * mlp_s(h) (N,H), mlp_s of width Is
            already dense, it is kept as captured and counted: compute x (E I + Is) / (k I + Is)
The block is found from the graph (a topk over router probabilities, a softmax or sigmoid of
logits, whose indices route a pair of grouped matmuls over 3-D weights), never from a class
name; a top-k over anything else (Qwen4-Exp's QSA indexer ranks attention scores) is no
router: the pass leaves it, and the checker's "routing" rule names it with its module. A
shared expert is the other addend of the block's result when it is computed from the block's
hidden states alone (dense linears, optionally gated by a one-row linear such as Qwen's
sigmoid gate). The router's values-to-weights steps
(e.g. the top-k renormalisation) and the activation between the two matmuls are copied from
the captured graph, so the dense form computes what the model computes. Experts are grouped so
every conv fits the width limits in core/rules.py. The experts are ranked by the router's
logits when the probabilities are their softmax or sigmoid (the same order; in fp16 near-equal
probabilities round to ties where the logits still differ, and transformers' own fp16 model
ranks fp32 probabilities of fp16 logits: the logits' order); exact ties select every tied
expert.
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch
import torch.fx as fx

from anefx.core import rules
from anefx.core.annotations import MODULE
from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    add_const,
    aten,
    const_value,
    emit,
    is_op,
    recompile,
    shape_of,
)

MOE_META = "anefx_moe"  # {"blocks": [...], "unmatched": [...]}: what the report states

# ops allowed between the two expert matmuls besides the gate/up split: they act row-wise and
# elementwise, so they mean the same on (N, |G| * I) as on (rows, I)
_ELEMENTWISE = (
    aten.silu,
    aten.gelu,
    aten.relu,
    aten.sigmoid,
    aten.tanh,
    aten.mul,
    aten.add,
    aten.sub,
    aten.div,
    aten.neg,
    aten._to_copy,
)
# ops allowed from the top-k values to the routing weights: they stay right when the values
# are replaced by the masked probabilities (zeros add nothing to a sum over experts)
_VALUE_OPS = (aten.sum, aten.div, aten.mul, aten._to_copy, aten.clamp, aten.clamp_min)
_VIEW_OPS = (aten.reshape, aten.view, aten.transpose, aten.permute, aten.t, aten._to_copy)
_ROUTING_OPS = (aten.topk, aten.sort, aten.argsort, aten.histc, aten.cumsum, aten.nonzero)
# what a router's top-k ranks: probabilities over the experts (Qwen: softmax; sigmoid routers
# as in DeepSeek-style MoE), possibly cast or viewed on the way
_PROBABILITY_OPS = (aten.softmax, aten._softmax, aten._safe_softmax, aten.sigmoid)


class _NoMatch(Exception):
    """The block is not in a form this pass understands (the reason is reported)."""


def _is_router(topk: fx.Node) -> bool:
    """True when TOPK ranks probabilities (a softmax or sigmoid of logits): a router's top-k."""
    x = topk.args[0]
    while is_op(x, *_VIEW_OPS):
        x = x.args[0]
    return is_op(x, *_PROBABILITY_OPS)


def _ranked(probs: fx.Node) -> fx.Node:
    """What the experts are ranked by: the router's logits when PROBS is a softmax over the
    experts' axis or a sigmoid of them, reached through casts only (both keep the order);
    else PROBS. In fp16, near-equal probabilities round to ties (each tie would select one
    expert more) where their logits still differ: transformers' fp16 model ranks the fp32
    softmax of fp16 logits, the same order as the logits'."""
    x = probs
    while is_op(x, aten._to_copy):
        x = x.args[0]
    logits = x.args[0] if is_op(x, *_PROBABILITY_OPS) else None
    if logits is None or shape_of(logits) != shape_of(probs):
        return probs
    if is_op(x, aten.sigmoid):
        return logits
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim")
    return logits if dim in (-1, len(shape_of(probs)) - 1) else probs


def _is_grouped_mm(node: object) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return "grouped_mm" in str(node.target)


def _descendants(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    """Users of NODE, transitively, inside WITHIN (the block's window of the graph)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in within and u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _used_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, str]:
    """The 3-D weight a grouped matmul reads, (E, in, out), evaluated from its get_attr, and
    the attribute it comes from."""
    chain = []
    while node.op != "get_attr":
        if not is_op(node, *_VIEW_OPS):
            raise _NoMatch(f"expert weight comes from {node.target}, not a parameter")
        chain.append(node)
        node = node.args[0]
    t = const_value(gm, node)
    if t is None or t.dim() != 3:
        raise _NoMatch(f"expert weight {node.target} is not a 3-D tensor")
    for n in reversed(chain):
        t = n.target(t, *n.args[1:], **n.kwargs)
    return t, node.target


def _gathered_source(x: fx.Node) -> fx.Node:
    """The (N, H) hidden states a grouped matmul's rows were gathered from."""
    while is_op(x, aten._to_copy, aten.reshape):
        x = x.args[0]
    if not is_op(x, aten.index) or len(x.args[1]) != 1:
        raise _NoMatch(f"expert input is {x.target}, not rows gathered from the hidden states")
    return x.args[0]


def _between(src: fx.Node, dst: fx.Node, window: list[fx.Node]) -> list[fx.Node]:
    """Nodes on a path from SRC to DST (both excluded), in graph order."""
    down = _descendants(src, set(window))
    up, todo = set(), [dst]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in up:
                up.add(a)
                todo.append(a)
    return [n for n in window if n in down and n in up and n is not dst]


def _match(gm: fx.GraphModule, topk: fx.Node, window: list[fx.Node]) -> dict:
    """Everything the dense form needs, read off the captured block; _NoMatch if it is not one.

    WINDOW: the nodes from TOPK to the next router's top-k, in graph order (the block and the
    next attention), so every search stays inside one layer.
    """
    within = set(window)
    probs, k = topk.args[0], topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    pshape = shape_of(probs)
    if pshape is None or len(pshape) != 2 or dim not in (-1, 1):
        raise _NoMatch(f"router top-k over {pshape} (dim {dim}), not (tokens, experts)")
    n_tok, n_exp = pshape
    outs = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
    if set(outs) != {0, 1}:
        raise _NoMatch("router top-k values or indices unused")
    values, indices = outs[0], outs[1]
    routed = _descendants(indices, within)
    mms = [n for n in window if n in routed and _is_grouped_mm(n)][:2]
    if len(mms) != 2 or mms[1] not in _descendants(mms[0], within):
        raise _NoMatch("the top-k does not route a chain of two grouped matmuls")
    mm1, mm2 = mms
    (w1, attr1), (w2, attr2) = _used_weight(gm, mm1.args[1]), _used_weight(gm, mm2.args[1])
    hidden = _gathered_source(mm1.args[0])
    hshape = shape_of(hidden)
    if hshape != (n_tok, w1.shape[1]) or w1.shape[0] != n_exp or w2.shape[0] != n_exp:
        raise _NoMatch(f"hidden {hshape} and expert weights {tuple(w1.shape)} do not agree")
    if w1.shape[2] % 2 or w2.shape[1] != w1.shape[2] // 2 or w2.shape[2] != hshape[1]:
        raise _NoMatch(f"expert weights {tuple(w1.shape)}, {tuple(w2.shape)}: not gate+up, down")
    inter = w2.shape[1]

    # the activation between the matmuls: one split of mm1 into gate and up, then elementwise
    middle = _between(mm1, mm2, window)
    splits = [n for n in middle if is_op(n, aten.split, aten.split_with_sizes, aten.chunk)]
    if len(splits) != 1 or splits[0].args[0] is not mm1:
        raise _NoMatch("the expert activation does not split the gate/up projection once")
    sp = splits[0]
    sdim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
    sizes = sp.args[1]
    halves = (
        (is_op(sp, aten.chunk) and sizes == 2)
        or sizes == inter
        or (isinstance(sizes, (list, tuple)) and list(sizes) == [inter, inter])
    )
    if sdim not in (-1, 1) or not halves:
        raise _NoMatch("the gate/up split is not two halves of the last axis")
    parts = {}
    for n in middle:
        if n is sp:
            continue
        if n.target is operator.getitem and n.args[0] is sp:
            parts[n] = n.args[1]
        elif not is_op(n, *_ELEMENTWISE):
            raise _NoMatch(f"{n.target} between the expert matmuls is not elementwise")
    if sorted(parts.values()) != [0, 1]:
        raise _NoMatch("the gate/up split is not used as two halves")

    # the routing weight: mm2's rows times a per-row weight that comes from the top-k values
    scale = [u for u in mm2.users if is_op(u, aten.mul)]
    if len(scale) != 1:
        raise _NoMatch("the expert outputs are not scaled by their routing weight")
    scale = scale[0]
    weights = next(
        (
            n
            for n in reversed([values, *window])
            if shape_of(n) == (n_tok, k)
            and n not in routed  # still in top-k order: not yet permuted by the indices
            and (n is values or n in _descendants(values, within))
            and scale in _descendants(n, within)
        ),
        None,
    )
    if weights is None:
        raise _NoMatch("no (tokens, k) routing weights derived from the top-k values")
    value_ops = _between(values, weights, window) + ([weights] if weights is not values else [])
    for n in value_ops:
        if not is_op(n, *_VALUE_OPS):
            raise _NoMatch(f"{n.target} turns top-k values into weights: not understood")

    # the block's result: the first (N, H) tensor after the scaling that leaves the experts'
    # module (the sums over the k slots and the un-sorting happen inside it)
    block = mm1.meta.get(MODULE) or ""
    after = _descendants(scale, within)
    result = next(
        (
            n
            for n in window
            if n in after
            and shape_of(n) == hshape
            and any(not (u.meta.get(MODULE) or "").startswith(block) for u in n.users)
        ),
        None,
    )
    if result is None:
        raise _NoMatch("no (tokens, hidden) result after the weighted expert outputs")
    return {
        "topk": topk,
        "probs": probs,
        "k": int(k),
        "values": values,
        "value_ops": value_ops,
        "weights": weights,
        "hidden": hidden,
        "mm1": mm1,
        "middle": [n for n in middle if n is not sp],
        "act": mm2.args[0],
        "parts": parts,
        "mm2": mm2,
        "w_gate_up": w1,
        "w_down": w2,
        "result": result,
        "experts": n_exp,
        "inter": inter,
        "weight_attrs": {attr1, attr2},
    }


def _shared_expert(m: dict, order: dict[fx.Node, int]) -> dict | None:
    """The shared expert beside the routed block M, if any: the other addend of an add of the
    block's result (through views and casts) computed from the block's hidden states alone.

    Returns {"macs": multiply-accumulates per token of its linears, "gated": whether a
    one-row linear (a scalar gate per token, Qwen's sigmoid gate) scales it}; None when the
    result is added to nothing computed from the hidden states alone (a residual, say).
    ORDER: each node's position in the graph, to stop the search above the hidden states.
    """
    hidden, out = m["hidden"], m["result"]
    top = order[hidden]
    while True:
        adds = [u for u in out.users if is_op(u, aten.add) and len(u.all_input_nodes) == 2]
        views = [u for u in out.users if is_op(u, *_VIEW_OPS)]
        if adds or len(views) != 1 or len(out.users) != 1:
            break
        out = views[0]
    for add in adds:
        other = next(a for a in add.all_input_nodes if a is not out)
        path, todo, ok = set(), [other], True
        while todo and ok:
            n = todo.pop()
            if n is hidden or n in path or n.op == "get_attr":
                continue
            # above the hidden states (a residual; a node an earlier block's rewrite made has
            # no position and lies above too), or routed: not the shared expert
            ok = n.op == "call_function" and order.get(n, -1) > top and not is_op(n, *_ROUTING_OPS)
            path.add(n)
            todo.extend(n.all_input_nodes)
        if not ok or not any(hidden in n.all_input_nodes for n in path):
            continue
        linears = [n for n in path if is_op(n, aten.linear)]
        shapes = [shape_of(n.args[1]) for n in linears]
        if not linears or any(s is None or len(s) != 2 for s in shapes):
            continue
        # a one-row linear is a scorer (the gate), not expert compute: the router's own
        # linear is not counted either
        return {
            "macs": sum(o * i for o, i in shapes if o > 1),
            "gated": any(o == 1 for o, _ in shapes),
        }
    return None


def _multiplier(n_exp: int, k: int, expert_macs: int, shared_macs: int) -> float:
    """Dense over routed expert compute per token: (E e + s) / (k e + s), E/k exactly when
    there is no shared expert."""
    return float(Fraction(n_exp * expert_macs + shared_macs, k * expert_macs + shared_macs))


def _group_size(inter: int, n_exp: int) -> int:
    """Experts per group: gate/up convs within the conv width, down conv within C."""
    per = min(rules.MAX_CONV_OUT_CHANNELS, rules.DIM_LIMITS["C"]) // inter
    if per < 1:
        raise _NoMatch(f"one expert's {inter} channels exceed the conv width limit")
    groups = math.ceil(n_exp / per)
    return math.ceil(n_exp / groups)  # balanced groups


def _rewrite(gm: fx.GraphModule, m: dict, size: int) -> None:
    """Build the dense block (experts in groups of SIZE) and route the block's users to it."""
    g = gm.graph
    result, probs, hidden = m["result"], m["probs"], m["hidden"]
    n_exp, inter, k = m["experts"], m["inter"], m["k"]
    w1, w2 = m["w_gate_up"], m["w_down"]  # (E, H, 2I), (E, I, H)
    dtype = w1.dtype
    like = m["mm1"]
    with g.inserting_before(result):
        # top-k as comparisons: expert e is kept when fewer than k experts beat it
        ranked = _ranked(probs)
        rows = emit(g, aten.unsqueeze.default, (ranked, 1), like=m["topk"])  # (N, 1, E)
        cols = emit(g, aten.unsqueeze.default, (ranked, 2), like=m["topk"])  # (N, E, 1)
        beats = emit(g, aten.gt.Tensor, (rows, cols), like=m["topk"])
        beats = emit(g, aten._to_copy.default, (beats,), {"dtype": probs.meta["val"].dtype})
        rank = emit(g, aten.sum.dim_IntList, (beats, [-1]), like=m["topk"])
        keep = emit(g, aten.lt.Scalar, (rank, k), like=m["topk"])
        keep = emit(g, aten._to_copy.default, (keep,), {"dtype": probs.meta["val"].dtype})
        dense = emit(g, aten.mul.Tensor, (probs, keep), like=m["topk"])
        env = {m["values"]: dense}
        for n in m["value_ops"]:
            env[n] = g.node_copy(n, lambda a: env.get(a, a))
        # (N, E) in the weights' dtype: a cast the final clean-up drops if it does nothing
        route = emit(g, aten._to_copy.default, (env[m["weights"]],), {"dtype": dtype}, like=like)
        x = hidden
        total = None
        for start in range(0, n_exp, size):
            stop = min(start + size, n_exp)
            span = stop - start
            gate_w = w1[start:stop, :, :inter].permute(0, 2, 1).reshape(span * inter, -1)
            up_w = w1[start:stop, :, inter:].permute(0, 2, 1).reshape(span * inter, -1)
            down_w = w2[start:stop].permute(2, 0, 1).reshape(w2.shape[2], span * inter)
            tag = f"experts_{start}_{stop}"
            gate = emit(
                g,
                aten.linear.default,
                (x, add_const(gm, gate_w.contiguous(), f"{tag}_gate", like=like)),
                like=like,
            )
            up = emit(
                g,
                aten.linear.default,
                (x, add_const(gm, up_w.contiguous(), f"{tag}_up", like=like)),
                like=like,
            )
            sub = {h: (gate if i == 0 else up) for h, i in m["parts"].items()}
            for n in m["middle"]:
                if n not in sub:
                    sub[n] = g.node_copy(n, lambda a, sub=sub: sub.get(a, a))
            act = sub[m["act"]]
            # each expert's routing weight repeated over its I channels, as a tiny conv
            spread = torch.zeros(span * inter, span, dtype=dtype, device=w1.device)
            if w1.device.type != "meta":
                spread[torch.arange(span * inter), torch.arange(span).repeat_interleave(inter)] = 1
            part = emit(g, aten.slice.Tensor, (route, 1, start, stop), like=like)
            gain = emit(
                g,
                aten.linear.default,
                (part, add_const(gm, spread, f"{tag}_spread", like=like)),
                like=like,
            )
            act = emit(g, aten.mul.Tensor, (act, gain), like=like)
            out = emit(
                g,
                aten.linear.default,
                (act, add_const(gm, down_w.contiguous(), f"{tag}_down", like=like)),
                like=m["mm2"],
            )
            total = out if total is None else emit(g, aten.add.Tensor, (total, out), like=like)
        if result.meta["val"].dtype != dtype:
            total = emit(g, aten._to_copy.default, (total,), {"dtype": result.meta["val"].dtype})
    result.replace_all_uses_with(total)


def densify_experts(gm: fx.GraphModule) -> PassResult:
    """Rewrite every recognised mixture-of-experts block into its dense form."""
    nodes = list(gm.graph.nodes)
    # only a router's top-k starts a block; each block's window ends at the next router's
    found = [i for i, n in enumerate(nodes) if is_op(n, aten.topk) and _is_router(n)]
    if not found:
        return PassResult(gm, False)
    info = gm.meta.setdefault(MOE_META, {"blocks": [], "unmatched": []})
    changed = False
    replaced: set[str] = set()
    order = {n: i for i, n in enumerate(nodes)}
    for j, i in enumerate(found):
        topk = nodes[i]
        window = nodes[i : found[j + 1] if j + 1 < len(found) else len(nodes)]
        module = (topk.meta.get(MODULE) or "").rsplit(".", 1)[0]
        try:
            m = _match(gm, topk, window)
        except _NoMatch as exc:
            info["unmatched"].append({"node": topk.name, "module": module, "reason": str(exc)})
            continue
        size = _group_size(m["inter"], m["experts"])
        shared = _shared_expert(m, order)  # read before the rewrite moves the result's users
        _rewrite(gm, m, size)
        replaced |= m["weight_attrs"]
        hidden = m["w_down"].shape[2]
        block = {
            "module": module,
            "experts": m["experts"],
            "top_k": m["k"],
            "expert_groups": math.ceil(m["experts"] / size),
            "experts_per_group": size,
            "compute_multiplier": _multiplier(
                m["experts"], m["k"], 3 * hidden * m["inter"], shared["macs"] if shared else 0
            ),
        }
        if shared:
            # the width of a gated MLP doing the same work (exact for one)
            block["shared_expert_width"] = round(shared["macs"] / (3 * hidden))
            block["shared_expert_gated"] = shared["gated"]
        info["blocks"].append(block)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        # the 3-D expert weights now live in the grouped copies: free the originals
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in replaced - used:
            delattr(gm, name)
        recompile(gm)
    return PassResult(gm, changed)


def moe_summary(info: dict) -> dict:
    """The report's view of gm.meta[MOE_META]: one line of numbers plus what was not done."""
    blocks = info.get("blocks", [])
    out: dict = {"blocks": len(blocks)}
    if blocks:
        first = blocks[0]
        out.update(
            {
                "experts": first["experts"],
                "top_k": first["top_k"],
                "expert_groups": first["expert_groups"],
                # every expert runs for every token instead of top_k of them (a shared
                # expert runs either way: counted on both sides)
                "compute_multiplier": first["compute_multiplier"],
            }
        )
        if "shared_expert_width" in first:
            out["shared_expert_width"] = first["shared_expert_width"]
            out["shared_expert_gated"] = first["shared_expert_gated"]
    if info.get("unmatched"):
        out["unmatched"] = info["unmatched"]
    return out


def report_summary(gm: fx.GraphModule) -> dict | None:
    """The report's statistics from this pass: {"moe": ...} when the graph had expert blocks."""
    info = gm.meta.get(MOE_META)
    return {"moe": moe_summary(info)} if info else None


def _routed(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes a router's top-k routes: the topk nodes and everything computed from them."""
    seen: set[fx.Node] = set()
    todo = [n for n in gm.graph.nodes if is_op(n, aten.topk) and _is_router(n)]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No expert block's routing is left (a top-k and the sorts, histograms, cumulative sums
    and grouped matmuls it routes), except in blocks reported as not understood. A cumulative
    sum no router's top-k routes (a linear-attention layer's), or a top-k over anything but
    probabilities (an attention indexer's), is not an expert block's: the checker's
    "routing" rule reports it with its module, as for any op that leaves the ANE."""
    unmatched = [u["module"] for u in gm.meta.get(MOE_META, {}).get("unmatched", [])]
    routed = _routed(gm)
    return [
        f"{n.name}: {n.target} left"
        for n in gm.graph.nodes
        if ((is_op(n, *_ROUTING_OPS) and n in routed) or _is_grouped_mm(n))
        and not any((n.meta.get(MODULE) or "").startswith(u) for u in unmatched)
    ]


register_pass("densify_experts", lambda: densify_experts, postcondition, summary=report_summary)
