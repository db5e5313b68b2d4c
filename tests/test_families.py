"""Every Qwen family through the same pipeline, from a checkpoint folder.

Qwen2 (q/k/v bias, no q/k norm), Qwen3 with each rope scaling transformers implements (yarn in
the legacy `rope_scaling` + `rope_theta` spelling, linear and dynamic in `rope_parameters`), and
Qwen3-MoE (per-expert tensors, as published checkpoints store them): fp32 parity with
transformers at rounding level, fp16 PSNR >= 60 dB, and an emitted package without errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_end_to_end import psnr, reference_logits

import anefx
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint

SEQ = 16


def _legacy_yarn(cfg: dict) -> dict:
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 1e6
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    return cfg


FAMILIES = {
    "qwen2-bias": lambda: get_preset("qwen2-tiny"),
    "qwen3-yarn-legacy-spelling": lambda: _legacy_yarn(get_preset("qwen3-tiny")),
    "qwen3-linear": lambda: {
        **get_preset("qwen3-tiny"),
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
    },
    # the tables are transformers' for the captured length: here beyond the original 8
    "qwen3-dynamic": lambda: {
        **get_preset("qwen3-tiny"),
        "max_position_embeddings": 8,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0},
    },
    "qwen3-moe": lambda: get_preset("qwen3-moe-tiny"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(folder, FAMILIES[request.param](), dtype=torch.float32, seed=11)
    return request.param, folder


def _ids(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(seed))


def test_fp32_parity(family) -> None:
    name, folder = family
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float32)
    ids = _ids(low.config.vocab_size, 0)
    ref = reference_logits(folder, ids)
    err = (low.run(ids) - ref).abs().max().item()
    assert err < 2e-5 * max(1.0, ref.abs().max().item()), (name, err)
    if name == "qwen3-moe":
        assert low.report.stats["moe"]["blocks"] == 1  # layer 1 is a dense MLP


def test_fp16_psnr_and_package(family, tmp_path: Path) -> None:
    name, folder = family
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float16)
    assert not low.report.errors, low.report.render()
    ids = _ids(low.config.vocab_size, 1)
    assert psnr(reference_logits(folder, ids), low.run(ids).float()) >= 60.0, name
    result = anefx.emit(low, tmp_path / f"{name}.mlpackage")
    (rep,) = result["emitted_reports"]
    assert not rep.errors, rep.render()


def test_dynamic_rope_within_the_original_length_keeps_the_original_tables(tmp_path) -> None:
    cfg = {
        **get_preset("qwen3-tiny"),
        "max_position_embeddings": 32,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0},
    }
    write_random_checkpoint(tmp_path, cfg, dtype=torch.float32, seed=2)
    low = anefx.lower(str(tmp_path), seq_len=SEQ, dtype=torch.float32)
    ids = _ids(low.config.vocab_size, 2)
    ref = reference_logits(tmp_path, ids)
    assert (low.run(ids) - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item())
