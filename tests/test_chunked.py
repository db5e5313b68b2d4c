"""Chunked artifacts: the split, the manifest, chained execution, resume and reproducibility.

A 5-layer model (5 does not divide into 3 chunks evenly) is split into an embedding part,
3 decoder chunks and a head part. The chained parts must compute exactly what the whole graph
computes, in torch and as emitted Core ML programs on the reference executor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import anefx
from anefx.cli import main
from anefx.core.signature import Source, signature_of
from anefx.generation import lower_decoder
from anefx.models.capture import context_mask
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets import chunked
from anefx.targets.artifact import PROGRESS, staging_path
from anefx.targets.chunked import emit_chunked
from anefx.targets.coreml_exec import ChainProgram, load_package
from anefx.targets.reader import read_manifest
from anefx.targets.split_packages import _min_cap_chunks, plan_parts, split_graph
from anefx.targets.verify import verify

LAYERS = 5
CONTEXT, BATCH = 32, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chunked")
    cfg = {**get_preset("qwen3-tiny"), "num_hidden_layers": LAYERS, "max_window_layers": LAYERS}
    cfg["tie_word_embeddings"] = False  # the head part holds its own weights
    write_random_checkpoint(folder, cfg, dtype=torch.float16, seed=21)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))  # copied beside the parts, used by generate
    return folder


@pytest.fixture(scope="module")
def decoder(ckpt: Path):
    return lower_decoder(str(ckpt), batch=BATCH, context=CONTEXT, dtype=torch.float16)


@pytest.fixture(scope="module")
def layer_bytes(decoder) -> int:
    plans = plan_parts(decoder.decode.graph_module, 1)  # one layer per chunk
    return max(p.weight_bytes for p in plans if p.kind == "decoder")


def _three_chunks(layer_bytes: int) -> int:
    return int(2.5 * layer_bytes)  # 2 layers fit, 3 do not: chunks of 2, 2 and 1


@given(
    sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=40),
    cap=st.integers(1, 3000),
)
def test_chunk_sizes_contiguous_minimal_balanced(sizes: list[int], cap: int) -> None:
    groups = _min_cap_chunks(sizes, cap)
    assert [i for g in groups for i in g] == list(range(len(sizes)))  # no drop, no repeat
    for g in groups:
        assert len(g) == 1 or sum(sizes[i] for i in g) <= cap
    # as few groups as greedy filling gives (the minimum for contiguous groups)
    greedy, total = 0, None
    for s in sizes:
        if total is None or total + s > cap:
            greedy, total = greedy + 1, s
        else:
            total += s
    assert len(groups) == greedy
    # balanced: no smaller largest group is possible with that many groups
    several = [sum(sizes[i] for i in g) for g in groups if len(g) > 1]
    if several:
        assert len(_min_cap_chunks(sizes, max(several) - 1)) > len(groups)


def _run_chain(parts, model_in: dict) -> dict:
    produced: list[dict] = []
    for sub in parts:
        args = []
        for n in sub.graph.nodes:
            if n.op != "placeholder":
                continue
            src = signature_of(sub).named(n.name)
            src = getattr(src, "source", None) or Source(model=n.name)  # a state: by its name
            if src.model is not None:
                args.append(model_in[src.model])
            else:
                args.append(produced[src.part][src.output])
        out = sub(*args)
        names = [o.name for o in signature_of(sub).outputs]
        names += [s.name for s in signature_of(sub).states]
        produced.append(dict(zip(names, out, strict=True)))
    return {k: v for d in produced for k, v in d.items()}


@given(scale=st.floats(0.6, 6.0), seed=st.integers(0, 2**16))
def test_chained_parts_equal_the_whole_graph(decoder, layer_bytes, scale, seed) -> None:
    """Any chunk size: every layer once, the final norm once, bit-exact chained outputs."""
    max_bytes = int(scale * layer_bytes)
    plans = plan_parts(decoder.decode.graph_module, max_bytes)
    layers = [i for p in plans for i in p.layers]
    assert layers == list(range(LAYERS))
    assert [p.kind for p in plans][0] == "embed" and plans[-1].kind == "head"
    gen = torch.Generator().manual_seed(seed)
    for low in (decoder.prefill, decoder.decode):
        gm = low.graph_module
        parts = split_graph(gm, plans)
        norm = [i for i, p in enumerate(parts) if "model.norm" in signature_of(p).modules]
        assert len(norm) == 1 and plans[norm[0]].layers[-1] == LAYERS - 1
        s = low.seq_len
        n = int(torch.randint(1, s + 1, (1,), generator=gen))
        start = int(torch.randint(0, CONTEXT - s + 1, (1,), generator=gen))
        pos = torch.tensor([list(range(start, start + n)) + [CONTEXT] * (s - n)], dtype=torch.int32)
        ids = torch.randint(0, 512, (1, s), generator=gen, dtype=torch.int32)
        states = {st_.name: torch.randn(st_.shape, generator=gen).half() for st_ in low.states}
        model_in = {
            "input_ids": ids,
            "position_ids": pos,
            "causal_mask": context_mask(pos, CONTEXT, torch.float16),
            **states,
        }
        whole = gm(ids, pos, model_in["causal_mask"], *states.values())
        names = [o.name for o in signature_of(gm).outputs]
        names += list(states)
        chained = _run_chain(parts, model_in)
        for name, value in zip(names, whole, strict=True):
            assert torch.equal(chained[name], value), name


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_cli_artifact_runs_verifies_and_matches_one_package(
    ckpt: Path, layer_bytes: int, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "parts"
    mb = f"{_three_chunks(layer_bytes) / 2**20:.6f}"
    common = ["--context", str(CONTEXT), "--batch", str(BATCH)]
    assert main(["convert", str(ckpt), "-o", str(out), *common, "--max-chunk-mb", mb]) == 0
    man = read_manifest(out)
    kinds = [p["kind"] for p in man["parts"]]
    assert kinds == ["embed", "decoder", "decoder", "decoder", "head"]
    assert [len(p["layers"]) for p in man["parts"] if p["kind"] == "decoder"] == [2, 2, 1]
    assert man["tokenizer_files"] == ["tokenizer.json"] and (out / "tokenizer.json").is_file()
    assert man["functions"] == ["prefill", "decode"] and man["context"] == CONTEXT
    assert man["checker"]["errors"] == 0 and man["rules_version"] == anefx.core.rules.RULES_VERSION
    for p in man["parts"]:
        assert {r["stage"] for r in p["emitted"]} == {"emitted:prefill", "emitted:decode"}
        assert p["weight_bytes"] <= _three_chunks(layer_bytes)
        # one state per part: its own layers' K and V as rows, K before V, layer by layer
        states = p["functions"]["decode"]["states"]
        if p["layers"]:
            lo, hi = min(p["layers"]), max(p["layers"])
            (state,) = states
            assert state["name"] == f"kv_cache_{lo}_{hi}" and state["kind"] == "kv"
            assert state["layers"] == [i for i in p["layers"] for _ in ("k", "v")]
            assert state["shape"][0] == 2 * len(p["layers"]) and state["shape"][-1] == CONTEXT
        else:
            assert states == []
    # -o naming a package while the model needs several parts: one clear error, nothing written
    bad = tmp_path / "one.mlpackage"
    assert main(["convert", str(ckpt), "-o", str(bad), *common, "--max-chunk-mb", mb]) == 2
    assert "give -o a folder" in capsys.readouterr().err and not bad.exists()

    r = verify(out, str(ckpt), steps=12)
    assert r.psnr_db >= 60.0 and r.top1_agreement == 1.0, r.render()

    # the chained Core ML programs compute exactly what the one-package program computes
    one = tmp_path / "one.mlpackage"
    assert main(["convert", str(ckpt), "-o", str(one), *common]) == 0
    whole, chain = load_package(one), ChainProgram(out)
    rng = np.random.default_rng(0)
    for fn, s in (("prefill", BATCH), ("decode", 1)):
        pos = np.arange(3, 3 + s, dtype=np.int32)[None]
        feeds = {
            "input_ids": rng.integers(0, 512, (1, s)).astype(np.int32),
            "position_ids": pos,
            "causal_mask": context_mask(torch.from_numpy(pos), CONTEXT, torch.float16).numpy(),
        }
        ((name, shape),) = [(k, v.shape) for k, v in whole.zero_states(fn).items()]
        states = {name: rng.standard_normal(shape).astype(np.float16)}
        # each part's one state is its layers' rows of the whole model's state, in order
        rows, parts = 0, {}
        for held in chain.states(fn):
            parts[held["name"]] = states[name][rows : rows + held["shape"][0]]
            rows += held["shape"][0]
        assert rows == shape[0]
        a_out, a_states = whole.run(fn, feeds, states)
        b_out, b_states = chain.run(fn, feeds, parts)
        assert a_out.keys() == b_out.keys() and b_states.keys() == parts.keys()
        for k in a_out:
            np.testing.assert_array_equal(a_out[k], b_out[k])
        np.testing.assert_array_equal(
            a_states[name], np.concatenate([b_states[k] for k in parts], axis=0)
        )

    # generate runs the artifact from its manifest, with the tokenizer copied beside the parts
    capsys.readouterr()
    assert main(["generate", str(out), "--ids", "5,6,7,8,9", "--max-new-tokens", "4"]) == 0
    by_ids = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert len(by_ids) == 4
    assert main(["generate", str(out), "--prompt", "w5 w6 w7 w8 w9", "--max-new-tokens", "4"]) == 0
    # the text of all the new ids decoded together (this word-level tokenizer joins with spaces)
    assert capsys.readouterr().out.strip() == " ".join(f"w{t}" for t in by_ids)


def test_manifest_errors_name_the_field(ckpt, decoder, layer_bytes, tmp_path: Path) -> None:
    lowered = {"prefill": decoder.prefill, "decode": decoder.decode}
    out = tmp_path / "m"
    emit_chunked(lowered, out, _three_chunks(layer_bytes), default="decode")
    good = json.loads((out / "manifest.json").read_text())

    def broken(edit) -> str:
        doc = json.loads(json.dumps(good))
        edit(doc)
        (out / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(anefx.AnefxInputError) as exc:
            read_manifest(out)
        return str(exc.value)

    assert "expected each of 0..4 once" in broken(lambda d: d["parts"][2]["layers"].pop())
    assert "'format'" in broken(lambda d: d.update(format="other"))

    def rewire(d):
        d["parts"][1]["functions"]["decode"]["inputs"][0]["from"] = {"part": 3, "output": "x"}

    assert "no earlier part gives it" in broken(rewire)
    shutil.rmtree(out / good["parts"][1]["file"])
    (out / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(anefx.AnefxInputError, match="is not in the folder"):
        read_manifest(out)


def test_resume_after_a_crash_gives_the_same_files(
    decoder, layer_bytes, tmp_path: Path, monkeypatch
) -> None:
    lowered = {"prefill": decoder.prefill, "decode": decoder.decode}
    cap = _three_chunks(layer_bytes)
    whole = tmp_path / "whole"
    emit_chunked(lowered, whole, cap, default="decode")

    crashed = tmp_path / "crashed"
    written = []

    def crash_after_two() -> int:
        written.append(1)
        if len(written) == 2:
            raise KeyboardInterrupt  # killed right after the second part was recorded
        return 0

    monkeypatch.setattr(chunked, "release_mapped_pages", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        emit_chunked(lowered, crashed, cap, default="decode")
    monkeypatch.undo()
    # nothing at the output; the finished parts wait in its staging folder
    assert not crashed.exists()
    staged = staging_path(crashed) / crashed.name
    with pytest.raises(anefx.AnefxInputError, match="--resume"):
        read_manifest(crashed)
    kept = {p.name: p.stat().st_mtime_ns for p in staged.glob("*.mlpackage")}
    assert len(kept) == 2
    (staged / ".partial-04_head.mlpackage").mkdir()  # a part a killed run was writing

    said: list[str] = []
    emit_chunked(lowered, crashed, cap, default="decode", resume=True, progress=said.append)
    assert sum("already written" in m for m in said) == 2
    assert {
        p.name: p.stat().st_mtime_ns for p in crashed.glob("*.mlpackage") if p.name in kept
    } == kept
    assert _tree(crashed) == _tree(whole)  # parts and manifest, byte for byte
    assert not staging_path(crashed).exists()

    # another conversion's parts are not resumed silently
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(chunked, "release_mapped_pages", crash_after_two)
        written.clear()
        emit_chunked(lowered, tmp_path / "other", cap, default="decode")
    monkeypatch.undo()
    progress = staging_path(tmp_path / "other") / "other" / PROGRESS
    progress.write_text(json.dumps({"key": "other", "written": {}, "emitted": {}}))
    with pytest.raises(anefx.AnefxInputError, match="another model, other options"):
        emit_chunked(lowered, tmp_path / "other", cap, default="decode", resume=True)
    # a damaged record keeps nothing: every part is written again, the same bytes
    progress.write_text('{"key": ')
    said.clear()
    emit_chunked(
        lowered, tmp_path / "other", cap, default="decode", resume=True, progress=said.append
    )
    assert not any("already written" in m for m in said)
    assert _tree(tmp_path / "other") == _tree(whole)


def test_palettized_parts_check_verify_and_repeat(
    ckpt: Path, decoder, layer_bytes, tmp_path: Path
) -> None:
    """--lut-ffn 4 --lut-head 8: LUT ops in the chunks and the head only, 0 checker errors,
    verify runs them (as one package would), and a second conversion gives the same bytes."""
    from anefx.targets.coreml import read_spec

    lowered = {"prefill": decoder.prefill, "decode": decoder.decode}
    again = lower_decoder(str(ckpt), batch=BATCH, context=CONTEXT, dtype=torch.float16)
    lut = {"ffn": 4, "head": 8}
    runs = [tmp_path / "a", tmp_path / "b"]
    # the second conversion lowers the model again in this process: the same bytes anyway
    for out, dec in zip(runs, (decoder, again), strict=True):
        lowered = {"prefill": dec.prefill, "decode": dec.decode}
        man = emit_chunked(lowered, out, layer_bytes, default="decode", lut=lut)
    assert man["checker"]["errors"] == 0 and man["lut"] == lut
    # sized by the bytes stored: 4-bit layers at about a quarter, so several per chunk where
    # fp16 layers take one chunk each
    chunks = [p for p in man["parts"] if p["kind"] == "decoder"]
    assert len(chunks) < len(plan_parts(decoder.decode.graph_module, layer_bytes)) - 2
    assert all(p["planned_bytes"] <= layer_bytes < p["weight_bytes"] for p in chunks)
    for p in man["parts"]:  # the planned bytes hold: the checker measures what was stored
        stored = max(r["stats"]["weight_bytes"] for r in p["emitted"])
        assert stored <= layer_bytes, (p["file"], stored)
    for p in man["parts"]:
        spec = read_spec(runs[0] / p["file"])
        ops = {
            op.type
            for f in spec.mlProgram.functions.values()
            for b in f.block_specializations.values()
            for op in b.operations
        }
        want = {"embed": {}, "decoder": {"ffn": 4}, "head": {"head": 8}}[p["kind"]]
        assert p["lut"] == want
        assert ("constexpr_lut_to_dense" in ops) == bool(want), p["file"]
    assert _tree(runs[0]) == _tree(runs[1])
    # the parts carry the same palettized weights as one package would: identical results
    from anefx.targets.coreml import emit_functions

    one = tmp_path / "one.mlpackage"
    emit_functions(lowered, one, default="decode", lut=lut)
    r, r_one = verify(runs[0], str(ckpt), steps=8), verify(one, str(ckpt), steps=8)
    assert r.per_position_psnr_db == r_one.per_position_psnr_db
    assert r.tokens_package == r_one.tokens_package
    assert r.psnr_db >= 15.0, r.render()  # 4-bit tables on random weights: ~20 dB here


def test_bad_lut_bits_fail_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x"
    assert main(["convert", "preset:qwen3-tiny", "-o", str(out), "--lut-ffn", "5"]) == 2
    err = capsys.readouterr().err
    assert "must be one of 1, 2, 3, 4, 6, 8" in err and "lowering" not in err
    assert not out.exists()
