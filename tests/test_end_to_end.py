"""End to end on random-weight checkpoints: transformers vs the lowered graph vs the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anefx
from anefx.core import rules
from anefx.models.capture import causal_mask
from anefx.models.load import load_model
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.coreml import check_package, read_spec

SEQ = 24


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Apple's parity measure: 20 log10(max|ref| / RMSE)."""
    ref, out = ref.double(), out.double()
    rmse = (ref - out).pow(2).mean().sqrt().item()
    return float("inf") if rmse == 0 else 20 * torch.log10(ref.abs().max() / rmse).item()


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own fp32 forward on the checkpoint."""
    hf = load_model(str(folder), dtype=torch.float32).model
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    with torch.no_grad():
        return hf(
            input_ids=ids, position_ids=pos, attention_mask=causal_mask(n), use_cache=False
        ).logits


CASES = {
    # name: (config overrides, checkpoint dtype, shards)
    "tied-bf16": ({}, torch.bfloat16, 1),
    "untied-fp16-sharded": ({"tie_word_embeddings": False, "rms_norm_eps": 1e-5}, torch.float16, 3),
    # a vocabulary over the conv width limit exercises the LM-head split
    "wide-head-fp32": (
        {
            "vocab_size": rules.MAX_CONV_OUT_CHANNELS + 3000,
            "hidden_size": 32,
            "head_dim": 16,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
        },
        torch.float32,
        1,
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory) -> Path:
    overrides, dtype, shards = CASES[request.param]
    cfg = get_preset("qwen3-tiny")
    cfg.update(overrides)
    folder = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(folder, cfg, dtype=dtype, shards=shards, seed=7)
    return folder


def _ids(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_fp32_parity_at_rounding_level(checkpoint: Path) -> None:
    low = anefx.lower(str(checkpoint), seq_len=SEQ, dtype=torch.float32)
    vocab = low.config.vocab_size
    for n, seed in ((SEQ, 0), (SEQ - 5, 1)):  # full length, and a padded shorter prompt
        ids = _ids(vocab, n, seed)
        ref = reference_logits(checkpoint, ids)
        out = low.run(ids)
        assert out.shape == ref.shape == (1, n, vocab)
        err = (out - ref).abs().max().item()
        assert err < 2e-5 * max(1.0, ref.abs().max().item()), err


def test_fp16_psnr_and_emitted_package(checkpoint: Path, tmp_path: Path) -> None:
    low = anefx.lower(str(checkpoint), seq_len=SEQ, dtype=torch.float16)
    assert not low.report.errors, low.report.render()
    ids = _ids(low.config.vocab_size, SEQ, 3)
    ref = reference_logits(checkpoint, ids)
    out = low.run(ids).float()
    assert psnr(ref, out) >= 60.0

    pkg = tmp_path / "out" / "model.mlpackage"
    result = anefx.emit(low, pkg)
    assert pkg.is_dir()
    report = json.loads((pkg / "Data" / "anefx" / "report.json").read_text())
    assert report["lowered"]["errors"] == 0
    assert [r["errors"] for r in report["emitted"]] == [0]
    emitted = check_package(pkg)
    assert len(emitted) == 1 and not emitted[0].errors, emitted[0].render()
    assert result["emitted_reports"][0].stats["ops"] == emitted[0].stats["ops"]

    spec = read_spec(pkg)
    desc = spec.description
    assert [i.name for i in desc.input] == ["input_ids", "position_ids", "causal_mask"]
    assert all(i.shortDescription for i in desc.input)
    assert all(o.shortDescription for o in desc.output)
    slices = rules.lm_head_slices(low.config.vocab_size)
    if slices > 1:
        assert [o.name for o in desc.output] == [f"logits_{i}" for i in range(slices)]
    fn = spec.mlProgram.functions["main"]
    assert spec.specificationVersion >= 9  # iOS18
    ops = [op.type for op in fn.block_specializations[fn.opset].operations]
    assert "linear" not in ops and "rsqrt" not in ops and "pow" not in ops
    assert ops.count("conv") == 7 * low.config.num_hidden_layers + slices
    # every op in a decoder layer points back to its source module
    layer_ops = [o for o in emitted[0].violations if o.module]
    assert all(v.module for v in emitted[0].violations if v.rule != "weights_size") or layer_ops


def test_run_rejects_bad_ids(checkpoint: Path) -> None:
    low = anefx.lower(str(checkpoint), seq_len=8, dtype=torch.float32)
    with pytest.raises(anefx.AnefxInputError, match="exceed"):
        low.run(torch.zeros(1, 9, dtype=torch.long))
