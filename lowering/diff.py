"""Per-layer parity: transformers vs the lowered graph, stage by stage, first bad stage named.

Stages: the embedding output, each decoder layer's output (the residual stream after it), the
final norm, the logits. transformers' values come from forward hooks on those modules; the
lowered graph's from the last node each stage's module produced (its ``anefx_module``), read
back in the (1, S, C) layout through the axis map the layout pass recorded on that node. A
stage passes at or above its dtype's threshold; a NaN never passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from anefx.core.annotations import MODULE
from anefx.core.signature import to_logical
from anefx.errors import AnefxGraphError, AnefxInputError
from anefx.models.families import family_of
from anefx.progress import Progress, quiet

# a stage is bad below this PSNR (dB), per lowered dtype: fp32 should agree to rounding level,
# fp16 to the precision of its datapath (healthy models: 60-80 dB per stage here)
DEFAULT_MIN_PSNR = {torch.float32: 80.0, torch.float16: 50.0}


def json_safe(value):
    """VALUE with every NaN or infinite float replaced by None: JSON has no such numbers
    (``json.dumps`` would write the invalid tokens NaN and Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def below(psnr_db: float, threshold: float) -> bool:
    """Whether a stage fails THRESHOLD; NaN (no comparison with it is true) always fails."""
    return not psnr_db >= threshold


@dataclass
class StageDiff:
    stage: str
    max_abs: float
    psnr_db: float
    cosine: float


@dataclass
class DiffResult:
    """Per dtype: the stages with their errors, the threshold, and the first stage below it."""

    model: str
    seq_len: int
    stages: list[str]
    by_dtype: dict[str, list[StageDiff]] = field(default_factory=dict)
    min_psnr: dict[str, float] = field(default_factory=dict)
    first_bad: dict[str, str | None] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every stage of every dtype at or above its threshold."""
        return not any(self.first_bad.values())

    def to_dict(self) -> dict:
        """The result as JSON-ready data (NaN and infinite numbers as null)."""
        return json_safe(
            {
                "model": self.model,
                "seq_len": self.seq_len,
                "stages": self.stages,
                "min_psnr_db": self.min_psnr,
                "first_bad_stage": self.first_bad,
                "results": {d: [vars(s) for s in diffs] for d, diffs in self.by_dtype.items()},
            }
        )

    def render(self) -> str:
        dtypes = list(self.by_dtype)
        head = f"  {'stage':<28}" + "".join(
            f" | {d + ' max abs':>14} {'PSNR dB':>8} {'cosine':>9}" for d in dtypes
        )
        lines = [f"per-stage parity of {self.model} against transformers fp32 (S={self.seq_len})"]
        lines += [head, "  " + "-" * (len(head) - 2)]
        for i, stage in enumerate(self.stages):
            cells = ""
            for d in dtypes:
                s = self.by_dtype[d][i]
                flag = "<" if below(s.psnr_db, self.min_psnr[d]) else " "
                cells += f" | {s.max_abs:14.3e} {s.psnr_db:7.1f}{flag} {s.cosine:9.6f}"
            lines.append(f"  {stage:<28}{cells}")
        lines.append("")
        for d in dtypes:
            bad = self.first_bad[d]
            if bad:
                s = next(x for x in self.by_dtype[d] if x.stage == bad)
                lines.append(
                    f"  {d}: first stage below {self.min_psnr[d]:g} dB: {bad} "
                    f"(PSNR {s.psnr_db:.1f} dB, max abs {s.max_abs:.3e})"
                )
            else:
                lines.append(f"  {d}: every stage at or above {self.min_psnr[d]:g} dB")
        return "\n".join(lines)


def compare(ref: torch.Tensor, out: torch.Tensor, stage: str) -> StageDiff:
    ref, out = ref.double().flatten(), out.double().flatten()
    err = out - ref
    rmse = err.pow(2).mean().sqrt().item()
    peak = ref.abs().max().item()
    psnr = math.inf if rmse == 0 else 20 * math.log10(max(peak, 1e-30) / rmse)
    denom = (ref.norm() * out.norm()).item()
    cosine = (ref @ out).item() / denom if denom else 1.0
    return StageDiff(stage, err.abs().max().item(), psnr, cosine)


def stage_modules(config) -> list[str]:
    """The modules compared, as CONFIG's family names them: embedding, each decoder layer,
    final norm, head."""
    return family_of(config).stage_modules(config.num_hidden_layers)


def reference_stages(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' own values at each stage (forward hooks), (1, S, C) each."""
    seen: dict[str, torch.Tensor] = {}
    names = stage_modules(model.config)
    handles = []
    modules = dict(model.named_modules())
    for name in names:

        def hook(_mod, _inp, out, name=name):
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _stage_nodes(gm: fx.GraphModule, names: list[str]) -> dict[str, fx.Node]:
    """The last node of each stage module in the lowered graph (logits: the outputs)."""
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        module = node.meta.get(MODULE)
        if module in names and node.op == "call_function":
            last[module] = node
    missing = [n for n in names[:-1] if n not in last]
    if missing:
        raise AnefxGraphError(f"no node of {missing[0]} in the lowered graph to compare")
    return last


def _logical(value: torch.Tensor, node: fx.Node, seq: int, width: int) -> torch.Tensor:
    """A stage value (NODE's, in the layout the passes chose) as (1, S, C): read back through
    the axis map the layout pass recorded on NODE (anefx.core.signature), never from shapes."""
    logical = to_logical(value, node)
    if tuple(logical.shape) != (1, seq, width):
        raise AnefxGraphError(
            f"stage node {node.name} holds {tuple(logical.shape)} in its logical layout, not "
            f"(1, {seq}, {width})"
        )
    return logical


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def lowered_stages(low, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The lowered graph's values at each stage for IDS (1, S), (1, S, C) each, in fp32."""
    gm = low.graph_module
    cfg = low.config
    names = stage_modules(cfg)
    nodes = _stage_nodes(gm, names)
    seq = low.seq_len
    n = ids.shape[1]
    rec = _Recorder(gm, set(nodes.values()))
    with torch.no_grad():
        out = rec.run(*low.inputs(ids))
    values = {}
    for name in names[:-1]:
        node = nodes[name]
        values[name] = _logical(rec.values[node], node, seq, cfg.hidden_size)[:, :n].float()
    values[names[-1]] = low.logits(out)[:, :n].float()
    return values


def diff(
    model_spec,
    ids: list[int] | None = None,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16),
    min_psnr: dict[torch.dtype, float] | None = None,
    lowered: dict | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> DiffResult:
    """Compare transformers (fp32) with the lowered graph in each of DTYPES, stage by stage.

    LOWERED optionally maps a dtype to an already lowered graph (tests plant faults in one).
    PROGRESS (stderr, for the CLI) says each stage.
    """
    import anefx
    from anefx.models.load import load_model

    say = progress or quiet()
    say(f"loading {model_spec} in float32 with transformers (the reference)")
    loaded = load_model(model_spec, dtype=torch.float32, seed=seed)
    model, cfg = loaded.model, loaded.config
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist()
    if not ids or any(not 0 <= i < cfg.vocab_size for i in ids):
        raise AnefxInputError(f"--ids must be token ids in [0, {cfg.vocab_size})")
    ids_t = torch.tensor([ids])
    seq = len(ids)
    say(f"transformers: the hidden states of {cfg.num_hidden_layers + 3} stages")
    ref = reference_stages(model, ids_t)
    names = stage_modules(cfg)
    kinds = family_of(cfg).layer_kinds(cfg)  # a hybrid's layers say which kind they are
    layers = [f"{n} ({k})" if k else n for n, k in zip(names[1:-2], kinds, strict=True)]
    stages = ["embedding", *layers, "final norm", "logits"]
    thresholds = {**DEFAULT_MIN_PSNR, **(min_psnr or {})}
    result = DiffResult(str(model_spec), seq, stages)
    for i, dtype in enumerate(dtypes):
        key = str(dtype).replace("torch.", "")
        say(f"{key} ({i + 1}/{len(dtypes)}): lowering and running the lowered graph")
        low = (lowered or {}).get(dtype) or anefx.lower(model, seq_len=seq, dtype=dtype)
        got = lowered_stages(low, ids_t)
        diffs = [
            compare(ref[name], got[name], stage) for name, stage in zip(names, stages, strict=True)
        ]
        result.by_dtype[key] = diffs
        result.min_psnr[key] = thresholds[dtype]
        result.first_bad[key] = next(
            (d.stage for d in diffs if below(d.psnr_db, thresholds[dtype])), None
        )
    return result
