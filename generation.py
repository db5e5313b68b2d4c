"""Text generation on the lowered graphs, in torch, on any machine.

A :class:`Decoder` holds two lowered graphs of one model that share a KV cache layout: ``prefill``
(S = the prefill batch) and ``decode`` (S = 1). A :class:`Session` holds the cache state and the
position, and generates: the cache holds everything processed so far, ``generate(None)``
continues from it, new ``input_ids`` are appended first (multi-turn).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from anefx.errors import AnefxGraphError, AnefxInputError
from anefx.lowering.api import Lowered, lower
from anefx.models.capture import context_mask
from anefx.models.limits import MAX_STEPS


@dataclass
class Decoder:
    prefill: Lowered
    decode: Lowered
    context: int
    batch: int

    @property
    def vocab(self) -> int:
        config = getattr(self.prefill, "config", None)
        return config.vocab_size if config is not None else self.prefill.logits_width


def lower_decoder(
    model,
    batch: int = 64,
    context: int = 512,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    argmax: bool = False,
) -> Decoder:
    """Load MODEL once and lower its prefill (S=BATCH) and decode (S=1) graphs.

    ARGMAX makes both graphs return the greedy token id and its logit instead of logits (for
    packages; a Session needs the logits graphs)."""
    from anefx.models.capture import check_state_bytes
    from anefx.models.load import LoadedModel, load_model, preflight

    if context < 1:
        raise AnefxInputError(f"--context must be at least 1, got {context}")
    if not 1 <= batch <= context:
        raise AnefxInputError(f"--batch must be between 1 and --context {context}, got {batch}")
    loaded = model if isinstance(model, LoadedModel) else None
    if isinstance(model, str):
        plan = preflight(model, dtype=dtype)
        check_state_bytes(plan.config, context)  # before a weight or a cache is allocated
        loaded = load_model(plan, seed=seed)
    if loaded is not None:
        model = loaded.model
    prefill = lower(model, seq_len=batch, dtype=dtype, context=context, argmax=argmax)
    decode = lower(model, seq_len=1, dtype=dtype, context=context, argmax=argmax)
    if loaded is not None:  # name the checkpoint, not the class, in reports and manifests
        for low in (prefill, decode):
            low.source, low.random_weights = loaded.source, loaded.random_weights
    return Decoder(prefill, decode, context, batch)


def _logits(low: Lowered, out) -> torch.Tensor:
    """(1, S, V) logits from the graph's logit outputs (slices or one tensor)."""
    n = len(low.outputs) or 1
    parts = list(out[:n])
    if low.outputs:
        return torch.cat(parts, dim=1).squeeze(2).transpose(1, 2)
    return parts[0]


class Session:
    """The KV cache of one conversation, and generation on top of it."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        d = decoder.decode
        self.states = [torch.zeros(s["shape"], dtype=d.dtype) for s in d.states]
        self.position = 0  # tokens in the cache
        self._pending: int | None = None  # last generated token, not yet in the cache
        self._last_logits: torch.Tensor | None = None

    def _call(self, low: Lowered, ids: list[int]) -> torch.Tensor:
        n, s, ctx = len(ids), low.seq_len, self.decoder.context
        if self.position + n > ctx:
            raise AnefxInputError(
                f"context full: {self.position} tokens in the cache + {n} new > --context {ctx}"
            )
        pos = list(range(self.position, self.position + n)) + [ctx] * (s - n)  # pads write nothing
        pos_t = torch.tensor([pos], dtype=torch.int32)
        ids_t = torch.tensor([ids + [0] * (s - n)], dtype=torch.int32)
        with torch.no_grad():
            out = low.graph_module(ids_t, pos_t, context_mask(pos_t, ctx, low.dtype), *self.states)
        self.states = list(out[len(out) - len(self.states) :])
        self.position += n
        return _logits(low, out)[0, :n]

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Process IDS (prefill batches, then single steps); return the last position's logits."""
        return self.feed_all(ids)[-1]

    def feed_all(self, ids: list[int]) -> torch.Tensor:
        """Process IDS like :meth:`feed`; return the logits of every one of them, (n, V)."""
        d = self.decoder
        parts = []
        i = 0
        while i < len(ids):
            rest = len(ids) - i
            if rest == 1:
                parts.append(self._call(d.decode, ids[i : i + 1]))
                i += 1
            else:
                take = min(rest, d.batch)
                parts.append(self._call(d.prefill, ids[i : i + take]))
                i += take
        logits = torch.cat(parts)
        self._last_logits = logits[-1]
        return logits

    def stream(
        self,
        input_ids: list[int] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Like :meth:`generate`, yielding each new token as it is chosen."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        todo = ([self._pending] if self._pending is not None else []) + list(input_ids or [])
        self._pending = None
        if todo:
            self.feed(todo)
        if self._last_logits is None:
            raise AnefxInputError("nothing to continue from: give input_ids")
        for step in range(max_new_tokens):
            if not bool(torch.isfinite(self._last_logits).all()):
                # a token chosen from NaN logits is noise printed as if it were text
                raise AnefxGraphError(
                    f"the logits after {self.position} tokens are not finite (NaN or inf): the "
                    "program overflowed fp16 or its weights are damaged; anefx verify measures it"
                )
            token = sample(self._last_logits, temperature, top_k, top_p, gen)
            yield token
            if step + 1 < max_new_tokens:
                self.feed([token])
            else:
                self._pending = token

    def generate(
        self,
        input_ids: list[int] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Append INPUT_IDS (if any) and generate; return only the new tokens."""
        out = []
        for t in self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed):
            out.append(t)
            if on_token:
                on_token(t)
        return out


class TokenizerFile:
    """A ``tokenizers`` tokenizer read from one file's bytes, whose failures become one
    AnefxInputError naming the file (the Rust library panics on some malformed files, and its
    PanicException is a BaseException, not an Exception)."""

    def __init__(self, data: bytes, where: str):
        from tokenizers import Tokenizer

        self.where = where
        self.tok = self._guard("read", lambda: Tokenizer.from_str(data.decode("utf-8")))

    def _guard(self, what: str, fn):
        try:
            return fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # see the class docstring
            reason = " ".join(str(exc).split())[:120]
            raise AnefxInputError(
                f"{self.where}: not a readable tokenizer ({what}: {type(exc).__name__}: {reason})"
            ) from None

    def encode(self, text: str) -> list[int]:
        return list(self._guard("encode", lambda: self.tok.encode(text).ids))

    def decode(self, ids: list[int]) -> str:
        return self._guard("decode", lambda: self.tok.decode(ids))


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
) -> None:
    """Raise AnefxInputError naming the first generation parameter out of its range."""
    if not 1 <= max_new_tokens <= MAX_STEPS:
        raise AnefxInputError(
            f"max_new_tokens must be between 1 and {MAX_STEPS}, got {max_new_tokens}"
        )
    if not (math.isfinite(temperature) and temperature >= 0):
        raise AnefxInputError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise AnefxInputError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # also false for NaN
        raise AnefxInputError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not 0 <= seed < 2**64:
        raise AnefxInputError(f"seed must be between 0 and 2**64 - 1, got {seed}")


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Greedy at temperature 0; otherwise softmax sampling restricted by top-k and top-p."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], -1)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        cut = (probs.cumsum(-1) - probs) >= top_p
        logits[order[cut]] = float("-inf")
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
