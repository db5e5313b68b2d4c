"""Verify an emitted package without a Mac: execute its program, compare with transformers.

The package's functions run on :mod:`anefx.targets.coreml_exec` (the Core ML program itself:
its ops and its weights, read from the package). A stateful package (``prefill`` + ``decode``
with the KV cache as state) is driven exactly as :class:`anefx.generation.Session` drives the
lowered graphs, states threaded from call to call; a single-function package runs once on the
whole sequence. transformers (fp32) generates N greedy tokens after the prompt; the package is
fed the same tokens (teacher forcing) and at every compared position its logits are measured
against transformers' (PSNR) and its top-1 token compared with transformers' next token.

Before anything runs, the artifact is checked (:mod:`anefx.targets.reader`): a package's files
against the sha256 its anefx report lists, a parts folder's parts against its manifest, every
shape against the bounds; then the prompt and the steps against the artifact's context (or the
package's length), before transformers is loaded. The artifact passes when its lowest logits
PSNR reaches ``min_psnr`` and its top-1 agreement ``min_top1``; a NaN never passes.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anefx.errors import AnefxInputError
from anefx.lowering.diff import json_safe
from anefx.models.limits import MAX_STATE_BYTES, MAX_STEPS, MAX_VOCAB
from anefx.progress import Progress, quiet

# a package passes at or above both (fp16 packages of the presets: 60-80 dB, agreement 1.0;
# the README's 8-bit palettized 0.6B, 42.5 dB, does not)
DEFAULT_MIN_PSNR_DB = 50.0
DEFAULT_MIN_TOP1 = 0.9
DEFAULT_PROMPT_LEN = 16  # random prompt ids when none are given
_LOGITS = re.compile(r"logits(_[0-9]+)?")
_MODEL_INPUTS = ("input_ids", "position_ids", "causal_mask")


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    rmse = (ref - out).pow(2).mean().sqrt().item()
    return math.inf if rmse == 0 else 20 * math.log10(ref.abs().max().item() / rmse)


def verdict(psnr_db: float, top1: float, min_psnr: float, min_top1: float) -> bool:
    """Whether both measures reach their thresholds. Written as ``>=`` comparisons, which are
    false for NaN: a NaN measure never passes."""
    return bool(psnr_db >= min_psnr and top1 >= min_top1)


def lowest(values: list[float]) -> float:
    """The lowest of VALUES; NaN if any is NaN (min() would pass over it: every comparison
    with a NaN is false)."""
    return math.nan if any(math.isnan(v) for v in values) else min(values)


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


def _logits_layout(path, name: str, outputs: dict[str, tuple], seq: int) -> tuple[list[str], int]:
    """The logits outputs in vocabulary order and the vocabulary they cover: one (1, S, V)
    tensor or slices (1, w, 1, S) named logits_<i>; anything else is refused."""
    if not outputs or not all(_LOGITS.fullmatch(o) for o in outputs):
        raise AnefxInputError(
            f"{path}: function {name} returns {sorted(outputs)}; verify and generate need logits "
            "(a package emitted with --argmax returns token ids)"
        )
    if len(outputs) == 1:
        ((out, shape),) = outputs.items()
        if len(shape) != 3 or shape[:2] != (1, seq):
            raise AnefxInputError(
                f"{path}: function {name}: output {out} has shape {list(shape)}, expected "
                f"(1, {seq}, vocabulary)"
            )
        order, width = [out], shape[2]
    else:
        order = sorted(outputs, key=lambda o: int(o.rsplit("_", 1)[1]) if "_" in o else -1)
        for out in order:
            shape = outputs[out]
            if len(shape) != 4 or (shape[0], shape[2], shape[3]) != (1, 1, seq):
                raise AnefxInputError(
                    f"{path}: function {name}: logits slice {out} has shape {list(shape)}, "
                    f"expected (1, width, 1, {seq})"
                )
        width = sum(outputs[o][1] for o in order)
    if width > MAX_VOCAB:
        raise AnefxInputError(
            f"{path}: function {name}: logits over {width} tokens, above the {MAX_VOCAB} anefx "
            "reads (MAX_VOCAB, models/limits.py)"
        )
    return order, width


def _function(
    path, program, name: str, inputs: dict, outputs: dict, states: list
) -> PackageFunction:
    """A PackageFunction of PROGRAM after checking its signature (name -> shape each) is
    anefx's: the three model inputs, logits, and KV states of one context within the bounds."""
    if set(inputs) != set(_MODEL_INPUTS):
        raise AnefxInputError(
            f"{path}: function {name} has inputs {sorted(inputs)}, not anefx's "
            f"({', '.join(_MODEL_INPUTS)})"
        )
    ids = inputs["input_ids"]
    if len(ids) != 2 or ids[0] != 1 or ids[1] < 1 or inputs["position_ids"] != ids:
        raise AnefxInputError(
            f"{path}: function {name}: input_ids {list(ids)} and position_ids "
            f"{list(inputs['position_ids'])}, expected both (1, S)"
        )
    seq = ids[1]
    context, total = None, 0
    for sname, shape in states:
        if len(shape) != 4 or min(shape) < 1 or context not in (None, shape[2]):
            raise AnefxInputError(
                f"{path}: function {name}: state {sname} has shape {list(shape)}, expected "
                f"(1, kv_heads, {context or 'context'}, head_dim) as every KV state"
            )
        context = shape[2]
        total += 2 * math.prod(shape)
    if total > MAX_STATE_BYTES:
        raise AnefxInputError(
            f"{path}: function {name}: its states hold {total / 1e9:.1f} GB, above the "
            f"{MAX_STATE_BYTES / 1e9:.1f} GB anefx allocates (MAX_STATE_BYTES, models/limits.py)"
        )
    mask = inputs["causal_mask"]
    if len(mask) != 4 or mask[:3] != (1, 1, seq) or (context and mask[3] != context):
        raise AnefxInputError(
            f"{path}: function {name}: causal_mask has shape {list(mask)}, expected "
            f"(1, 1, {seq}, {context or 'S'})"
        )
    order, width = _logits_layout(path, name, outputs, seq)
    return PackageFunction(
        program,
        name,
        seq,
        list(_MODEL_INPUTS),
        order,
        width,
        [{"name": n, "shape": list(s)} for n, s in states],
    )


def package_functions(path: str | Path) -> dict[str, PackageFunction]:
    """The functions of the artifact at PATH (a package, or a parts folder run part by part)
    as PackageFunction objects, by name; the artifact is checked against its digests first."""
    from anefx.targets.coreml_exec import load_package
    from anefx.targets.reader import ChainProgram, artifact_kind, check_package

    path = Path(path)
    sigs = {}
    if artifact_kind(path) == "parts":
        program = ChainProgram(path)
        for fn in program.functions:
            inputs = {
                inp["from"]["model"]: tuple(inp["shape"])
                for _, p in program.parts
                for inp in p["functions"][fn]["inputs"]
                if "model" in inp["from"]
            }
            outputs = {o["name"]: tuple(o["shape"]) for o in program.final_outputs(fn)}
            states = [(s["name"], tuple(s["shape"])) for s in program.states(fn)]
            sigs[fn] = (inputs, outputs, states)
    else:
        check_package(path)
        program = load_package(path)
        for fn, f in program.functions.items():
            sigs[fn] = (
                {t.name: t.shape for t in f.inputs},
                {t.name: t.shape for t in f.outputs},
                [(t.name, t.shape) for t in f.states],
            )
    return {fn: _function(path, program, fn, *sig) for fn, sig in sigs.items()}


@dataclass
class VerifyResult:
    package: str
    model: str
    functions: list[str]
    prompt_len: int
    steps: int
    psnr_db: float  # the lowest over every compared logits vector (NaN if any is NaN)
    top1_agreement: float
    per_position_psnr_db: list[float]
    tokens_reference: list[int]
    tokens_package: list[int]
    wall_s: float
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    min_top1: float = DEFAULT_MIN_TOP1
    passed: bool = False

    def to_dict(self) -> dict:
        """The fields, with NaN and infinite numbers as null (valid JSON)."""
        return json_safe(dict(vars(self)))

    def render(self) -> str:
        below = []
        if not self.psnr_db >= self.min_psnr_db:
            below.append(f"lowest PSNR {self.psnr_db:.1f} dB < --min-psnr {self.min_psnr_db:g}")
        if not self.top1_agreement >= self.min_top1:
            below.append(f"top-1 {self.top1_agreement:.3f} < --min-top1 {self.min_top1:g}")
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
            f"  passed (PSNR >= {self.min_psnr_db:g} dB, top-1 >= {self.min_top1:g})"
            if self.passed
            else f"  FAILED: {'; '.join(below)}",
        ]
        return "\n".join(lines)


def verify(
    package: str | Path,
    model_spec,
    ids: list[int] | None = None,
    steps: int = 8,
    seed: int = 0,
    min_psnr: float = DEFAULT_MIN_PSNR_DB,
    min_top1: float = DEFAULT_MIN_TOP1,
    progress: Progress | None = None,
) -> VerifyResult:
    """Run PACKAGE's program on IDS and N greedy steps; compare with transformers (fp32).

    The artifact, IDS and STEPS are checked before transformers is loaded; the result
    ``passed`` when the lowest PSNR >= MIN_PSNR and the top-1 agreement >= MIN_TOP1.
    PROGRESS (stderr, for the CLI) says each stage and counts the decode steps."""
    from anefx.generation import Decoder, Session
    from anefx.models.load import load_model

    say = progress or quiet()
    t0 = time.perf_counter()
    if not 1 <= steps <= MAX_STEPS:
        raise AnefxInputError(f"--steps must be between 1 and {MAX_STEPS}, got {steps}")
    say(f"reading {package} and checking its files' sha256")
    fns = package_functions(package)
    if "decode" in fns and "prefill" in fns:
        dec, pre = fns["decode"], fns["prefill"]
        if not dec.states:
            raise AnefxInputError(f"{package}: function decode has no KV cache state")
        limit, what, hint = dec.states[0]["shape"][2], "the context", "a shorter prompt"
    elif "main" in fns:
        limit, what = fns["main"].seq_len, "its length"
        hint = "a stateful package (--context)"
    else:
        raise AnefxInputError(f"{package}: functions {sorted(fns)}: not an anefx package")
    vocab = min(f.logits_width for f in fns.values())
    if ids is not None and (not ids or any(not 0 <= i < vocab for i in ids)):
        raise AnefxInputError(f"--ids must be token ids in [0, {vocab})")
    n = len(ids) if ids is not None else DEFAULT_PROMPT_LEN
    if n + steps - 1 > limit:
        raise AnefxInputError(
            f"{package}: prompt + steps = {n + steps - 1} tokens exceed {what} {limit}; use "
            f"fewer --steps or {hint}"
        )
    say(f"loading {model_spec} in float32 with transformers (the reference)")
    hf = load_model(model_spec, dtype=torch.float32, seed=seed).model
    vocab = hf.config.vocab_size
    _check_matches(package, fns, hf.config)
    if ids is None:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (DEFAULT_PROMPT_LEN,), generator=gen).tolist()
    say(f"transformers: {steps} greedy token(s) after {len(ids)} prompt tokens, then the logits")
    with torch.no_grad():
        full = hf.generate(
            torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )[0].tolist()
        ref = hf(input_ids=torch.tensor([full]), use_cache=False).logits[0]
    # position p's logits predict token p + 1: compare the last prompt position and each step
    if "decode" in fns and "prefill" in fns:
        session = Session(Decoder(pre, dec, limit, pre.seq_len))
        # the prompt through prefill, then each following token through one decode step
        say(f"the package on the reference executor: {n} prompt tokens through prefill")
        got = [session.feed_all(ids)]
        follow = full[n:-1]
        for t in say.steps(follow, len(follow), "the package: decode steps"):
            got.append(session.feed_all([t]))
        got = torch.cat(got)
    else:
        say(f"the package on the reference executor: one call of {fns['main'].seq_len} tokens")
        got = _run_stateless(fns["main"], full[:-1])
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
        psnr_db=lowest(per),
        top1_agreement=agree,
        per_position_psnr_db=[round(x, 2) for x in per],
        tokens_reference=ref_top,
        tokens_package=pkg_top,
        wall_s=round(time.perf_counter() - t0, 2),
        min_psnr_db=min_psnr,
        min_top1=min_top1,
        passed=verdict(lowest(per), agree, min_psnr, min_top1),
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
