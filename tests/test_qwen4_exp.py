"""Qwen4-Exp: what lowers (hyper-connections, Gated DeltaNet, MoE with a shared expert) is
lowered at rounding level against transformers; what does not (PLE's n-gram hashing and dilated
conv, QSA's top-k selection) is reported by the checker, grouped by the transformers class it
comes from, and `anefx check` exits 1 naming it, never with a traceback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _cli import cli
from test_end_to_end import psnr

import anefx
from anefx.models.capture import causal_mask
from anefx.models.families import FAMILIES
from anefx.models.families.qwen4_exp import qsa_selection
from anefx.models.load import build_config
from anefx.models.presets import get_preset, sparse_layers
from anefx.models.synthetic import random_model, write_random_checkpoint

SEQ = 12
FAMILY = FAMILIES["qwen4_exp_text"]


def _ids(vocab: int, seed: int, n: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def linear(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The linear-only variant (hyper-connections, Gated DeltaNet, MoE, no PLE, no attention
    layer and so no QSA) as a checkpoint folder, and transformers' model of it (fp32)."""
    cfg = {**get_preset("qwen4-exp-tiny-no-ple"), "layer_types": ["linear_attention"] * 4}
    cfg["tie_word_embeddings"] = False
    folder = tmp_path_factory.mktemp("qwen4-linear")
    write_random_checkpoint(folder, cfg, dtype=torch.float32, seed=7)
    model = random_model(cfg, torch.float32, seed=7)
    return folder, model


def test_what_lowers_lowers_with_parity(linear) -> None:
    """The hyper-connections (mean_to_sum, repeat_to_cat), the linear layers and the MoE: 0
    errors in fp16, fp32 logits at rounding level and fp16 PSNR >= 60 dB against transformers."""
    folder, model = linear
    low16 = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float16)
    assert not low16.report.errors, low16.report.render()
    assert not low16.report.blocking()
    low32 = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, 3)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    got = low32.run(ids)
    err = (got - ref).abs().max().item()
    assert err < 1e-4 * max(1.0, ref.abs().max().item()), err
    assert psnr(ref, low16.run(ids).float()) >= 60


def test_without_ple_qsa_blocks_alone() -> None:
    """Without PLE every error lies in the QSA selection (top-k: routing, the chosen blocks'
    scatter) or in the attention laying its mask over the causal one; the table says so."""
    rep = anefx.lower("preset:qwen4-exp-tiny-no-ple", seq_len=SEQ, dtype=torch.float16).report
    blocking = rep.blocking()
    assert {g["class"] for g in blocking} == {"Qwen4ExpTextQSAIndexer", "Qwen4ExpTextAttention"}
    assert sum(g["errors"] for g in blocking) == len(rep.errors)
    qsa = next(g for g in blocking if g["class"] == "Qwen4ExpTextQSAIndexer")
    assert qsa["module"] == "model.layers.*.self_attn.indexer"
    assert qsa["ops"]["topk"] == 1 and qsa["rules"]["routing"] == 1 and qsa["rules"]["scatter"]
    text = rep.render()
    assert "blocked by" in text
    assert "Qwen4ExpTextQSAIndexer (model.layers.*.self_attn.indexer): " in text
    assert rep.to_dict()["blocking"] == blocking
    # the indexer's top-k ranks attention scores, not router probabilities: no MoE block (the
    # family's own experts are densified, one block per layer)
    assert "unmatched" not in rep.stats["moe"] and "not densified" not in text
    assert rep.stats["moe"]["blocks"] == len(sparse_layers(get_preset("qwen4-exp-tiny-no-ple")))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The tiny preset with PLE and QSA as transformers saves it (each n-gram table in 512 row
    shards, the int64 hash buffers beside), and transformers' model (fp32)."""
    model = random_model(get_preset("qwen4-exp-tiny"), torch.float32, seed=5)
    folder = tmp_path_factory.mktemp("qwen4-saved")
    model.save_pretrained(folder)
    return folder, model


def test_the_blocked_graph_still_computes_the_model(saved) -> None:
    """Loaded from transformers' save, captured (QSA substituted) and through every pass, the
    graph is not emittable but computes transformers' logits (fp32, rounding level): what the
    report names is the model's own computation, not a capture artefact."""
    folder, model = saved
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float32)
    assert low.report.errors
    for seed in range(3):
        ids = _ids(model.config.vocab_size, seed)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        err = (low.run(ids) - ref).abs().max().item()
        assert err < 1e-4 * max(1.0, ref.abs().max().item()), (seed, err)


def test_check_exits_1_naming_the_constructs(saved) -> None:
    """`anefx check --json` on the saved folder: exit 1, no traceback, every error in a
    construct the family says no pass lowers: the n-gram hashing (int_arith), QSA (top-k), the
    PLE gate's abs / sign / sqrt, each with its module path pattern; the PLE layers' dilated
    conv and padding are lowered (dilated_conv_to_taps, pad_to_cat)."""
    import json

    folder, _ = saved
    code, out, err = cli("check", folder, "--seq", SEQ, "--json")
    assert code == 1 and "Traceback" not in err, err
    report = json.loads(out)
    by_class = {g["class"]: g for g in report["blocking"]}
    assert set(by_class) == set(FAMILY.unlowered)
    assert sum(g["errors"] for g in by_class.values()) == report["errors"]
    hashing = by_class["Qwen4ExpTextNGramEmbedding"]
    assert hashing["module"] == "model.layers.*.ple.ple_embedding"
    assert hashing["ops"]["bitwise_xor"] and hashing["rules"]["int_arith"]
    assert by_class["Qwen4ExpTextQSAIndexer"]["ops"]["topk"] == 1
    ple = by_class["Qwen4ExpTextPLELayer"]
    assert ple["module"] == "model.layers.*.ple" and set(ple["ops"]) == {
        "abs",
        "sign",
        "sqrt",
        "clamp_min",
    }
    assert "dilated_conv" not in report["counts"]


# the real shape (32 s, 0.7 GB here) under -m slow: the family does not lower, and the default
# run checks the same exit and naming on the tiny checkpoints (the test budget)
@pytest.mark.slow
def test_check_of_the_published_shape_on_meta() -> None:
    """`anefx check preset:qwen4-exp --meta`: the 108B structure (its 41B n-gram table never
    allocated), exit 1 with the constructs named."""
    code, out, err = cli("check", "preset:qwen4-exp", "--meta")
    assert code == 1 and "Traceback" not in err, err
    assert "blocked by" in out
    for cls in FAMILY.unlowered:
        assert cls in out, (cls, out)


def test_no_stateful_capture(tmp_path: Path) -> None:
    """A stateful (--context) lowering is refused in one line naming why (exit 2)."""
    folder = tmp_path / "ckpt"
    write_random_checkpoint(folder, get_preset("qwen4-exp-tiny-no-ple"), dtype=torch.float32)
    with pytest.raises(anefx.AnefxInputError, match="no stateful"):
        anefx.lower(str(folder), seq_len=4, dtype=torch.float32, context=16)


def _topk_scores(monkeypatch) -> list[torch.Tensor]:
    """Record the scores every Tensor.topk of transformers' indexer ranks (one per query)."""
    seen: list[torch.Tensor] = []
    original = torch.Tensor.topk

    def topk(self, *args, **kwargs):
        seen.append(self.detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", topk)
    return seen


@pytest.mark.parametrize("seed", range(12))
def test_qsa_selection_equals_transformers(seed: int, monkeypatch) -> None:
    """The loop-free selection capture substitutes equals transformers' loop on random
    indexers, lengths, block sizes and budgets (causal masks): the same mask, or, where top-k
    met equal scores (relu makes a block's score 0 whenever every head is negative), the same
    number of blocks with the same scores."""
    from transformers.models.qwen4_exp.modeling_qwen4_exp import (
        Qwen4ExpTextQSAIndexer,
        Qwen4ExpTextRotaryEmbedding,
    )

    g = torch.Generator().manual_seed(seed)
    r = (2, 4)[seed % 2]
    budget = r * (1 + seed % 3)
    seq = 5 + (seed * 7) % 20
    raw = {
        **get_preset("qwen4-exp-tiny-no-ple"),
        "indexer_compress_ratio": r,
        "indexer_budget": budget,
        "indexer_n_heads": 1 + seed % 3,
    }
    cfg = build_config(raw)
    indexer = Qwen4ExpTextQSAIndexer(cfg, 3).eval()
    for p in indexer.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=g)
    hidden = torch.randn(1, seq, cfg.hidden_size, generator=g)
    positions = torch.arange(seq)[None, None].expand(3, 1, seq)
    tables = Qwen4ExpTextRotaryEmbedding(cfg)(hidden, positions)
    mask = causal_mask(seq, torch.float32)
    with torch.no_grad():
        scores = _topk_scores(monkeypatch)
        want = indexer(hidden, tables, mask, None)[0, 0]
        monkeypatch.undo()
        got = qsa_selection(indexer, hidden, tables, mask, None)[0, 0]
    assert got.shape == want.shape and got.dtype == torch.bool
    ranked = iter(scores)
    for q in range(seq):
        complete = (q + 1) // r
        if not complete:
            assert torch.equal(got[q], want[q])
            continue
        score = next(ranked)  # (complete,) this query's block scores, as transformers has them
        if torch.equal(got[q], want[q]):
            continue
        # the tail is the same; the chosen blocks differ only among equal scores
        tail = slice(complete * r, None)
        assert torch.equal(got[q, tail], want[q, tail]), q
        chosen = (
            [got[q, b * r].item() for b in range(complete)],
            [want[q, b * r].item() for b in range(complete)],
        )
        mine = sorted(score[b].item() for b in range(complete) if chosen[0][b])
        theirs = sorted(score[b].item() for b in range(complete) if chosen[1][b])
        assert len(mine) == len(theirs) == min(budget // r, complete), q
        assert mine == pytest.approx(theirs, abs=1e-6), (q, score)


def test_parameter_count_and_the_table_on_meta() -> None:
    """The published preset's count is transformers' (108.4B), the n-gram table about 41B of
    it (16 heads x ~20M rows x 128), as the class's comment says (~45B)."""
    from anefx.models.families.qwen4_exp import _ngram_rows
    from anefx.models.presets import count_parameters

    cfg = get_preset("qwen4-exp")
    table = _ngram_rows(cfg, 0) * (cfg["hidden_size"] // 16)
    assert 40e9 < table < 46e9
    assert 100e9 < count_parameters(cfg) < 120e9
    assert math.isclose(count_parameters(cfg) / 1e9, 108.39, abs_tol=0.01)


def test_the_matrix_row_names_what_blocks() -> None:
    """`anefx matrix`'s row of a blocked preset lists its constructs (class, path, errors)."""
    from anefx.lowering.matrix import matrix_row, render_matrix

    row = matrix_row("qwen4-exp-tiny", seq_len=SEQ)
    assert {g["class"] for g in row["blocking"]} == set(FAMILY.unlowered)
    assert row["errors_after_except_size"] == sum(g["errors"] for g in row["blocking"])
    text = render_matrix([row])
    assert "blocked by Qwen4ExpTextNGramEmbedding (model.layers.*.ple.ple_embedding, " in text
    assert row["family"] == "qwen4_exp_text"
