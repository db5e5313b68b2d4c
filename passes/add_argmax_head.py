"""Optional: choose the token inside the model (greedy decoding without logits on the host).

    before: outputs logits_0 (1,w,1,S), ..., logits_{k-1} (1,w',1,S)    (after split_lm_head)
    after:  m_i = amax(logits_i, 1), a_i = argmax(logits_i, 1) + start_i      (1,1,1,S) each
            best = argmax(cat(m), 1); token = sum(cast(eq(best, arange(k))) * cat(a), 1)
            outputs token (1,1,1,S) int32 and logit = amax(cat(m), 1) (1,1,1,S)
Ties resolve to the lowest id, as torch.argmax does on the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.core.signature import Output, Role, set_signature, signature_of
from anefx.passes._util import PassResult, add_const, aten, emit, is_op, recompile


def add_argmax_head(gm: fx.GraphModule) -> PassResult:
    """Replace the logits outputs (the signature's) by the token id and its logit."""
    sig = signature_of(gm)
    if sig.chooses_token or not sig.logits:
        return PassResult(gm, False)
    g = gm.graph
    out = g.output_node()
    values = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    logits = [(o, values[i]) for i, o in enumerate(sig.outputs) if o.role == Role.LOGITS]
    others = {id(v) for _, v in logits}
    rest = [v for v in values if id(v) not in others]  # other outputs, then the states
    if logits[0][0].axes != ("B", "V", "1", "S"):
        return _unsplit(gm, out, logits[0][1], rest)
    logits.sort(key=lambda ov: ov[0].vocab[0])
    k = len(logits)
    slices = [v for _, v in logits]
    with g.inserting_before(out):
        maxes, idxs = [], []
        for meta, node in logits:
            maxes.append(emit(g, aten.amax.default, (node, [1], True), like=node))
            arg = emit(g, aten.argmax.default, (node, 1, True), like=node)
            arg = emit(g, aten._to_copy.default, (arg,), {"dtype": torch.int32}, like=node)
            if meta.vocab[0]:
                arg = emit(g, aten.add.Tensor, (arg, meta.vocab[0]), like=node)
            idxs.append(arg)
        like = slices[0]
        m = emit(g, aten.cat.default, (maxes, 1), like=like) if k > 1 else maxes[0]
        a = emit(g, aten.cat.default, (idxs, 1), like=like) if k > 1 else idxs[0]
        logit = emit(g, aten.amax.default, (m, [1], True), like=like)
        best = emit(g, aten.argmax.default, (m, 1, True), like=like)
        best = emit(g, aten._to_copy.default, (best,), {"dtype": torch.int32}, like=like)
        ids = add_const(
            gm, torch.arange(k, dtype=torch.int32).reshape(1, k, 1, 1), "slice_ids", like=like
        )
        hit = emit(g, aten.eq.Tensor, (best, ids), like=like)
        hit = emit(g, aten._to_copy.default, (hit,), {"dtype": torch.int32}, like=like)
        token = emit(
            g,
            aten.sum.dim_IntList,
            (emit(g, aten.mul.Tensor, (hit, a), like=like), [1], True),
            {"dtype": torch.int32},
            like=like,
        )
    return _outputs(gm, out, token, logit, rest, ("B", "1", "1", "S"))


def _unsplit(gm: fx.GraphModule, out: fx.Node, logits: fx.Node, rest: list) -> PassResult:
    """A head narrow enough not to be split: logits (1, S, V) -> token and logit (1, S, 1)."""
    g = gm.graph
    src, dim = logits, -1
    while is_op(src, aten.permute, aten.reshape) and len(src.users) == 1:
        src = src.args[0]
    if is_op(src, aten.conv2d):
        # reduce the channels-first head directly: no permute back to (1, S, V)
        logits, dim = src, 1
    with g.inserting_before(out):
        logit = emit(g, aten.amax.default, (logits, [dim], True), like=logits)
        token = emit(g, aten.argmax.default, (logits, dim, True), like=logits)
        token = emit(g, aten._to_copy.default, (token,), {"dtype": torch.int32}, like=logits)
    axes = ("B", "1", "1", "S") if dim == 1 else ("B", "S", "1")
    return _outputs(gm, out, token, logit, rest, axes)


def _outputs(
    gm: fx.GraphModule, out: fx.Node, token, logit, rest: list, axes: tuple[str, ...]
) -> PassResult:
    """Token id and logit replace the logits as the first outputs; the rest (other outputs, then
    the states) follow. AXES: their layout, S along the last axis or the second."""
    g = gm.graph
    g.erase_node(out)
    g.output((token, logit, *rest))
    sig = signature_of(gm)
    first = sig.logits[0]
    seq = first.size("S")
    shape = tuple(seq if a == "S" else 1 for a in axes)
    chosen = (
        Output(
            "token",
            Role.TOKEN,
            shape,
            "int32",
            axes,
            description="the chosen token id (greedy), int32",
        ),
        Output(
            "logit",
            Role.TOKEN_LOGIT,
            shape,
            first.dtype,
            axes,
            description="the chosen token's logit",
        ),
    )
    others = tuple(o for o in sig.outputs if o.role != Role.LOGITS)
    set_signature(gm, sig.replace(outputs=chosen + others))
    g.eliminate_dead_code()
    recompile(gm)
    return PassResult(gm, True)


def postcondition(gm: fx.GraphModule) -> list[str]:
    """When applied, the first output is an int32 token id and no conv output leaves the graph."""
    if not signature_of(gm).chooses_token:
        return []
    out = gm.graph.output_node().args[0]
    first = out[0] if isinstance(out, (tuple, list)) else out
    problems = []
    if first.meta.get("val") is not None and first.meta["val"].dtype != torch.int32:
        problems.append(f"{first.name}: token output is {first.meta['val'].dtype}, not int32")
    if any(is_op(v, aten.conv2d) for v in (out if isinstance(out, (tuple, list)) else [out])):
        problems.append("a logit slice still leaves the graph")
    return problems


register_pass("add_argmax_head", lambda: add_argmax_head, postcondition)
