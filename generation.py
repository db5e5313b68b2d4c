"""Text generation on the lowered graphs, in torch, on any machine.

A :class:`Decoder` holds two lowered graphs of one model that share a KV cache layout: ``prefill``
(S = the prefill batch) and ``decode`` (S = 1). A :class:`Session` holds the cache state and the
position, and generates: the cache holds everything processed so far, ``generate(None)``
continues from it, new ``input_ids`` are appended first (multi-turn). Generation stops at an end
token, at ``max_new_tokens`` or when the context is full; :attr:`Session.stop_reason` says which.
:class:`TextStream` turns the generated ids into text as they come, complete characters only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

from anefx.errors import AnefxGraphError, AnefxInputError
from anefx.lowering.api import Lowered, lower
from anefx.models.capture import context_mask
from anefx.models.limits import MAX_STEPS


@dataclass
class Decoder:
    """Two functions of one model sharing a KV cache: PREFILL (S = BATCH) and DECODE (S = 1).

    Each is a Lowered graph (run in torch) or a package function on the reference executor:
    anything with ``graph_module`` (called as (ids, positions, mask, *states)), ``signature``,
    ``logits(outputs)``, ``seq_len`` and ``dtype``."""

    prefill: Lowered
    decode: Lowered
    context: int
    batch: int

    @property
    def vocab(self) -> int:
        return self.prefill.signature.vocab_size


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


@dataclass(frozen=True)
class StopReason:
    """Why generation stopped: ``kind`` is "end_token" (``value`` its id), "max_new_tokens"
    (``value`` the bound), "context_full" (``value`` the context) or "interrupted"."""

    kind: str
    value: int = 0

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        """One line for a person, in the command line's terms (``end token 248046 <|im_end|>``,
        ``--max-new-tokens 32``, ``context full (512 tokens)``); NAMES spell the end tokens."""
        if self.kind == "end_token":
            name = (names or {}).get(self.value)
            return f"end token {self.value}" + (f" {name}" if name else "")
        if self.kind == "max_new_tokens":
            return f"--max-new-tokens {self.value}"
        if self.kind == "context_full":
            return f"context full ({self.value} tokens)"
        return self.kind


# Snapshots of the carried states a Session keeps for rewinding (one per prompt fed; the
# oldest are dropped beyond this, and a rewind before the kept ones re-feeds from the start).
MAX_SNAPSHOTS = 16


class Session:
    """The states of one conversation (KV cache, and a hybrid's conv and recurrent states),
    and generation on top of them.

    A KV cache can be rewritten and rewound: a slot holds one token's rows, whatever came
    after it. A recurrent state cannot (it folds in every token fed; feeding a token again
    applies it twice), so with carried states (``Signature.carried``) a call never starts
    before the position, a prefill that would pass the end of the context becomes single
    decode steps, and :meth:`rewind` restores a snapshot taken when a prompt was fed and feeds
    the tokens after it again."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.reset()

    @property
    def recurrent(self) -> bool:
        """The decoder carries states that fold in every token (a hybrid's)."""
        return bool(self.decoder.decode.signature.carried)

    def reset(self) -> None:
        """Forget everything: empty (zeroed) states at position 0."""
        d = self.decoder.decode
        self.states = [torch.zeros(s.shape, dtype=d.dtype) for s in d.signature.states]
        self.tokens: list[int] = []  # the ids in the cache, in order
        self._pending: int | None = None  # last generated token, not yet in the cache
        self._last_logits: torch.Tensor | None = None
        self.stop_reason: StopReason | None = None  # of the last generation
        self._snapshots: dict[int, list[torch.Tensor]] = {}  # position -> carried states

    def _snapshot(self) -> None:
        """Keep the carried states at the current position (for :meth:`rewind`)."""
        if not self.recurrent or self.position in self._snapshots:
            return
        carried = [i for i, s in enumerate(self.decoder.decode.signature.states) if s.carried]
        self._snapshots[self.position] = [self.states[i].clone() for i in carried]
        while len(self._snapshots) > MAX_SNAPSHOTS:
            del self._snapshots[min(self._snapshots)]

    @property
    def position(self) -> int:
        """Tokens in the cache."""
        return len(self.tokens)

    def rewind(self, keep: int) -> None:
        """Keep only the first KEEP tokens of the cache (and drop a pending token): the next
        ids are written from position KEEP. The slots after it need no clearing: a query sees
        only the slots at or before its own position, and every slot is written before a query
        at its position reads it."""
        if not 0 <= keep <= self.position:
            raise AnefxInputError(f"cannot keep {keep} tokens of a cache holding {self.position}")
        if self.recurrent and keep < self.position:
            self._rewind_recurrent(keep)
            return
        del self.tokens[keep:]
        self._pending = None
        self._last_logits = None

    def _rewind_recurrent(self, keep: int) -> None:
        """Carried states: back to the latest snapshot at or before KEEP (else the start),
        then the tokens between it and KEEP fed again."""
        kept = self.tokens[:keep]
        at = max((p for p in self._snapshots if p <= keep), default=0)
        snapshots = {p: v for p, v in self._snapshots.items() if p <= at}
        self.reset()
        if at:
            self.tokens = kept[:at]
            carried = [i for i, s in enumerate(self.decoder.decode.signature.states) if s.carried]
            for i, value in zip(carried, snapshots[at], strict=True):
                self.states[i] = value.clone()
        self._snapshots = snapshots
        if keep > at:
            self.feed_all(kept[at:])
        self._last_logits = None

    def _call(self, low: Lowered, ids: list[int]) -> torch.Tensor:
        n, s, ctx = len(ids), low.seq_len, self.decoder.context
        if self.position + n > ctx:
            raise AnefxInputError(
                f"context full: {self.position} tokens in the cache + {n} new > --context {ctx}"
            )
        # a call writes its S slots from its first position (the padding's after the real
        # tokens'): a call that would pass the end of the cache starts earlier instead, feeding
        # again the cached tokens before IDS, which rewrites their slots with the same rows
        # (never with carried states: feed_all gives them single steps there)
        start = self.position if self.recurrent else min(self.position, ctx - s)
        again = self.tokens[start : self.position]
        fed = again + ids
        pos = list(range(start, start + len(fed))) + [ctx] * (s - len(fed))  # pads: at ctx
        pos_t = torch.tensor([pos], dtype=torch.int32)
        ids_t = torch.tensor([fed + [0] * (s - len(fed))], dtype=torch.int32)
        with torch.no_grad():
            out = low.graph_module(ids_t, pos_t, context_mask(pos_t, ctx, low.dtype), *self.states)
        # states first, then the tokens: interrupted in between (Ctrl-C in a chat), the cache
        # holds slots past its position, which the next writes overwrite and no query sees
        self.states = list(out[len(out) - len(self.states) :])
        self.tokens.extend(ids)
        return low.logits(out)[0, len(again) : len(fed)]

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
            # with carried states a prefill may not start before the position, so one whose
            # slots would pass the end of the context is fed as single steps
            past_end = self.recurrent and self.position + d.batch > d.context
            if rest == 1 or past_end:
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
        end_tokens: Collection[int] = (),
    ) -> Iterator[int]:
        """Like :meth:`generate`, yielding each new token as it is chosen."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        ends = frozenset(end_tokens)
        self.stop_reason = None
        todo = ([self._pending] if self._pending is not None else []) + list(input_ids or [])
        self._pending = None
        if todo:
            self._snapshot()  # a turn's start: where a chat rewinds to
            self.feed(todo)
            self._snapshot()
        if self._last_logits is None:
            raise AnefxInputError("nothing to continue from: give input_ids")
        context = self.decoder.context
        for step in range(max_new_tokens):
            if not bool(torch.isfinite(self._last_logits).all()):
                # a token chosen from NaN logits is noise printed as if it were text
                raise AnefxGraphError(
                    f"the logits after {self.position} tokens are not finite (NaN or inf): the "
                    "program overflowed fp16 or its weights are damaged; anefx verify measures it"
                )
            token = sample(self._last_logits, temperature, top_k, top_p, gen)
            if token in ends:
                # not output, and not in the cache: a continuation feeds it first, as the model
                # chose it; a chat renders its own end of turn instead
                self._pending = token
                self.stop_reason = StopReason("end_token", token)
                return
            yield token
            if step + 1 == max_new_tokens or self.position >= context:
                self._pending = token
                self.stop_reason = (
                    StopReason("max_new_tokens", max_new_tokens)
                    if step + 1 == max_new_tokens
                    else StopReason("context_full", context)
                )
                return
            self.feed([token])

    def generate(
        self,
        input_ids: list[int] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
        end_tokens: Collection[int] = (),
    ) -> list[int]:
        """Append INPUT_IDS (if any) and generate until a token of END_TOKENS (not returned),
        MAX_NEW_TOKENS or a full context (:attr:`stop_reason`); return only the new tokens."""
        out = []
        stream = self.stream(
            input_ids, max_new_tokens, temperature, top_k, top_p, seed, end_tokens=end_tokens
        )
        for t in stream:
            out.append(t)
            if on_token:
                on_token(t)
        return out


class TextStream:
    """Incremental detokenisation: :meth:`push` a token id, get the text it completes.

    Decoding token by token breaks a character whose UTF-8 bytes span several tokens (emoji,
    CJK) into replacement characters, and some tokenizers decode a token differently at the
    start of a text (a leading space dropped). So the ids are decoded in a window: ``prefix``
    (already emitted) and the new ids after ``read``; the text beyond the prefix's is emitted
    once it does not end in U+FFFD (an incomplete UTF-8 sequence), and the window moves on. The
    texts pushed, then :meth:`flush`, add up to DECODE of every id at once.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here: context for decoding the new ids
        self._read = 0  # the ids before this are emitted

    def push(self, token: int) -> str:
        """Add TOKEN; return the new complete text (maybe empty: held back)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text held back (an incomplete sequence at the end, as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self.decode(self.ids[self._prefix : self._read])
        text = self.decode(self.ids[self._prefix :])
        if len(text) <= len(before) and not final:
            return ""  # nothing visible yet (a byte of a character, or a token decoding to "")
        if text.endswith("\ufffd") and not final:
            return ""  # the rest of the character is in the next token
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]


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
