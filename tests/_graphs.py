"""Graph builders shared by the pass tests (not a test module).

Two sources of graphs:
  * small nn.Modules exported exactly as the capture exports a model (torch.export, then
    ``run_decompositions({})``, then ``unlift``), for patterns in isolation;
  * random Qwen3 models captured with ``capture`` and lowered step by step, with a snapshot of
    the graph each pipeline step received, so each pass is tested on the graph it expects.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from anefx.core.signature import (
    Input,
    Output,
    Role,
    Signature,
    join_logits,
    set_signature,
    signature_of,
)
from anefx.errors import AnefxGraphError
from anefx.lowering.pass_manager import Step, run_pipeline
from anefx.lowering.pipeline import build_pipeline
from anefx.lowering.shape_prop import propagate_shapes
from anefx.models.capture import capture, causal_mask, unlift
from anefx.models.presets import get_preset
from anefx.models.synthetic import random_model

aten = torch.ops.aten


# -- exported toy graphs ------------------------------------------------------------------------


def export_graph(module: torch.nn.Module, *args: torch.Tensor) -> fx.GraphModule:
    """MODULE captured the way models/capture.py captures a model, with shapes propagated."""
    with torch.no_grad():
        ep = torch.export.export(module.eval(), args, strict=False)
    gm, _ = unlift(ep.run_decompositions({}))
    propagate_shapes(gm)
    return gm


# the layouts a toy graph's tensors are declared in, by role (as capture declares a model's)
_AXES = {
    Role.TOKENS: ("B", "S"),
    Role.POSITIONS: ("B", "S"),
    Role.MASK: ("B", "1", "S", "T"),
    Role.LOGITS: ("B", "S", "V"),
}


def declare(
    gm: fx.GraphModule, inputs: dict[str, Role] | None = None, outputs: list[Role] | None = None
) -> fx.GraphModule:
    """Give a toy graph the signature capture gives a model: INPUTS (placeholder name ->
    role; the others are hidden values) and OUTPUTS (roles, in the output's order)."""

    def spec(node: fx.Node, kind, name: str, role: Role, **extra):
        v = node.meta["val"]
        axes = _AXES.get(role) or tuple(f"a{i}" for i in range(v.dim()))
        dtype = str(v.dtype).removeprefix("torch.")
        return kind(name, role, tuple(v.shape), dtype, axes, **extra)

    roles = inputs or {}
    ins = tuple(
        spec(n, Input, n.name, roles.get(n.name, Role.HIDDEN))
        for n in gm.graph.nodes
        if n.op == "placeholder"
    )
    values = gm.graph.output_node().args[0]
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    outs = []
    for i, role in enumerate(outputs or []):
        extra = {"vocab": (0, values[i].meta["val"].shape[-1])} if role == Role.LOGITS else {}
        outs.append(spec(values[i], Output, f"output_{i}", role, **extra))
    set_signature(gm, Signature(inputs=ins, outputs=tuple(outs)))
    return gm


@functools.lru_cache(maxsize=64)
def exported(build, *params) -> fx.GraphModule:
    """export_graph(*build(*params)), once per BUILD and PARAMS: treat the result as read-only."""
    return export_graph(*build(*params))


def fresh(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy of GM (weights included) with shapes recomputed."""
    out = copy.deepcopy(gm)
    out.recompile()
    propagate_shapes(out)
    return out


def run(gm: fx.GraphModule, *args: torch.Tensor):
    with torch.no_grad():
        return gm(*args)


def count(gm: fx.GraphModule, *targets) -> int:
    """Number of call_function nodes of GM whose target is one of TARGETS (or their packets)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if any(t is x or getattr(t, "overloadpacket", None) is x for x in targets):
            n += 1
    return n


def max_rank(gm: fx.GraphModule) -> int:
    """Largest rank of any tensor value (meta ``val``) in GM, tuples included."""
    best = 0
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        vals = v if isinstance(v, (tuple, list)) else [v]
        for x in vals:
            if isinstance(x, torch.Tensor):
                best = max(best, x.dim())
    return best


class RMSNorm(torch.nn.Module):
    """transformers' Qwen3RMSNorm, verbatim arithmetic (fp32 up-cast included)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


class NormBlock(torch.nn.Module):
    """RMSNorm inside a little residual block, applied twice (two matches, shared input)."""

    def __init__(self, dim: int, eps: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n1 = RMSNorm(1 + 0.1 * torch.randn(dim, generator=g), eps)
        self.n2 = RMSNorm(1 + 0.1 * torch.randn(dim, generator=g), eps)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5)

    def forward(self, x):
        h = x + torch.nn.functional.linear(self.n1(x), self.w)
        return self.n2(h) * 2.0


class AlmostRMSNorm(torch.nn.Module):
    """Looks like RMSNorm but normalises over the second-to-last axis: not the pattern."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        var = x.pow(2).mean(-2, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + 1e-6))


class PlainMLP(torch.nn.Module):
    """Dense layers and activations only: no norm, no position input, no rank-5 value."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = torch.nn.Linear(dim, hidden, bias=bias)
        self.down = torch.nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x))) + x


class Elementwise(torch.nn.Module):
    """Already clean: nothing to remove, no dense layer, no layout change, no position."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(-1.0, 1.0, dim))

    def forward(self, x, y):
        return torch.sigmoid(x * self.scale + y) - torch.tanh(y)


class Noisy(torch.nn.Module):
    """Every kind of no-op the clean-up pass removes, around a little real arithmetic."""

    def forward(self, x):
        a = x.clone().detach()
        b = a.to(torch.float32) * 1.0 + 0.0
        c = b.view(-1).view(x.shape).contiguous()
        d = c.permute(0, 1, 2).transpose(1, 1)
        e = torch.cos(d) + torch.cos(d)  # two equal nodes: CSE merges them
        f = e.reshape(x.shape[0], -1).reshape(x.shape)
        unused = torch.sin(x)  # noqa: F841  (dead code)
        return f / 1.0 + a[:, :, :]


class Attention(torch.nn.Module):
    """Scaled dot-product attention with transformers' repeat_kv (rank 5 when n_rep > 1)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = heads * head_dim
        self.heads, self.kv, self.d = heads, kv_heads, head_dim
        self.wq = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5)
        self.wk = torch.nn.Parameter(torch.randn(kv_heads * head_dim, dim, generator=g) / dim**0.5)
        self.wv = torch.nn.Parameter(torch.randn(kv_heads * head_dim, dim, generator=g) / dim**0.5)

    @staticmethod
    def repeat_kv(x, n_rep):
        b, h, s, d = x.shape
        if n_rep == 1:
            return x
        x = x[:, :, None, :, :].expand(b, h, n_rep, s, d)
        return x.reshape(b, h * n_rep, s, d)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = torch.nn.functional.linear(x, self.wq).view(b, s, self.heads, self.d).transpose(1, 2)
        k = torch.nn.functional.linear(x, self.wk).view(b, s, self.kv, self.d).transpose(1, 2)
        v = torch.nn.functional.linear(x, self.wv).view(b, s, self.kv, self.d).transpose(1, 2)
        k = self.repeat_kv(k, self.heads // self.kv)
        v = self.repeat_kv(v, self.heads // self.kv)
        w = torch.matmul(q, k.transpose(2, 3)) * self.d**-0.5 + mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).transpose(1, 2).reshape(b, s, -1)
        return o


class ConvHead(torch.nn.Module):
    """A channels-first 1x1-conv head of WIDTH outputs, left as (1, S, WIDTH) logits."""

    def __init__(self, channels: int, width: int, seed: int, to_output: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(width, channels, 1, 1, generator=g) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(width, generator=g) * 0.1)
        self.to_output = to_output

    def forward(self, x):  # x: (1, C, 1, S)
        y = torch.nn.functional.conv2d(x, self.w, self.b)
        if not self.to_output:  # the wide conv feeds more arithmetic: slices are concatenated
            return torch.softmax(y, dim=1).sum(dim=1, keepdim=True) + y.mean(dim=1, keepdim=True)
        return y.permute(0, 2, 3, 1).reshape(1, x.shape[-1], -1)


class PositionMLP(torch.nn.Module):
    """Takes a tensor named like a position input but computes nothing from it alone."""

    def forward(self, x, position_scale):
        return torch.relu(x) * position_scale


class PositionsRowwise(torch.nn.Module):
    """A cos/sin of positions, like rotary embeddings, but without any trainable weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (100.0 ** (torch.arange(0, dim, 2) / dim)))

    def forward(self, x, position_ids):
        f = position_ids[:, :, None].float() * self.inv_freq
        emb = torch.cat([f, f], dim=-1)
        return x * emb.cos() + x.flip(-1) * emb.sin()


# -- captured Qwen3 models ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A small random Qwen3 model and the inputs to feed it. Hashable: captures are cached."""

    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 64
    vocab: int = 256
    layers: int = 1
    seq: int = 8
    eps: float = 1e-6
    tied: bool = True
    bias: bool = False
    seed: int = 0
    # added to every embedding row: hidden states then have a large non-zero mean
    shift: float = 0.0
    dtype: torch.dtype = torch.float32

    def config(self) -> dict:
        cfg = get_preset("qwen3-tiny")
        cfg.update(
            hidden_size=self.hidden,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            num_hidden_layers=self.layers,
            max_window_layers=self.layers,
            rms_norm_eps=self.eps,
            tie_word_embeddings=self.tied,
            attention_bias=self.bias,
        )
        return cfg


def build_model(spec: ModelSpec) -> torch.nn.Module:
    model = random_model(spec.config(), spec.dtype, spec.seed)
    if spec.shift:
        with torch.no_grad():
            model.get_input_embeddings().weight.add_(spec.shift)
    return model


@dataclass
class Lowered:
    """A captured model and the graph each pipeline step received (shapes propagated)."""

    spec: ModelSpec
    model: torch.nn.Module
    steps: list[Step]
    inputs: dict[str, fx.GraphModule] = field(default_factory=dict)
    final: fx.GraphModule | None = None
    # the first AnefxGraphError the verified pipeline raised, if any (later steps then ran
    # unverified so that every pass still has its input graph)
    error: str | None = None

    def before(self, name: str) -> fx.GraphModule:
        """A fresh copy of the graph the step NAME received."""
        return fresh(self.inputs[name])

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


def _snapshotting(step: Step, into: dict[str, fx.GraphModule]) -> Step:
    def run_step(gm: fx.GraphModule):
        gm.recompile()
        propagate_shapes(gm)  # the manager skips this when verify=False
        into[step.name] = copy.deepcopy(gm)
        return step.run(gm)

    return Step(step.name, run_step, step.postcondition, step.reason)


@functools.lru_cache(maxsize=48)
def lowered(spec: ModelSpec) -> Lowered:
    """Capture SPEC's model and run the pipeline, keeping every step's input graph."""
    model = build_model(spec)
    gm = capture(model, spec.seq).graph_module
    propagate_shapes(gm)
    steps = build_pipeline(spec.dtype)
    out = Lowered(spec, model, steps)
    wrapped = [_snapshotting(s, out.inputs) for s in steps]
    try:
        out.final, _ = run_pipeline(copy.deepcopy(gm), wrapped)
    except AnefxGraphError as exc:
        out.error = str(exc)
        failed = max(i for i, s in enumerate(steps) if s.name in out.inputs)
        out.final, _ = run_pipeline(
            fresh(out.inputs[steps[failed].name]), wrapped[failed:], verify=False
        )
    return out


@functools.lru_cache(maxsize=8)
def captured(spec: ModelSpec) -> tuple[torch.nn.Module, fx.GraphModule]:
    """SPEC's model and its freshly captured graph (no pass run)."""
    model = build_model(spec)
    gm = capture(model, spec.seq).graph_module
    propagate_shapes(gm)
    return model, gm


def model_inputs(
    spec: ModelSpec, seed: int, max_position: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random token ids, random positions in [0, MAX_POSITION) (default S), causal mask."""
    g = torch.Generator().manual_seed(seed)
    s = spec.seq
    ids = torch.randint(0, spec.vocab, (1, s), generator=g, dtype=torch.int32)
    pos = torch.randint(0, max_position or s, (1, s), generator=g, dtype=torch.int32)
    return ids, pos, causal_mask(s, spec.dtype)


def as_logits(out, gm: fx.GraphModule) -> torch.Tensor:
    """(1, S, V) logits of GM from its outputs OUT (split_lm_head's slices or one tensor)."""
    values = list(out) if isinstance(out, (tuple, list)) else [out]
    sig = signature_of(gm)
    picked = [(o, values[i]) for i, o in enumerate(sig.outputs) if o.role == Role.LOGITS]
    return join_logits([v for _, v in picked], [o for o, _ in picked])
