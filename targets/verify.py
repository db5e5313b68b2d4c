"""Verify an emitted package without a Mac: execute its program, compare with transformers.

The package's functions run on :mod:`anefx.targets.coreml_exec` (the Core ML program itself:
its ops and its weights, read from the package). A stateful package (``prefill`` + ``decode``
with the KV cache as state) is driven exactly as :class:`anefx.generation.Session` drives the
lowered graphs, states threaded from call to call; a single-function package runs once on the
whole sequence. transformers (fp32) generates N greedy tokens after the prompt; the package is
fed the same tokens (teacher forcing) and at every compared position its logits are measured
against transformers' (PSNR) and its top-1 token compared with transformers' next token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anefx.errors import AnefxInputError
from anefx.targets.coreml import read_spec

_LOGITS = "logits"


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    rmse = (ref - out).pow(2).mean().sqrt().item()
    return math.inf if rmse == 0 else 20 * math.log10(ref.abs().max().item() / rmse)


def _shape(feature) -> tuple[int, ...]:
    t = feature.type
    arr = t.stateType.arrayType if t.WhichOneof("Type") == "stateType" else t.multiArrayType
    return tuple(int(d) for d in arr.shape)


@dataclass
class PackageFunction:
    """One function of a package, with the interface Session expects of a lowered graph."""

    program: object
    name: str
    seq_len: int
    input_names: list[str]
    output_names: list[str]  # the logits: one (1, S, V) tensor, or slices (1, w, 1, S)
    logits_width: int  # the vocabulary the outputs cover
    states: list[dict] = field(default_factory=list)
    dtype: torch.dtype = torch.float16

    @property
    def graph_module(self):  # Session calls low.graph_module(ids, pos, mask, *states)
        return self

    @property
    def outputs(self) -> list[dict]:
        return [{"name": n} for n in self.output_names] if len(self.output_names) > 1 else []

    def __call__(self, ids, pos, mask, *states):
        feeds = {
            "input_ids": ids.numpy().astype(np.int32),
            "position_ids": pos.numpy().astype(np.int32),
            "causal_mask": mask.numpy().astype(np.float16),
        }
        names = [s["name"] for s in self.states]
        outs, new = self.program.run(
            self.name, feeds, {n: s.numpy() for n, s in zip(names, states, strict=True)}
        )
        logits = [
            torch.from_numpy(np.asarray(outs[n], dtype=np.float32)) for n in self.output_names
        ]
        return (*logits, *(torch.from_numpy(np.asarray(new[n])) for n in names))


def _logits_order(outputs: list[str]) -> list[str]:
    return sorted(outputs, key=lambda o: int(o.rsplit("_", 1)[1]) if "_" in o else 0)


def _logits_width(outputs: list[str], shapes: dict[str, tuple]) -> int:
    return sum(shapes[o][1] for o in outputs) if len(outputs) > 1 else shapes[outputs[0]][-1]


def _check_logits(path, name: str, outputs: list[str]) -> None:
    if not all(o.startswith(_LOGITS) for o in outputs):
        raise AnefxInputError(
            f"{path}: function {name} returns {outputs}; verify compares logits (a package "
            "emitted with --argmax returns token ids)"
        )


def chained_functions(path: Path) -> dict:
    """The functions of a chunked artifact (a folder with manifest.json), run part by part."""
    from anefx.targets.chunked import ChainProgram

    program = ChainProgram(path)
    out = {}
    for name in program.functions:
        final = program.final_outputs(name)
        shapes = {o["name"]: tuple(o["shape"]) for o in final}
        outputs = _logits_order(list(shapes))
        _check_logits(path, name, outputs)
        ids = next(
            inp
            for _, p in program.parts
            for inp in p["functions"][name]["inputs"]
            if inp["from"].get("model") == "input_ids"
        )
        out[name] = PackageFunction(
            program,
            name,
            ids["shape"][1],
            ["input_ids", "position_ids", "causal_mask"],
            outputs,
            _logits_width(outputs, shapes),
            [{"name": s["name"], "shape": s["shape"]} for s in program.states(name)],
        )
    return out


def package_functions(path: str | Path):
    """The package's functions as PackageFunction objects, by name; PATH is a package or the
    folder of a chunked artifact."""
    from anefx.targets.chunked import MANIFEST
    from anefx.targets.coreml_exec import load_package

    path = Path(path)
    if (path / MANIFEST).is_file():
        return chained_functions(path)
    if not (path / "Manifest.json").is_file():
        raise AnefxInputError(
            f"{path}: not a Core ML package (no Manifest.json in it) nor a chunked artifact "
            "(no manifest.json)"
        )
    try:
        spec = read_spec(path)
    except Exception as exc:  # coremltools raises several kinds for a damaged package
        raise AnefxInputError(f"{path}: cannot read the package: {exc}") from None
    program = load_package(path)
    desc = spec.description
    # a multifunction package describes each function; a single one has the top-level fields
    described = [(f.name, f) for f in desc.functions] or [("main", desc)]
    out = {}
    for name, fn in described:
        inputs = {f.name: _shape(f) for f in fn.input}
        if set(inputs) != {"input_ids", "position_ids", "causal_mask"}:
            raise AnefxInputError(
                f"{path}: function {name} has inputs {sorted(inputs)}, not anefx's"
            )
        shapes = {f.name: _shape(f) for f in fn.output}
        outputs = _logits_order(list(shapes))
        _check_logits(path, name, outputs)
        states = [{"name": f.name, "shape": list(_shape(f))} for f in fn.state]
        width = _logits_width(outputs, shapes)
        out[name] = PackageFunction(
            program, name, inputs["input_ids"][1], list(inputs), outputs, width, states
        )
    return out


@dataclass
class VerifyResult:
    package: str
    model: str
    functions: list[str]
    prompt_len: int
    steps: int
    psnr_db: float  # the lowest over every compared logits vector
    top1_agreement: float
    per_position_psnr_db: list[float]
    tokens_reference: list[int]
    tokens_package: list[int]
    wall_s: float

    def to_dict(self) -> dict:
        return dict(vars(self))

    def render(self) -> str:
        lines = [
            f"verify {self.package} ({', '.join(self.functions)}) against transformers fp32 on "
            f"{self.model}",
            f"  prompt {self.prompt_len} tokens, {self.steps} greedy steps (teacher-forced)",
            f"  logits PSNR: lowest {self.psnr_db:.1f} dB over "
            f"{len(self.per_position_psnr_db)} positions",
            f"  top-1 agreement: {self.top1_agreement:.3f}",
            f"  reference tokens {self.tokens_reference}",
            f"  package tokens   {self.tokens_package}",
            f"  {self.wall_s:.1f} s",
        ]
        return "\n".join(lines)


def verify(
    package: str | Path,
    model_spec,
    ids: list[int] | None = None,
    steps: int = 8,
    seed: int = 0,
) -> VerifyResult:
    """Run PACKAGE's program on IDS and N greedy steps; compare with transformers (fp32)."""
    from anefx.generation import Decoder, Session
    from anefx.models.load import load_model

    t0 = time.perf_counter()
    fns = package_functions(package)
    hf = load_model(model_spec, dtype=torch.float32, seed=seed).model
    vocab = hf.config.vocab_size
    _check_matches(package, fns, hf.config)
    if ids is None:
        ids = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
    if not ids or any(not 0 <= i < vocab for i in ids):
        raise AnefxInputError(f"--ids must be token ids in [0, {vocab})")
    if steps < 1:
        raise AnefxInputError("--steps must be at least 1")
    with torch.no_grad():
        full = hf.generate(
            torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )[0].tolist()
        ref = hf(input_ids=torch.tensor([full]), use_cache=False).logits[0]
    # position p's logits predict token p + 1: compare the last prompt position and each step
    n = len(ids)
    if "decode" in fns and "prefill" in fns:
        dec, pre = fns["decode"], fns["prefill"]
        context = dec.states[0]["shape"][2] if dec.states else None
        if context is None or len(full) - 1 > context:
            raise AnefxInputError(f"{package}: {len(full) - 1} tokens exceed the context {context}")
        session = Session(Decoder(pre, dec, context, pre.seq_len))
        # the prompt through prefill, then each following token through one decode step
        got = torch.cat([session.feed_all(ids), *(session.feed_all([t]) for t in full[n:-1])])
    elif "main" in fns:
        main = fns["main"]
        if len(full) - 1 > main.seq_len:
            raise AnefxInputError(
                f"{package}: prompt + steps = {len(full) - 1} tokens exceed its length "
                f"{main.seq_len}; use fewer --steps or a stateful package (--context)"
            )
        got = _run_stateless(main, full[:-1])
    else:
        raise AnefxInputError(f"{package}: functions {sorted(fns)}: not an anefx package")
    compared = range(n - 1, len(full) - 1)
    per = [_psnr(ref[p], got[p].float()) for p in compared]
    ref_top = [int(ref[p].argmax()) for p in compared]
    pkg_top = [int(got[p].argmax()) for p in compared]
    agree = sum(a == b for a, b in zip(ref_top, pkg_top, strict=True)) / len(ref_top)
    return VerifyResult(
        package=str(package),
        model=str(model_spec),
        functions=sorted(fns),
        prompt_len=n,
        steps=steps,
        psnr_db=min(per),
        top1_agreement=agree,
        per_position_psnr_db=[round(x, 2) for x in per],
        tokens_reference=ref_top,
        tokens_package=pkg_top,
        wall_s=round(time.perf_counter() - t0, 2),
    )


def _check_matches(package, fns: dict, config) -> None:
    """The package must have MODEL's shapes: vocabulary, and per layer a K and a V cache."""
    from anefx.models.capture import kv_cache_shape

    for fn in fns.values():
        problem = None
        if fn.logits_width != config.vocab_size:
            problem = (
                f"logits over {fn.logits_width} tokens, the model has a vocabulary of "
                f"{config.vocab_size}"
            )
        elif fn.states:
            context = fn.states[0]["shape"][2]
            want = [list(kv_cache_shape(config, context))] * (2 * config.num_hidden_layers)
            got = [s["shape"] for s in fn.states]
            if got != want:
                problem = (
                    f"its {len(got)} KV states are {sorted({tuple(g) for g in got})}; the model "
                    f"needs {len(want)} of {tuple(want[0])}"
                )
        if problem:
            raise AnefxInputError(f"{package} was not converted from this model: {problem}")


def _run_stateless(fn: PackageFunction, ids: list[int]) -> torch.Tensor:
    """(n, V) logits of a single-function package for IDS, padded to its length."""
    from anefx.models.capture import causal_mask

    s, n = fn.seq_len, len(ids)
    ids_t = torch.tensor([ids + [0] * (s - n)], dtype=torch.int32)
    pos = torch.arange(s, dtype=torch.int32)[None]
    out = fn(ids_t, pos, causal_mask(s, torch.float16))
    if len(fn.output_names) > 1:
        logits = torch.cat(list(out), dim=1).squeeze(2).transpose(1, 2)
    else:
        logits = out[0]
    return logits[0, :n]
