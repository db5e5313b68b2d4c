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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anefx.core.signature import Role, Signature, State, carried_output, join_logits
from anefx.errors import AnefxInputError
from anefx.lowering.diff import json_safe
from anefx.models.limits import MAX_STEPS, MAX_VOCAB
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
    """One function of an artifact (a package, or a parts folder run as one program), with the
    interface a Session expects of a lowered graph: ``graph_module(ids, positions, mask,
    *states)``, ``signature`` (recorded in the artifact, checked against its program),
    ``logits(outputs)``, ``seq_len``, ``dtype``."""

    program: object
    name: str
    signature: Signature
    dtype: torch.dtype = torch.float16

    @property
    def seq_len(self) -> int:
        return self.signature.input(Role.TOKENS).size("S")

    @property
    def states(self) -> tuple[State, ...]:
        return self.signature.states

    @property
    def graph_module(self):  # Session calls low.graph_module(ids, pos, mask, *states)
        return self

    def __call__(self, ids, pos, mask, *states):
        sig = self.signature
        feeds = {
            sig.input(Role.TOKENS).name: ids.numpy().astype(np.int32),
            sig.input(Role.POSITIONS).name: pos.numpy().astype(np.int32),
            sig.input(Role.MASK).name: mask.numpy().astype(np.float16),
        }
        held = {}
        for spec, value in zip(sig.states, states, strict=True):
            if spec.carried:  # an input; its new value comes back as an output
                feeds[spec.name] = value.numpy().astype(np.float16)
            else:
                held[spec.name] = value.numpy()
        outs, new = self.program.run(self.name, feeds, held)
        values = [torch.from_numpy(np.asarray(outs[o.name], dtype=np.float32)) for o in sig.outputs]
        after = [
            outs[carried_output(spec)] if spec.carried else new[spec.name] for spec in sig.states
        ]
        return (*values, *(torch.from_numpy(np.asarray(a)) for a in after))

    def logits(self, out) -> torch.Tensor:
        """(1, S, V) logits from this function's outputs OUT."""
        picked = [
            (o, out[i]) for i, o in enumerate(self.signature.outputs) if o.role == Role.LOGITS
        ]
        return join_logits([v for _, v in picked], [o for o, _ in picked])


def _function(path, program, name: str, sig: Signature) -> PackageFunction:
    """A PackageFunction of PROGRAM after checking SIG is a decoder's verify and generate can
    drive: token ids, positions and a mask in (B = 1), logits out, KV states of one context."""
    missing = [r for r in (Role.TOKENS, Role.POSITIONS, Role.MASK) if sig.input(r) is None]
    if missing:
        raise AnefxInputError(
            f"{path}: function {name} has no input for the {missing[0]} (inputs: "
            f"{', '.join(i.name for i in sig.inputs)}); not a decoder anefx can drive"
        )
    if not sig.logits:
        raise AnefxInputError(
            f"{path}: function {name} returns {[o.name for o in sig.outputs]}; verify and "
            "generate need logits (a package emitted with --argmax returns token ids)"
        )
    contexts = {s.context for s in sig.states if s.context is not None}
    if len(contexts) > 1:
        raise AnefxInputError(
            f"{path}: function {name}: its states hold contexts {sorted(contexts)}, not one"
        )
    if sig.vocab_size > MAX_VOCAB:
        raise AnefxInputError(
            f"{path}: function {name}: logits over {sig.vocab_size} tokens, above the "
            f"{MAX_VOCAB} anefx reads (MAX_VOCAB, models/limits.py)"
        )
    return PackageFunction(program, name, sig)


def package_functions(path: str | Path) -> dict[str, PackageFunction]:
    """The functions of the artifact at PATH (a package, or a parts folder run part by part)
    as PackageFunction objects, by name; the artifact is checked against its digests first."""
    from anefx.targets.coreml_exec import ChainProgram, load_package
    from anefx.targets.reader import (
        artifact_kind,
        check_package,
        package_signatures,
    )

    path = Path(path)
    if artifact_kind(path) == "parts":
        program = ChainProgram(path)
        sigs = {fn: program.signature(fn) for fn in program.functions}
    else:
        report = check_package(path)
        program = load_package(path)
        sigs = package_signatures(path, report, program)
    return {fn: _function(path, program, fn, sig) for fn, sig in sigs.items()}


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
    # the reference's greedy token among the package's five best, over the compared positions
    # (a large vocabulary makes top-1 alone misleading on near ties; device-facts.md)
    top5_containment: float = float("nan")
    kl_mean: float = float("nan")  # KL(reference || package) of the softmax, nats, mean
    kl_max: float = float("nan")  # and its largest over the compared positions
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
            f"  top-1 agreement: {self.top1_agreement:.3f}; reference token in the package's top "
            f"5: {self.top5_containment:.3f}",
            f"  KL(reference || package): mean {self.kl_mean:.2e}, max {self.kl_max:.2e} nats",
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
        limit, what, hint = dec.signature.context, "the context", "a shorter prompt"
    elif "main" in fns:
        limit, what = fns["main"].seq_len, "its length"
        hint = "a stateful package (--context)"
    else:
        raise AnefxInputError(f"{package}: functions {sorted(fns)}: not an anefx package")
    vocab = min(f.signature.vocab_size for f in fns.values())
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
    top5, kls = distribution_agreement(ref[list(compared)], got[list(compared)].float())
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
        top5_containment=top5,
        kl_mean=float(np.mean(kls)),
        kl_max=float(np.max(kls)),
    )


def distribution_agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, list[float]]:
    """For logits REF and GOT (positions, vocabulary): the fraction of positions whose
    reference greedy token is among GOT's five best, and KL(softmax(REF) || softmax(GOT)) per
    position in nats (float64; NaN where either holds a NaN)."""
    ref64, got64 = ref.double(), got.double()
    k = min(5, ref64.shape[-1])
    best = ref64.argmax(-1, keepdim=True)
    top5 = (got64.topk(k, -1).indices == best).any(-1).double().mean().item()
    logp = torch.log_softmax(ref64, -1)
    logq = torch.log_softmax(got64, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return top5, [float(x) for x in kl]


def _check_matches(package, fns: dict, config) -> None:
    """The package must have MODEL's shapes: vocabulary, and per layer a K and a V cache."""
    from anefx.models.families import family_of

    for fn in fns.values():
        sig, problem = fn.signature, None
        if sig.vocab_size != config.vocab_size:
            problem = (
                f"logits over {sig.vocab_size} tokens, the model has a vocabulary of "
                f"{config.vocab_size}"
            )
        elif sig.states:
            states = family_of(config).states(config, sig.context, "float16")
            want = [tuple(state.shape) for state in states if not state.carried]
            # a packed state holds one layer's K or V per row of its leading axis
            got = [
                (1, *s.shape[1:]) for s in sig.states if not s.carried for _ in range(s.shape[0])
            ]
            want_carried = {st.name: tuple(st.shape) for st in states if st.carried}
            got_carried = {st.name: tuple(st.shape) for st in sig.carried}
            if got != want:
                problem = (
                    f"its KV states hold {len(got)} caches of {sorted(set(got))}; the model "
                    f"needs {len(want)} of {sorted(set(want))}"
                )
            elif got_carried != want_carried:
                problem = (
                    f"it carries states {sorted(got_carried.items())}; the model's conv and "
                    f"recurrent states are {sorted(want_carried.items())}"
                )
        if problem:
            raise AnefxInputError(f"{package} was not converted from this model: {problem}")


def _run_stateless(fn: PackageFunction, ids: list[int]) -> torch.Tensor:
    """(n, V) logits of a single-function package for IDS, padded to its length."""
    from anefx.models.capture import causal_mask

    s, n = fn.seq_len, len(ids)
    ids_t = torch.tensor([ids + [0] * (s - n)], dtype=torch.int32)
    pos = torch.arange(s, dtype=torch.int32)[None]
    return fn.logits(fn(ids_t, pos, causal_mask(s, torch.float16)))[0, :n]
