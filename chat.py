"""Chatting with a model: its tokenizer and chat template (transformers'), its end tokens, and
the conversation on top of one KV cache.

The tokenizer files travel with the model: a checkpoint folder's (confined to it like its
weights), or those an artifact carries (checked against the sha256 recorded for each). They are
loaded with transformers (``AutoTokenizer``, ``GenerationConfig``) from a private copy of the
checked bytes, so what transformers reads is exactly what was checked.

A :class:`Chat` renders the whole conversation with the chat template every turn, and feeds only
the ids beyond the longest prefix the cache already holds: the previous turns stay in the cache
unless the template renders them differently (Qwen3's drops earlier ``<think>`` blocks), and then
the cache is rewound to where the two differ, not refilled from the start.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from anefx.errors import AnefxInputError
from anefx.generation import Session, StopReason, TextStream
from anefx.models.limits import MAX_STEPS

GENERATION_CONFIG = "generation_config.json"


def _guard(where: str, what: str, fn):
    """FN(), its failure as one AnefxInputError naming WHERE. The tokenizers library panics on
    some malformed files, and its PanicException is a BaseException, not an Exception."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit, AnefxInputError):
        raise
    except BaseException as exc:  # see the docstring
        reason = " ".join(str(exc).split())[:160]
        raise AnefxInputError(f"{where}: {what} ({type(exc).__name__}: {reason})") from None


# ---------------------------------------------------------------------------------------------
# The tokenizer files


def read_text_files(model: str, artifact: str | None = None) -> dict[str, bytes]:
    """The tokenizer files of MODEL, name -> bytes: of a checkpoint folder (confined to it: a
    link may lead into its Hugging Face cache repository, nowhere else), or of an artifact
    (ARTIFACT "parts" or "package"), each checked against the sha256 it records; none for a
    preset."""
    if model.startswith("preset:"):
        return {}
    from anefx.targets.artifact import TOKENIZER_FILES, tokenizer_files
    from anefx.targets.reader import MAX_TOKENIZER_BYTES, read_bounded, read_tokenizer_files

    if artifact is not None:
        # only what a tokenizer is made of reaches transformers, whatever else a manifest names
        return {n: d for n, d in read_tokenizer_files(model).items() if n in TOKENIZER_FILES}
    return {
        name: read_bounded(path, MAX_TOKENIZER_BYTES, f"tokenizer file {name}")
        for name, path in tokenizer_files(model).items()
    }


class ChatTokenizer:
    """A transformers tokenizer and its chat template; every failure of the library is one
    AnefxInputError naming the model (a hostile file must not end in a traceback)."""

    def __init__(self, hf, where: str):
        self.hf = hf
        self.where = where

    def encode(self, text: str) -> list[int]:
        """TEXT's ids, with the special tokens the tokenizer adds to a text (none for Qwen)."""
        return list(_guard(self.where, "tokenizer failed", lambda: self.hf.encode(text)))

    def decode(self, ids: list[int]) -> str:
        """IDS as text, special tokens included (they are what the model wrote)."""
        return _guard(self.where, "tokenizer failed", lambda: self.hf.decode(ids))

    def name(self, token: int) -> str:
        """TOKEN as the vocabulary spells it (``<|im_end|>``), or "" if it has none."""
        name = _guard(self.where, "tokenizer failed", lambda: self.hf.convert_ids_to_tokens(token))
        return name if isinstance(name, str) else ""

    @property
    def template(self) -> str | None:
        """The chat template's source (tokenizer_config.json or chat_template.jinja), or None."""
        t = self.hf.chat_template
        if isinstance(t, dict):  # named templates: the default one is the chat's
            t = t.get("default")
        return t if isinstance(t, str) and t else None

    @property
    def thinking_switch(self) -> bool:
        """Whether the template reads ``enable_thinking`` (Qwen3's does)."""
        return "enable_thinking" in (self.template or "")

    def render(self, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
        """The ids of MESSAGES in the chat template, with the assistant's generation prompt;
        ENABLE_THINKING is passed to the template unless None (its own default then)."""
        if self.template is None:
            raise AnefxInputError(
                f"{self.where}: its tokenizer has no chat template (no chat_template in "
                "tokenizer_config.json, no chat_template.jinja); use generate --prompt"
            )
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = _guard(
            self.where,
            "the chat template failed",
            lambda: self.hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
            ),
        )
        return [int(i) for i in ids]


@dataclass
class ModelText:
    """What turns a model's ids into text and back: its tokenizer (None without one) and its
    end tokens (id -> name), from generation_config.json's ``eos_token_id`` and the tokenizer's
    eos token."""

    tokenizer: ChatTokenizer | None
    end_tokens: dict[int, str]
    where: str
    sources: dict[int, str]  # end token id -> the file that declares it

    def stop_tokens(self, ignore_eos: bool = False) -> dict[int, str]:
        """The end tokens to stop at: none with IGNORE_EOS; a note on stderr when none is
        known (generation then runs to its bound)."""
        if ignore_eos:
            return {}
        if not self.end_tokens:
            print(
                f"note: {self.where}: no end tokens known (no eos_token_id in a "
                "generation_config.json, no eos token in a tokenizer): generation stops at "
                "--max-new-tokens or when the context is full",
                file=sys.stderr,
            )
        return dict(self.end_tokens)

    def check_vocab(self, vocab: int) -> None:
        """Refuse an end token outside the model's vocabulary (the files are another model's)."""
        for token, source in self.sources.items():
            if not 0 <= token < vocab:
                raise AnefxInputError(
                    f"{self.where}: end token {token} ({source}) is outside the model's "
                    f"vocabulary (0..{vocab - 1}): these tokenizer files are another model's"
                )


def _eos_ids(value: object, where: str) -> list[int]:
    ids = value if isinstance(value, list) else [] if value is None else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise AnefxInputError(
                f"{where}: eos_token_id must be a token id or a list of them, got {value!r}"[:300]
            )
    return ids


def load_text(files: Mapping[str, bytes], where: str) -> ModelText:
    """The tokenizer and end tokens of FILES (name -> bytes, :func:`read_text_files`), loaded
    by transformers from a private copy; WHERE names the model in messages."""
    if not files:
        return ModelText(None, {}, where, {})
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer, sources = None, {}
    with tempfile.TemporaryDirectory(prefix="anefx-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        if GENERATION_CONFIG in files:
            gen_where = f"{where}/{GENERATION_CONFIG}"
            config = _guard(
                gen_where,
                "not a readable generation config",
                lambda: GenerationConfig.from_pretrained(tmp, local_files_only=True),
            )
            for i in _eos_ids(config.eos_token_id, gen_where):
                sources[i] = GENERATION_CONFIG
        # a vocabulary makes a tokenizer: tokenizer.json, or a BPE's vocab.json and merges.txt
        if "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= set(files):
            main = "tokenizer.json" if "tokenizer.json" in files else "vocab.json"
            hf = _guard(
                f"{where}/{main}",
                "not a readable tokenizer",
                lambda: AutoTokenizer.from_pretrained(tmp, local_files_only=True),
            )
            tokenizer = ChatTokenizer(hf, where)
    if tokenizer is not None:
        eos = getattr(tokenizer.hf, "eos_token_id", None)
        if isinstance(eos, int) and not isinstance(eos, bool):
            sources.setdefault(eos, "the tokenizer's eos token")
    names = {i: tokenizer.name(i) if tokenizer is not None else "" for i in sorted(sources)}
    return ModelText(tokenizer, names, where, sources)


def check_thinking(tokenizer: ChatTokenizer, enable_thinking: bool | None) -> None:
    """Refuse --think / --no-think for a chat template without a thinking switch."""
    if enable_thinking is not None and not tokenizer.thinking_switch:
        raise AnefxInputError(
            f"--{'think' if enable_thinking else 'no-think'}: the chat template of "
            f"{tokenizer.where} has no thinking switch (it never reads enable_thinking)"
        )


# ---------------------------------------------------------------------------------------------
# The conversation


@dataclass
class Turn:
    """One exchange: the cached ids kept, the ids fed, the ids generated, the reply's text and
    why it stopped."""

    kept: int
    fed: list[int]
    generated: list[int]
    reply: str
    stop: StopReason


class Chat:
    """A conversation (``messages``) on one :class:`Session`: each turn renders the whole
    conversation with the chat template and feeds what the cache does not hold yet."""

    def __init__(
        self,
        session: Session,
        tokenizer: ChatTokenizer,
        system: str | None = None,
        enable_thinking: bool | None = None,
        max_new_tokens: int | None = None,
        end_tokens: Mapping[int, str] | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ):
        check_thinking(tokenizer, enable_thinking)
        self.session = session
        self.tokenizer = tokenizer
        self.system = system
        self.enable_thinking = enable_thinking
        self.max_new_tokens = max_new_tokens
        self.end_tokens = dict(end_tokens or {})
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.turns = 0
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Start a new conversation: no messages but the system prompt, an empty cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.session.reset()

    def prompt_ids(self, user: str) -> list[int]:
        """The rendering of the conversation with USER's message, ready for the reply."""
        messages = [*self.messages, {"role": "user", "content": user}]
        return self.tokenizer.render(messages, self.enable_thinking)

    def turn(
        self,
        user: str,
        on_text: Callable[[str], None] | None = None,
        on_feed: Callable[[int, list[int]], None] | None = None,
    ) -> Turn:
        """Answer USER: ON_FEED(kept, fed) before the ids go in, ON_TEXT with each piece of the
        reply as it is decoded. Ctrl-C stops the reply (kept in the conversation as far as it
        got); a conversation that no longer fits the context is refused, unchanged."""
        say = on_text or (lambda text: None)
        ids = self.prompt_ids(user)
        context = self.session.decoder.context
        if len(ids) > context:
            raise AnefxInputError(
                f"the conversation is {len(ids)} tokens, the context holds {context}: /reset "
                "starts a new one"
            )
        cached = self.session.tokens
        kept = 0
        for a, b in zip(cached, ids, strict=False):
            if a != b:
                break
            kept += 1
        kept = min(kept, len(ids) - 1)  # at least one id goes in: its logits start the reply
        fed = ids[kept:]
        if on_feed:
            on_feed(kept, fed)
        self.session.rewind(kept)
        budget = self.max_new_tokens or min(MAX_STEPS, context)
        text, generated = TextStream(self.tokenizer.decode), []
        seed = (self.seed + self.turns) % 2**64  # each turn its own draws
        self.turns += 1
        try:
            stream = self.session.stream(
                fed, budget, seed=seed, end_tokens=self.end_tokens, **self.sampling
            )
            for token in stream:
                generated.append(token)
                say(text.push(token))
            stop = self.session.stop_reason or StopReason("interrupted")
        except KeyboardInterrupt:
            stop = StopReason("interrupted")
        say(text.flush())
        reply = self.tokenizer.decode(generated)
        if generated or stop.kind != "interrupted":
            self.messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": reply},
            ]
        return Turn(kept, fed, generated, reply, stop)


def ids_line(label: str, ids: list[int]) -> str:
    """``ids: LABEL N: a,b,c`` (what --show-ids prints)."""
    return f"ids: {label} {len(ids)}: {','.join(map(str, ids))}"


def _read_line(stdin: TextIO, stdout: TextIO, stderr: TextIO) -> str | None:
    """The next line the user typed (None at the end of the input). In a terminal, with the
    line editing and history of input(); the prompt goes to stderr when stdout is not one."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty() and stdout.isatty():
        with contextlib.suppress(ImportError):  # input() edits lines and keeps history with it
            import readline  # noqa: F401
        try:
            return input("> ")
        except EOFError:
            return None
    if stdin.isatty():
        stderr.write("> ")
        stderr.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


HELP = "/reset starts a new conversation, /quit (or Ctrl-D) ends; Ctrl-C stops a reply"


def run_chat(
    chat: Chat,
    show_ids: bool = False,
    verbose: bool = False,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The interactive loop: a line per user turn, the reply streamed to STDOUT, everything
    else on STDERR. Ends (0) at /quit or the end of the input."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr

    def err(line: str) -> None:
        stdout.flush()
        print(line, file=stderr, flush=True)

    def out(text: str) -> None:
        if text:
            stdout.write(text)
            stdout.flush()

    def fed(kept: int, ids: list[int]) -> None:
        if verbose and kept < len(chat.session.tokens):
            err(
                f"(the template renders the conversation differently from token {kept}: kept "
                f"{kept} of the {len(chat.session.tokens)} cached tokens)"
            )
        if show_ids:
            err(f"ids: kept {kept} cached, " + ids_line("fed", ids)[5:])

    if stdin.isatty():
        err(HELP)
    while True:
        try:
            line = _read_line(stdin, stdout, stderr)
        except KeyboardInterrupt:  # at the prompt: a new prompt, as a shell does
            err("\n(" + HELP + ")")
            continue
        if line is None:
            if stdin.isatty():
                err("")
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            err(HELP)
            continue
        if command == "/reset":
            chat.reset()
            err("(a new conversation: history and cache cleared)")
            continue
        try:
            turn = chat.turn(line, on_text=out, on_feed=fed)
        except AnefxInputError as exc:
            err(f"anefx: {' '.join(str(exc).split())}")
            continue
        except KeyboardInterrupt:  # while rendering: the turn never started
            err("\n(interrupted)")
            continue
        out("\n")
        if show_ids:
            err(ids_line("generated", turn.generated))
        if verbose or turn.stop.kind != "end_token":
            err(f"stopped: {turn.stop.describe(chat.end_tokens)}")
