"""Stateful lowering: KV cache as state, generation on the lowered graphs vs transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anefx.generation import Session, lower_decoder, sample
from anefx.models.load import load_model
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.coreml import emit_functions, read_spec

BATCH, CONTEXT, NEW = 8, 96, 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gen")
    cfg = get_preset("qwen3-tiny")
    write_random_checkpoint(folder, cfg, dtype=torch.float32, seed=11)
    return folder


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_model(str(ckpt), dtype=torch.float32).model


@pytest.fixture(scope="module")
def dec32(ckpt):
    return lower_decoder(str(ckpt), batch=BATCH, context=CONTEXT, dtype=torch.float32)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(hf, prompt: list[int], n: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("n, seed", [(1, 0), (5, 1), (BATCH, 2), (BATCH * 2 + 3, 3)])
def test_greedy_matches_transformers_fp32(hf, dec32, n: int, seed: int) -> None:
    prompt = _prompt(n, seed)
    assert Session(dec32).generate(prompt, max_new_tokens=NEW) == _hf_greedy(hf, prompt)


def test_context_equal_to_batch(ckpt, hf) -> None:
    """The (context, S) cache-write matrix is square then and looks like a rotary row table:
    it must stay computed, and the rotary tables must still fold."""
    dec = lower_decoder(str(ckpt), batch=16, context=16, dtype=torch.float32)
    for low in (dec.prefill, dec.decode):  # the pass manager checked: no cos/sin are left
        assert {e.rule for e in low.report.errors} <= {"fp16"}  # fp32 lowering, for parity
    prompt = _prompt(9, 7)
    assert Session(dec).generate(prompt, max_new_tokens=7) == _hf_greedy(hf, prompt, 7)


def test_continuation_and_multi_turn_equal_one_long_run(hf, dec32) -> None:
    first, second = _prompt(6, 4), _prompt(4, 5)
    s = Session(dec32)
    a = s.generate(first, max_new_tokens=7)
    b = s.generate(None, max_new_tokens=5)  # continue from the cache
    assert a + b == _hf_greedy(hf, first, 12)
    c = s.generate(second, max_new_tokens=6)  # new input appended mid-way
    assert c == _hf_greedy(hf, first + a + b + second, 6)


def test_the_last_slots_of_the_context(hf, dec32) -> None:
    """A prefill call that would pass the end of the cache starts earlier, feeding cached
    tokens again (a call writes its S slots from its first position): the logits of every new
    token still equal transformers', up to the last slot; one more token is refused."""
    prompt = _prompt(CONTEXT - 5, 11)
    s = Session(dec32)
    s.feed(prompt)
    tail = _prompt(5, 12)  # position CONTEXT - 5 + BATCH > CONTEXT: this call starts earlier
    got = s.feed_all(tail)
    assert s.position == CONTEXT
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([prompt + tail]), use_cache=False).logits[0, -5:]
    assert torch.allclose(got, ref, atol=2e-4, rtol=0), (got - ref).abs().max()
    with pytest.raises(Exception, match="context full"):
        s.feed([1])


def test_fp16_logits_psnr_per_step(ckpt, hf) -> None:
    dec16 = lower_decoder(str(ckpt), batch=BATCH, context=CONTEXT, dtype=torch.float16)
    prompt = _prompt(11, 6)
    ref_tokens = _hf_greedy(hf, prompt, 12)
    s = Session(dec16)
    seq = list(prompt)
    logits = s.feed(prompt)
    for t in ref_tokens:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        rmse = (logits.double() - ref.double()).pow(2).mean().sqrt()
        assert 20 * torch.log10(ref.abs().max() / rmse) >= 60
        seq.append(t)
        logits = s.feed([t])


def test_sampling_is_seeded_and_restricted(dec32) -> None:
    prompt = _prompt(5, 7)
    a = Session(dec32).generate(prompt, 10, temperature=1.0, seed=3)
    b = Session(dec32).generate(prompt, 10, temperature=1.0, seed=3)
    assert a == b
    logits = torch.randn(512, generator=torch.Generator().manual_seed(0))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    gen = torch.Generator().manual_seed(1)
    assert {sample(logits, 1.0, top_k=5, generator=gen) for _ in range(200)} <= top5
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((probs[order].cumsum(-1) < 0.5).sum()) + 1].tolist())
    assert {sample(logits, 1.0, top_p=0.5, generator=gen) for _ in range(200)} <= nucleus


def test_a_full_context_stops_generation_and_a_longer_prompt_is_an_error(dec32) -> None:
    s = Session(dec32)
    # the prompt fills 94 of 96 positions: two tokens go in, the third comes from the last logits
    assert len(s.generate(_prompt(CONTEXT - 2, 8), max_new_tokens=5)) == 3
    assert s.stop_reason.describe() == f"context full ({CONTEXT} tokens)"
    with pytest.raises(Exception, match="context full"):
        s.generate(None, max_new_tokens=1)  # the pending token has no slot
    with pytest.raises(Exception, match="context full"):
        Session(dec32).generate(_prompt(CONTEXT + 1, 8), max_new_tokens=1)


def test_package_holds_both_functions_and_the_state(ckpt, tmp_path: Path) -> None:
    dec = lower_decoder(str(ckpt), batch=BATCH, context=CONTEXT, dtype=torch.float16)
    out = tmp_path / "dec.mlpackage"
    result = emit_functions({"prefill": dec.prefill, "decode": dec.decode}, out, default="decode")
    reps = {r.stats["function"]: r for r in result["emitted_reports"]}
    assert set(reps) == {"prefill", "decode"}
    cfg = get_preset("qwen3-tiny")
    # one state: every layer's K and V a row of (2 x layers, kv_heads, head_dim, context)
    layers = cfg["num_hidden_layers"]
    want = [2 * layers, cfg["num_key_value_heads"], cfg["head_dim"], CONTEXT]
    for rep in reps.values():
        assert not rep.errors, rep.render()
        (state,) = rep.stats["states"]
        assert state["shape"] == want and state["dtype"] == "float16"
        # each layer writes its K rows and its V rows in place, one slice_update each
        assert rep.stats["op_types"]["slice_update"] == 2 * layers
        assert rep.stats["op_types"]["write_state"] == 2 * layers
    # the two functions share their weights: the blob holds one function's weights, not two
    blob = sum(f.stat().st_size for f in out.glob("Data/com.apple.CoreML/weights/*"))
    one = reps["decode"].stats["weight_bytes"]
    assert one * 0.9 < blob < one * 1.3, (blob, one)
    spec = read_spec(out)
    assert spec.description.defaultFunctionName == "decode"
    for fn in spec.description.functions:
        feats = [*fn.input, *fn.output, *fn.state]
        assert feats and all(f.shortDescription for f in feats), fn.name


def test_cli_generate_prints_new_ids_last(capsys, ckpt, hf) -> None:
    from anefx.cli import main

    prompt = _prompt(4, 9)
    argv = [
        "generate",
        str(ckpt),
        "--ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        "12",
        "--context",
        str(CONTEXT),
        "--batch",
        str(BATCH),
        "--dtype",
        "float32",
    ]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert [int(t) for t in last.split()] == _hf_greedy(hf, prompt, 12)
    assert main(["generate", str(ckpt), "--prompt", "hello"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_cli_generate_text_with_tokenizer_json(capsys, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from anefx.cli import main

    folder = tmp_path / "ckpt"
    write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float32, seed=2)
    vocab = {f"w{i}": i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    argv = [
        "generate",
        str(folder),
        "--prompt",
        "w5 w17 w301",
        "--max-new-tokens",
        "6",
        "--context",
        "32",
        "--batch",
        "4",
        "--dtype",
        "float32",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out.strip()
    words = text.split()
    assert words and all(w.startswith("w") for w in words)
    hf = load_model(str(folder), dtype=torch.float32).model
    want = _hf_greedy(hf, [5, 17, 301], 6)
    assert [int(w[1:]) for w in text.replace("w", " w").split()] == want


@pytest.mark.parametrize("vocab", [512, 16384 * 2 + 5])
def test_argmax_head_picks_the_greedy_token(tmp_path: Path, vocab: int) -> None:
    import anefx
    from anefx.models.capture import causal_mask

    cfg = get_preset("qwen3-tiny")
    cfg.update(vocab_size=vocab, hidden_size=32, head_dim=16, intermediate_size=64)
    folder = tmp_path / "wide"
    write_random_checkpoint(folder, cfg, dtype=torch.float32, seed=4)
    seq = 6
    logits_low = anefx.lower(str(folder), seq_len=seq, dtype=torch.float32)
    arg_low = anefx.lower(str(folder), seq_len=seq, dtype=torch.float32, argmax=True)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    logits = logits_low.run(ids)[0]
    pos = torch.arange(seq, dtype=torch.int32)[None]
    token, logit = arg_low.graph_module(ids.int(), pos, causal_mask(seq))[:2]
    assert token.dtype == torch.int32
    assert token.flatten().tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logit.flatten(), logits.max(-1).values, rtol=0, atol=1e-5)
    out = tmp_path / "am.mlpackage"
    arg16 = anefx.lower(str(folder), seq_len=seq, dtype=torch.float16, argmax=True)
    assert not arg16.report.errors
    emitted = anefx.emit(arg16, out)["emitted_reports"][0]
    assert not emitted.errors
    from anefx.targets.coreml import read_spec

    names = [o.name for o in read_spec(out).description.output]
    assert names == ["token", "logit"]


def test_stateful_graph_with_a_split_head_keeps_its_states(tmp_path: Path) -> None:
    cfg = get_preset("qwen3-tiny")
    cfg.update(vocab_size=16384 + 77, hidden_size=32, head_dim=16, intermediate_size=64)
    folder = tmp_path / "wide"
    write_random_checkpoint(folder, cfg, dtype=torch.float32, seed=5)
    dec = lower_decoder(str(folder), batch=4, context=32, dtype=torch.float32)
    assert len(dec.decode.signature.logits) == 2 and len(dec.decode.states) == 4
    hf = load_model(str(folder), dtype=torch.float32).model
    prompt = _prompt(6, 10)
    assert Session(dec).generate(prompt, max_new_tokens=8) == _hf_greedy(hf, prompt, 8)
