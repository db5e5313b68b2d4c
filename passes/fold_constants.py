"""Evaluate once what depends on constants alone; drop arithmetic with a known zero.

    before: A_log(H) -> exp -> neg -> mul(., softplus(a)(1,S,H))
            w(D) -> add(., 1.0) -> mul(x_hat(1,S,D), .)            (zero-centred RMSNorm weight)
            w(C,1,K) -> squeeze(1) -> unsqueeze(1) -> conv1d
            state = zeros(H,dk,dv) ; o = matmul(q, state) + matmul(a, b) ; u - matmul(k, state)
    after:  c1 = -exp(A_log) (H) -> mul(c1, softplus(a)) ; c2 = 1 + w (D) -> mul(x_hat, c2)
            c3 = w (C,1,K) -> conv1d ; o = matmul(a, b) ; u
A node whose inputs are all constants is computed by torch here (on the meta device for a
model without weights) and becomes a constant, unless it would be larger than its largest input
(an expand is left: it would store the broadcast copy) or would copy a large weight another op
still reads. A value known to be zero (``zeros``, a product with one) is not stored: added or
subtracted it is dropped, multiplied it gives a zero. A delta rule started without a state
(the stateless prefill) then has no state arithmetic left. Zero times inf is taken as zero.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.core.pass_registry import register_pass
from anefx.passes._util import (
    PassResult,
    add_const,
    aten,
    const_value,
    emit,
    is_op,
    recompile,
    val,
)

# ops that make a tensor of zeros from shapes alone
_ZERO_MAKERS = (aten.zeros, aten.zeros_like, aten.new_zeros)
# ops whose result is zero when their first operand is (views, casts, sign, sums)
_ZERO_KEEPING = (
    aten.reshape,
    aten.view,
    aten._unsafe_view,
    aten.expand,
    aten.permute,
    aten.transpose,
    aten.slice,
    aten.select,
    aten.squeeze,
    aten.unsqueeze,
    aten.clone,
    aten._to_copy,
    aten.neg,
    aten.sum,
    aten.alias,
)
# a folded result that copies more than this many elements of a weight another op still
# reads is left in the graph: the package would store the weight twice
_SHARED_COPY_LIMIT = 1 << 16
# creation ops without inputs (ones, full, arange, eye) are folded only up to this size
_CREATION_LIMIT = 1 << 20
_PASS = "fold_constants"


def _is_zero_maker(node: fx.Node) -> bool:
    if is_op(node, *_ZERO_MAKERS):
        return True
    if is_op(node, aten.full, aten.full_like, aten.new_full):
        fill = node.args[1] if not is_op(node, aten.new_full) else node.args[2]
        return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill == 0
    return False


def _same_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = val(a), val(b)
    return (
        isinstance(va, torch.Tensor)
        and isinstance(vb, torch.Tensor)
        and tuple(va.shape) == tuple(vb.shape)
        and va.dtype == vb.dtype
    )


def _pure_aten(node: fx.Node) -> bool:
    """An ATen function without side effects or randomness, giving one tensor."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace != "aten" or target._schema.is_mutable:
        return False
    name = target.overloadpacket.__name__
    if any(word in name for word in ("rand", "dropout", "bernoulli", "normal", "assert", "empty")):
        return False
    return isinstance(val(node), torch.Tensor)


def _numel(node: fx.Node) -> int:
    v = val(node)
    return v.numel() if isinstance(v, torch.Tensor) else 0


class _Folder:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.g = gm, gm.graph
        self.zero: set[fx.Node] = set()
        self.modified = False

    def run(self) -> None:
        for node in list(self.g.nodes):
            if node.op != "call_function" or node.graph is not self.g:
                continue
            if self._zero_rule(node):
                continue
            self._fold(node)
        # a zero still read (by an op the rules above do not simplify) is stored as a constant
        for node in list(self.g.nodes):
            if node in self.zero and node.users and node.op == "call_function":
                v = val(node)
                with self.g.inserting_before(node):
                    const = add_const(
                        self.gm,
                        torch.zeros(v.shape, dtype=v.dtype, device=self._device()),
                        f"{node.name}_zeros",
                        like=node,
                    )
                node.replace_all_uses_with(const)
                self.modified = True
        self.g.eliminate_dead_code()

    def _device(self) -> torch.device:
        for node in self.g.nodes:
            t = const_value(self.gm, node)
            if t is not None:
                return t.device
        return torch.device("cpu")

    def _zero_rule(self, node: fx.Node) -> bool:
        """Track and simplify known zeros; True when NODE was handled."""
        args = node.args
        if _is_zero_maker(node):
            self.zero.add(node)
            return True
        if not isinstance(val(node), torch.Tensor):
            return False
        if is_op(node, *_ZERO_KEEPING) and args and args[0] in self.zero:
            self.zero.add(node)
            return True
        if is_op(node, aten.mul, aten.matmul, aten.bmm, aten.mm) and any(
            a in self.zero for a in args[:2]
        ):
            self.zero.add(node)
            return True
        if is_op(node, aten.cat) and all(a in self.zero for a in args[0]):
            self.zero.add(node)
            return True
        if is_op(node, aten.add, aten.sub) and node.kwargs.get("alpha", 1) == 1:
            a, b = args[0], args[1]
            keep = None
            if b in self.zero and isinstance(a, fx.Node) and _same_type(a, node):
                keep = a  # a + 0, a - 0
            elif is_op(node, aten.add) and a in self.zero and isinstance(b, fx.Node):
                keep = b if _same_type(b, node) else None  # 0 + b
            elif is_op(node, aten.sub) and a in self.zero and isinstance(b, fx.Node):
                if _same_type(b, node):  # 0 - b
                    with self.g.inserting_before(node):
                        keep = emit(self.g, aten.neg.default, (b,), like=node)
                    keep.meta["val"] = val(node)
            if keep is not None:
                node.replace_all_uses_with(keep)
                self.g.erase_node(node)
                self.modified = True
                return True
            if a in self.zero and b in self.zero:
                self.zero.add(node)
                return True
        return False

    def _fold(self, node: fx.Node) -> None:
        if not _pure_aten(node):
            return
        inputs = node.all_input_nodes
        if any(i.op != "get_attr" or const_value(self.gm, i) is None for i in inputs):
            return
        out = _numel(node)
        if inputs:
            largest = max(_numel(i) for i in inputs)
            if out > largest:
                return  # a broadcast copy: keep computing it
            for i in inputs:
                others = [u for u in i.users if u is not node]
                if others and min(out, _numel(i)) > _SHARED_COPY_LIMIT:
                    return  # the weight stays for its other readers: no second copy of it
        elif out > _CREATION_LIMIT:
            return

        def value(a):
            return const_value(self.gm, a) if isinstance(a, fx.Node) else a

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        device = self._device()
        if "device" in kwargs:  # a creation op follows the constants (meta for a weightless model)
            kwargs = {**kwargs, "device": device}
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            return
        if result.device != device and not inputs:
            result = result.to(device)
        with self.g.inserting_before(node):
            const = add_const(self.gm, result, f"{node.name}_folded", like=node)
        node.replace_all_uses_with(const)
        self.g.erase_node(node)
        self.modified = True


def fold_constants(gm: fx.GraphModule) -> PassResult:
    """Fold constant-only subgraphs into constants and drop arithmetic with known zeros."""
    folder = _Folder(gm)
    folder.run()
    if folder.modified:
        recompile(gm)
    return PassResult(gm, folder.modified)


def _foldable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """What the pass folds: a pure op on constants that copies no weight and grows nothing."""
    if not _pure_aten(node) or _is_zero_maker(node):
        return _is_zero_maker(node)
    inputs = node.all_input_nodes
    if any(i.op != "get_attr" for i in inputs):
        return False
    if not inputs:
        return _numel(node) <= _CREATION_LIMIT
    if _numel(node) > max(_numel(i) for i in inputs):
        return False
    return not any(
        any(u is not node for u in i.users) and min(_numel(node), _numel(i)) > _SHARED_COPY_LIMIT
        for i in inputs
    )


def postcondition(gm: fx.GraphModule) -> list[str]:
    """No op computes from constants alone what the pass would fold, and no zeros are made."""
    return [
        f"{n.name}: {n.target} computes from constants alone"
        for n in gm.graph.nodes
        if n.op == "call_function" and _foldable(gm, n)
    ]


register_pass(_PASS, lambda: fold_constants, postcondition)
