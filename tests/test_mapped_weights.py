"""Weights read in place: parameters live in file mappings, equal the stored values, and their
pages leave the resident set on release (what keeps a chunked conversion's memory to a part)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from anefx.models import load, weights
from anefx.models.presets import get_preset
from anefx.models.synthetic import random_model, write_random_checkpoint


def _mapped_ranges() -> list[tuple[int, int]]:
    maps = [r() for r in weights._MAPS]
    return [(ctypes.addressof(ctypes.c_char.from_buffer(m)), len(m)) for m in maps if m]


def _in_a_mapping(t: torch.Tensor) -> bool:
    return any(a <= t.data_ptr() < a + n for a, n in _mapped_ranges())


@pytest.mark.parametrize(
    ("preset", "stored", "layout"),
    [
        ("qwen3-tiny", torch.float16, "per_expert"),  # mapped from the checkpoint itself
        ("qwen3-tiny", torch.bfloat16, "per_expert"),  # cast into a scratch file, mapped
        ("qwen3-moe-tiny", torch.bfloat16, "per_expert"),  # experts assembled in the file
        ("qwen3-moe-tiny", torch.float16, "fused"),
    ],
)
def test_parameters_are_mapped_and_exact(preset, stored, layout, tmp_path: Path) -> None:
    cfg = get_preset(preset)
    write_random_checkpoint(tmp_path, cfg, dtype=stored, shards=2, seed=4, expert_layout=layout)
    model = load.load_model(str(tmp_path), dtype=torch.float16).model
    ref = random_model(cfg, dtype=stored, seed=4).state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name].to(torch.float16)), name
        assert _in_a_mapping(p), f"{name} was copied into memory"
    # a write to a parameter stays private: the checkpoint file is unchanged
    before = {f.name: f.read_bytes() for f in tmp_path.glob("*.safetensors")}
    with torch.no_grad():
        next(model.parameters()).add_(1)
    assert before == {f.name: f.read_bytes() for f in tmp_path.glob("*.safetensors")}


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.fail("no RssFile in /proc/self/status (this test reads Linux's accounting)")


def test_release_drops_the_pages(tmp_path: Path) -> None:
    cfg = {**get_preset("qwen3-tiny"), "hidden_size": 512, "intermediate_size": 2048}
    cfg["num_hidden_layers"] = 4
    write_random_checkpoint(tmp_path, cfg, dtype=torch.float16, seed=1)
    model = load.load_model(str(tmp_path), dtype=torch.float16).model
    weight_kb = sum(p.nbytes for p in model.parameters()) // 1024
    assert weight_kb > 20_000
    load.release_mapped_pages()
    base = _rss_file_kb()
    total = sum(float(p.float().sum()) for p in model.parameters())  # touch every page
    touched = _rss_file_kb()
    assert touched - base > 0.8 * weight_kb
    assert load.release_mapped_pages() >= 1
    assert _rss_file_kb() - base < 0.1 * weight_kb
    # the values are read back from the page cache afterwards
    assert sum(float(p.float().sum()) for p in model.parameters()) == total
