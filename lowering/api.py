"""``anefx.lower``: load, capture, lower and check a model; run the lowered graph in torch."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from anefx.core import rules
from anefx.core.signature import Role, Signature, State, join_logits, signature_of
from anefx.errors import AnefxInputError
from anefx.lowering.checker import Report, check_graph
from anefx.lowering.pass_manager import PassLog, pipeline_stats, run_pipeline
from anefx.lowering.pipeline import build_pipeline
from anefx.lowering.shape_prop import propagate_shapes
from anefx.models.capture import capture, causal_mask
from anefx.models.families import known_family

SUPPORTED_DTYPES = (torch.float16, torch.float32)


@dataclass
class Lowered:
    """A lowered model: the fx graph, its ANE report, and a way to run it."""

    graph_module: fx.GraphModule
    report: Report
    captured_report: Report | None
    source: str
    random_weights: bool
    seq_len: int
    dtype: torch.dtype
    meta: bool
    config: object
    log: PassLog
    seconds: dict[str, float] = field(default_factory=dict)
    context: int | None = None
    exported_layers: int | None = None  # how many decoder layers export traced (the rest repeated)

    @property
    def signature(self) -> Signature:
        """What the graph takes and returns: inputs, outputs, states (anefx.core.signature)."""
        return signature_of(self.graph_module)

    @property
    def states(self) -> tuple[State, ...]:
        """The KV-cache states, empty for a stateless graph."""
        return self.signature.states

    def inputs(self, input_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured graph's inputs for (1, S) ids: ids padded at the end to the captured
        length, positions 0.., the causal mask."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise AnefxInputError(f"input_ids must have shape (1, S), got {tuple(ids.shape)}")
        n = ids.shape[1]
        if n > self.seq_len:
            raise AnefxInputError(f"{n} tokens exceed the captured length {self.seq_len}")
        ids = torch.nn.functional.pad(ids.to(torch.int32), (0, self.seq_len - n))
        pos = torch.arange(self.seq_len, dtype=torch.int32)[None]
        return ids, pos, causal_mask(self.seq_len, self.dtype)

    def run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (1, S, vocab) for a (1, S) id tensor; S up to the captured length.

        Shorter inputs are padded at the end: the causal mask keeps the padding out of the
        real positions, and only their logits are returned.
        """
        if self.meta:
            raise AnefxInputError("a model lowered with --meta has no weights to run")
        if self.states:
            raise AnefxInputError("a stateful graph runs through anefx.generation.Session")
        if self.signature.chooses_token:
            raise AnefxInputError("this graph returns token ids, not logits (lowered with argmax)")
        ids, pos, default_mask = self.inputs(input_ids)
        n = torch.as_tensor(input_ids).shape[-1]
        if position_ids is not None:
            pos = position_ids.to(torch.int32)
        mask = default_mask if mask is None else mask.to(self.dtype)
        with torch.no_grad():
            out = self.graph_module(ids, pos, mask)
        return self.logits(out)[:, :n]

    def logits(self, out) -> torch.Tensor:
        """(1, S, V) logits from the graph's outputs OUT (its states' new values may follow)."""
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        sig = self.signature
        picked = [(o, values[i]) for i, o in enumerate(sig.outputs) if o.role == Role.LOGITS]
        return join_logits([v for _, v in picked], [o for o, _ in picked])


def lower(
    model,
    seq_len: int = 64,
    dtype: torch.dtype | None = torch.float16,
    meta: bool = False,
    seed: int = 0,
    raw_report: bool = False,
    context: int | None = None,
    argmax: bool = False,
    repeat: bool = True,
) -> Lowered:
    """Load MODEL (folder, ``preset:NAME``, a LoadedModel or a transformers model), capture,
    lower, check.

    With CONTEXT the graph holds a KV cache of that many positions as state (its signature's
    ``states``); the rotary tables cover it.
    REPEAT=False exports every decoder layer instead of repeating the first ones in the graph.
    """
    from anefx.models.load import LoadedModel, load_model

    dtype = dtype or torch.float16
    if dtype not in SUPPORTED_DTYPES:
        raise AnefxInputError(f"dtype must be float16 or float32, got {dtype}")
    if not isinstance(seq_len, int) or seq_len < 1 or seq_len > rules.DIM_LIMITS["W"]:
        raise AnefxInputError(f"--seq must be between 1 and {rules.DIM_LIMITS['W']}: {seq_len}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(model, torch.nn.Module):
        hf = model.eval()
        if next(model.parameters()).dtype != dtype:
            # parameters only: rotary buffers stay fp32, as transformers keeps them
            hf = copy.deepcopy(model)
            for p in hf.parameters():
                p.data = p.data.to(dtype)
        source, random_weights, config = type(model).__name__, False, model.config
        meta = next(model.parameters()).is_meta
    else:
        loaded = model if isinstance(model, LoadedModel) else None
        if loaded is None or loaded.dtype != dtype or loaded.meta != meta:
            spec = loaded.source if loaded is not None else model
            loaded = load_model(spec, dtype=dtype, meta=meta, seed=seed)
        hf, source, random_weights, config = (
            loaded.model,
            loaded.source,
            loaded.random_weights,
            loaded.config,
        )
    seconds["load"] = time.perf_counter() - t0
    cap = capture(hf, seq_len=seq_len, meta=meta, context=context, repeat=repeat)
    seconds.update(cap.seconds)
    gm = cap.graph_module
    t0 = time.perf_counter()
    propagate_shapes(gm)
    stats = {"model": source, "seq_len": seq_len, "dtype": str(dtype).replace("torch.", "")}
    captured_report = check_graph(gm, "captured", stats) if raw_report else None
    steps = build_pipeline(dtype=dtype, table_len=context or seq_len, argmax=argmax)
    gm, log = run_pipeline(gm, steps)
    seconds["passes"] = log.seconds
    stats["lm_head_slices"] = len(signature_of(gm).logits) or 1
    stats.update(pipeline_stats(gm, steps))
    if context:
        stats["context"] = context
    family = known_family(config)
    substituted = family.substitutions if family else ()
    if substituted:  # what capture computed with its own code in place of transformers'
        stats["substitutions"] = list(substituted)
    report = check_graph(gm, "lowered", stats)
    seconds["check"] = time.perf_counter() - t0 - log.seconds
    return Lowered(
        graph_module=gm,
        report=report,
        captured_report=captured_report,
        source=source,
        random_weights=random_weights,
        seq_len=seq_len,
        dtype=dtype,
        meta=meta,
        config=config,
        log=log,
        seconds=seconds,
        context=context,
        exported_layers=cap.exported_layers,
    )
