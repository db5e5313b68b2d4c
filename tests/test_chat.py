"""Chat and text (issue 13): end tokens, streamed text, the chat template, tokenizer files in
artifacts.

One tiny checkpoint serves every test: a byte-level BPE tokenizer trained here on text with
emoji and CJK (several characters span tokens), a Qwen-style ChatML template with a thinking
switch in tokenizer_config.json, a generation_config.json with three end tokens, and a random
Qwen3 whose LM head scores only six whole-word tokens (the others score 0; the six are three
pairs +v, -v, so one of them always scores above 0): its greedy replies are words, which the
tokenizer encodes back to the same ids, so a reply rendered into the history matches the ids
the cache holds, and the ids it picks are stable between fp16 programs.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _cli import cli, one_line
from hypothesis import example, given
from hypothesis import strategies as st

from anefx.chat import Chat, load_text, read_text_files
from anefx.generation import Session, StopReason, TextStream, lower_decoder
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.artifact import REPORT_ITEM

CONTEXT, BATCH = 64, 8
SHAPE = ["--context", str(CONTEXT), "--batch", str(BATCH)]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Emoji 😀 😃 😄 😁 🎉 🦊 🐶 🌸 and more 😀🎉 together 🦊🐶🌸.",
    "中文文本：你好世界，今天天气很好。日本語のテキストも少し。한국어 문장도 있습니다.",
    "café naïve résumé über straße, «quotes» and ‘marks’.",
]
MIXED = "Hi 😀🎉 你好世界 café 🦊🐶🌸 日本語"
# Qwen3's shape: ChatML; an earlier reply loses its <think> block; enable_thinking=false
# pre-fills an empty one
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- else %}{%- set content = message.content %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def _tokenizer_config(template: str) -> str:
    return json.dumps(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
            "chat_template": template,
        }
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("chat") / "ckpt"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.add_tokens(["<think>", "</think>"])
    cfg = {**get_preset("qwen3-tiny"), "vocab_size": tok.get_vocab_size()}
    cfg["tie_word_embeddings"] = False  # a head of its own, to steer
    write_random_checkpoint(folder, cfg, dtype=torch.float32, seed=5)
    words = sorted(
        i
        for t, i in tok.get_vocab().items()
        if t[0] == "Ġ" and t[1:].isascii() and t[1:].isalpha() and len(t) > 3
    )[:6]
    weights = load_file(folder / "model.safetensors")
    head = torch.zeros_like(weights["lm_head.weight"])
    gen = torch.Generator().manual_seed(0)
    for a, b in zip(words[::2], words[1::2], strict=True):
        v = torch.randn(head.shape[1], generator=gen)
        head[a], head[b] = v, -v
    weights["lm_head.weight"] = head
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(_tokenizer_config(TEMPLATE))
    ends = [tok.token_to_id(s) for s in SPECIALS]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))
    return folder


@pytest.fixture(scope="module")
def hf(ckpt: Path):
    """transformers' own tokenizer of the checkpoint: the ground truth."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)


@pytest.fixture(scope="module")
def text(ckpt: Path):
    return load_text(read_text_files(str(ckpt)), str(ckpt))


@pytest.fixture(scope="module")
def dec(ckpt: Path):
    return lower_decoder(str(ckpt), batch=BATCH, context=CONTEXT, dtype=torch.float32)


def _render(hf, messages: list[dict], **kwargs) -> list[int]:
    return hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# (a) streamed text


def test_characters_span_tokens(hf) -> None:
    """The property below means something: emoji and CJK characters split across tokens."""
    ids = hf.encode(MIXED)
    assert sum("\ufffd" in hf.decode([i]) for i in ids) >= 4
    assert hf.decode(ids) == MIXED


@given(
    st.lists(
        st.one_of(
            st.integers(0, 424),  # any token: bytes that are no character too
            st.sampled_from(["😀", "🎉", "你好", "世界", "日本語", "café", " the", "🦊🐶"]),
        ),
        max_size=24,
    )
)
@example(["Hi 😀🎉 你好世界 café 🦊🐶🌸 日本語"])
def test_streamed_text_equals_decoding_at_once(text, hf, pieces: list) -> None:
    ids = [i for p in pieces for i in ([p] if isinstance(p, int) else hf.encode(p)) if i < len(hf)]
    whole = hf.decode(ids)
    for k in range(len(ids) + 1):  # every prefix: what was emitted, then what was held back
        stream, emitted = TextStream(text.tokenizer.decode), ""
        for i in ids[:k]:
            emitted += stream.push(i)
            assert whole.startswith(emitted)  # never a character that changes later
        assert emitted + stream.flush() == hf.decode(ids[:k])


# ---------------------------------------------------------------------------------------------
# (b) end tokens


def test_stops_at_each_end_token(dec, text) -> None:
    prompt = [7, 60, 61, 62]
    free = Session(dec).generate(prompt, max_new_tokens=24)
    firsts = [(k, t) for k, t in enumerate(free) if t not in free[:k] and k > 0]
    assert len(firsts) >= 2, free  # several positions (the first token is one more)
    for k, token in [(0, free[0]), *firsts]:
        s = Session(dec)
        assert s.generate(prompt, max_new_tokens=24, end_tokens={token, 0}) == free[:k]
        assert s.stop_reason == StopReason("end_token", token)
        assert s.position == len(prompt) + k  # the end token is not in the cache
    s = Session(dec)
    assert s.generate(prompt, max_new_tokens=5, end_tokens={0}) == free[:5]
    assert s.stop_reason.describe() == "--max-new-tokens 5"
    # a full context is a normal stop: every position used, one more token from the last logits
    s = Session(dec)
    long = prompt * 14  # 56 of 64 positions
    out = s.generate(long, max_new_tokens=40, end_tokens={0})
    assert len(out) == CONTEXT - len(long) + 1 and s.position == CONTEXT
    assert s.stop_reason.describe() == f"context full ({CONTEXT} tokens)"
    # the checkpoint's end tokens: generation_config.json's three, the tokenizer's among them
    assert sorted(text.end_tokens.values()) == sorted(SPECIALS)


def test_cli_stops_at_a_declared_end_token(ckpt: Path, dec, hf, tmp_path: Path) -> None:
    prompt = [7, 60, 61, 62]
    free = Session(dec).generate(prompt, max_new_tokens=24)
    k = max(k for k, t in enumerate(free) if t not in free[:k])  # the latest first occurrence
    copy = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[k], 0]}))
    ids = ",".join(map(str, prompt))
    run = ["--ids", ids, "--max-new-tokens", "24", *SHAPE, "--dtype", "float32"]
    code, out, err = cli("generate", copy, *run)
    assert code == 0, err
    assert [int(t) for t in out.strip().splitlines()[-1].split()] == free[:k]
    name = hf.convert_ids_to_tokens(free[k])
    assert err.strip().splitlines()[-1] == f"stopped: end token {free[k]} {name}"
    # --ignore-eos generates through it; a context of 16 then needs all 24 tokens to fit
    code, out, err = cli("generate", copy, *run, "--ignore-eos")
    assert code == 0, err
    assert [int(t) for t in out.strip().splitlines()[-1].split()] == free
    assert err.strip().splitlines()[-1] == "stopped: --max-new-tokens 24"
    short = ["--context", "16", "--batch", "4"]
    code, _, err = cli(
        "generate", copy, "--ids", ids, "--max-new-tokens", "24", *short, "--ignore-eos"
    )
    assert code == 2
    one_line(err, "need 27 positions; the context holds 16")


# ---------------------------------------------------------------------------------------------
# the conversation, in process


def test_chat_keeps_the_cache_and_rewinds_where_the_template_rewrites(dec, text, hf) -> None:
    chat = Chat(Session(dec), text.tokenizer, enable_thinking=False, max_new_tokens=4)
    first = chat.turn("hello there")
    assert first.kept == 0 and first.fed == _render(hf, chat.messages[:1], enable_thinking=False)
    assert first.reply == hf.decode(first.generated) and first.stop.kind == "max_new_tokens"
    second = chat.turn("and then?")
    want = _render(hf, chat.messages[:3], enable_thinking=False)
    assert want[: second.kept] + second.fed == want
    # the history has no empty <think> block where the cache has one: kept up to it, not 0
    think = hf.encode("<think>\n\n</think>\n\n")
    assert second.kept == len(first.fed) - len(think)
    # a rewound cache answers as a fresh one
    fresh = Session(dec).generate(want, max_new_tokens=4, end_tokens=set(text.end_tokens))
    assert second.generated == fresh
    chat.reset()
    assert chat.messages == [] and chat.session.position == 0


def test_ctrl_c_keeps_the_reply_so_far(dec, text, hf) -> None:
    chat = Chat(Session(dec), text.tokenizer, system="Be brief.", max_new_tokens=12)
    pieces = []

    def interrupt(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    turn = chat.turn("count", on_text=interrupt)
    assert turn.stop == StopReason("interrupted") and len(turn.generated) == 3
    assert chat.messages[-1] == {"role": "assistant", "content": hf.decode(turn.generated)}
    after = chat.turn("go on")  # the interrupted reply is history, the cache still serves
    want = _render(hf, chat.messages[:4])
    assert after.kept >= len(turn.fed) and want[: after.kept] + after.fed == want


def test_rewind_equals_a_fresh_cache(dec) -> None:
    a = Session(dec)
    a.feed(list(range(10, 30)))
    a.rewind(12)
    got = a.feed(list(range(40, 45)))
    b = Session(dec)
    torch.testing.assert_close(got, b.feed(list(range(10, 22)) + list(range(40, 45))))


# ---------------------------------------------------------------------------------------------
# (c) anefx chat in a terminal


def _read_until_prompt(fd: int, seen: bytearray) -> str:
    """Everything the child writes up to its next "> " prompt (or its exit), ANSI removed."""
    start = len(seen)
    while True:
        ready, _, _ = select.select([fd], [], [], 180)
        assert ready, f"no prompt from anefx chat: {seen.decode(errors='replace')[-2000:]}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            return _clean(seen[start:])
        seen += chunk
        if re.search(rb"(^|\n)> $", bytes(seen[start:]).replace(b"\r", b"")):
            return _clean(seen[start:])


def _clean(raw: bytes | bytearray) -> str:
    text = bytes(raw).decode("utf-8", errors="replace").replace("\r", "")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def _turn(chunk: str) -> tuple[int, list[int], list[int], str]:
    """(kept, fed, generated, reply text) from one turn's output with --show-ids."""

    def ids(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    fed = re.search(r"ids: kept (\d+) cached, fed \d+: ([\d,]*)\n(.*)\nids: generated", chunk)
    gen = re.search(r"ids: generated \d+: ([\d,]*)\n", chunk)
    assert fed and gen, chunk
    return int(fed[1]), ids(fed[2]), ids(gen[1]), fed[3]


def test_chat_in_a_terminal(ckpt: Path, hf) -> None:
    argv = [sys.executable, "-m", "anefx.cli", "chat", str(ckpt), "--show-ids", *SHAPE]
    argv += ["--max-new-tokens", "5", "--dtype", "float32"]
    env = {**os.environ, "TERM": "dumb", "LC_ALL": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: anefx on the terminal
        os.execve(sys.executable, argv, env)
    seen = bytearray()
    try:
        assert "/reset" in _read_until_prompt(fd, seen)  # the help line, then the prompt
        users, turns = ["hello there", "and what next", "/reset", "a new start"], []
        for line in users:
            os.write(fd, line.encode() + b"\n")
            turns.append(_read_until_prompt(fd, seen))
        os.write(fd, b"/quit\n")
        _read_until_prompt(fd, seen)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, _clean(seen)

    kept1, fed1, gen1, shown1 = _turn(turns[0])
    conversation = [{"role": "user", "content": users[0]}]
    assert kept1 == 0 and fed1 == _render(hf, conversation)
    assert shown1 == hf.decode(gen1) and len(gen1) == 5  # the reply, on the terminal
    assert "stopped: --max-new-tokens 5" in turns[0]

    kept2, fed2, gen2, shown2 = _turn(turns[1])
    conversation += [
        {"role": "assistant", "content": shown1},
        {"role": "user", "content": users[1]},
    ]
    want = _render(hf, conversation)
    # the cache kept the first turn: all but the last reply token (chosen, never fed)
    assert kept2 == len(fed1) + len(gen1) - 1
    assert want[:kept2] == fed1 + gen1[:-1] and fed2 == want[kept2:]
    assert shown2 == hf.decode(gen2)

    assert "a new conversation" in turns[2]
    kept3, fed3, _, _ = _turn(turns[3])
    assert kept3 == 0 and fed3 == _render(hf, [{"role": "user", "content": users[3]}])


# ---------------------------------------------------------------------------------------------
# (d) and (e): the tokenizer files travel with an artifact


@pytest.fixture(scope="module")
def artifacts(ckpt: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-artifacts")
    parts, package = root / "parts", root / "one.mlpackage"
    code, _, err = cli("convert", ckpt, "-o", parts, *SHAPE, "--max-chunk-mb", "0.2")
    assert code == 0, err
    code, _, err = cli("convert", ckpt, "-o", package, *SHAPE)
    assert code == 0, err
    return {"parts": parts, "package": package}


CHAT_RUN = ["--chat", "--prompt", MIXED, "--system", "Be brief.", "--max-new-tokens", "6"]


def test_generate_chat_from_the_artifact_alone(ckpt: Path, artifacts, hf) -> None:
    names = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    manifest = json.loads((artifacts["parts"] / "manifest.json").read_text())
    assert manifest["tokenizer_files"] == names and set(manifest["tokenizer_sha256"]) == set(names)
    report = json.loads((artifacts["package"] / REPORT_ITEM).read_text())
    assert report["tokenizer_files"] == names
    assert {f"Data/anefx/{n}" for n in names} <= set(report["files"])

    code, want, err = cli("generate", ckpt, *CHAT_RUN, *SHAPE, "--show-ids")
    assert code == 0, err
    prompt = _render(
        hf, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MIXED}]
    )
    assert f"ids: fed {len(prompt)}: {','.join(map(str, prompt))}" in err
    assert want.strip() and err.strip().splitlines()[-1] == "stopped: --max-new-tokens 6"
    for path in artifacts.values():
        code, out, err = cli("generate", path, *CHAT_RUN)
        assert code == 0, err
        assert out == want, path


def test_a_changed_tokenizer_file_is_refused(artifacts, tmp_path: Path) -> None:
    for kind, name in (
        ("parts", "tokenizer.json"),
        ("package", "Data/anefx/tokenizer_config.json"),
    ):
        copy = Path(shutil.copytree(artifacts[kind], tmp_path / artifacts[kind].name))
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        code, _, err = cli("generate", copy, *CHAT_RUN)
        assert code == 2, err
        one_line(err, name, "sha256")
        shutil.rmtree(copy)
    parts = Path(shutil.copytree(artifacts["parts"], tmp_path / "parts"))
    (parts / "tokenizer_config.json").rename(tmp_path / "elsewhere.json")
    (parts / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    code, _, err = cli("generate", parts, *CHAT_RUN)
    assert code == 2
    one_line(err, "tokenizer_config.json: a symbolic link")
    manifest = json.loads((parts / "manifest.json").read_text())
    del manifest["tokenizer_sha256"]  # as an older anefx wrote it: nothing to check them with
    (parts / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli("generate", parts, *CHAT_RUN)
    assert code == 2
    one_line(err, "manifest.json: lists tokenizer files but records no sha256")


# ---------------------------------------------------------------------------------------------
# what is refused before anything is lowered


def test_refused_flags(ckpt: Path, tmp_path: Path) -> None:
    plain = Path(shutil.copytree(ckpt, tmp_path / "plain"))
    (plain / "tokenizer_config.json").write_text(
        _tokenizer_config(TEMPLATE.replace("enable_thinking", "add_thinking"))
    )
    code, _, err = cli("generate", plain, "--chat", "--prompt", "hi", "--think")
    assert code == 2
    one_line(err, "--think: the chat template of", "has no thinking switch")
    code, _, err = cli("chat", plain, "--no-think")
    assert code == 2
    one_line(err, "--no-think", "no thinking switch")
    code, _, err = cli("generate", ckpt, "--prompt", "hi", "--system", "x")
    assert code == 2
    one_line(err, "--system needs --chat")
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    code, _, err = cli("chat", plain)
    assert code == 2
    one_line(err, "has no chat template")
    # no end tokens: said once, and then every token must fit (checked before loading)
    (plain / "tokenizer_config.json").write_text("{}")
    (plain / "generation_config.json").unlink()
    short = ["--context", "16", "--batch", "4", "--max-new-tokens", "100"]
    code, _, err = cli("generate", plain, "--ids", "1,2", *short)
    assert code == 2 and err.count("no end tokens known") == 1
    one_line(err, "need 101 positions; the context holds 16")


def test_chat_template_jinja_travels(ckpt: Path, hf, tmp_path: Path) -> None:
    """transformers 5 saves the template as chat_template.jinja: it is copied, and read."""
    from anefx.targets.artifact import tokenizer_files

    saved = tmp_path / "saved"
    hf.save_pretrained(saved)
    assert "chat_template.jinja" in tokenizer_files(str(saved))
    loaded = load_text(read_text_files(str(saved)), str(saved))
    assert loaded.tokenizer.template == TEMPLATE and loaded.tokenizer.thinking_switch
