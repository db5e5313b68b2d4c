"""The streamed checkpoint writer: the same bytes as saving the materialised random model, with
about one shard in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from anefx.models.load import build_config
from anefx.models.presets import get_preset
from anefx.models.synthetic import (
    _split,
    checkpoint_tensors,
    random_model,
    write_random_checkpoint,
)


def _reference_write(
    folder: Path,
    config: dict[str, Any],
    dtype: torch.dtype,
    seed: int,
    shards: int = 1,
    max_shard_bytes: int | None = None,
    expert_layout: str = "per_expert",
) -> None:
    """The in-memory writer the streamed one replaced: materialise everything, then save."""
    folder.mkdir(parents=True)
    model = random_model(config, dtype=dtype, seed=seed)
    state = checkpoint_tensors(model, expert_layout)
    names = list(state)
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    assignment = _split(sizes, shards, max_shard_bytes)
    count = assignment[-1] + 1

    def file_name(index: int) -> str:
        return (
            "model.safetensors"
            if count == 1
            else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        )

    weight_map: dict[str, str] = {}
    for index in range(count):
        group = [n for n, a in zip(names, assignment, strict=True) if a == index]
        save_file(
            {n: state[n].contiguous() for n in group},
            folder / file_name(index),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(group, file_name(index)))
    if count > 1:
        index_doc = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(folder / "config.json", use_diff=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _untied_tiny() -> dict[str, Any]:
    return {**get_preset("qwen3-tiny"), "tie_word_embeddings": False}


CASES = {
    # tied head: no lm_head.weight stored; three shards by count
    "tied-3-shards": (get_preset("qwen3-tiny"), torch.float16, {"shards": 3}),
    "untied-by-bytes": (_untied_tiny(), torch.bfloat16, {"max_shard_bytes": 40_000}),
    "qwen2-one-file": (get_preset("qwen2-tiny"), torch.float32, {}),
    # 8 KB per-expert slices against 20 KB shards: a fused parameter's experts span several
    # shards, so the writer must carry it across a shard boundary
    "moe-per-expert": (
        get_preset("qwen3-moe-tiny"),
        torch.float32,
        {"max_shard_bytes": 20_000, "expert_layout": "per_expert"},
    ),
    "moe-fused": (
        get_preset("qwen3-moe-tiny"),
        torch.float16,
        {"max_shard_bytes": 20_000, "expert_layout": "fused"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_checkpoint_is_byte_identical_to_the_in_memory_one(
    tmp_path: Path, case: str
) -> None:
    config, dtype, options = CASES[case]
    write_random_checkpoint(tmp_path / "streamed", config, dtype=dtype, seed=5, **options)
    _reference_write(tmp_path / "reference", config, dtype, seed=5, **options)
    streamed, reference = _files(tmp_path / "streamed"), _files(tmp_path / "reference")
    assert list(streamed) == list(reference)
    for name in reference:
        assert streamed[name] == reference[name], name
    shards = [n for n in streamed if n.endswith(".safetensors")]
    if case == "qwen2-one-file":
        assert shards == ["model.safetensors"]
        return
    assert len(shards) >= 3, shards
    index = json.loads(streamed["model.safetensors.index.json"])
    stored = set(index["weight_map"])
    if case == "tied-3-shards":
        assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    if case == "moe-per-expert":
        assert "model.layers.0.mlp.experts.7.up_proj.weight" in stored
        experts = {index["weight_map"][f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]
                   for e in range(8)}  # fmt: skip
        assert len(experts) > 1  # one fused parameter really was split over shards
    if case == "moe-fused":
        assert "model.layers.0.mlp.experts.gate_up_proj" in stored


def test_a_config_object_is_not_modified(tmp_path: Path) -> None:
    config = build_config(get_preset("qwen3-tiny"))
    before = config.to_dict()
    write_random_checkpoint(tmp_path / "m", config, dtype=torch.float16, seed=1)
    assert config.to_dict() == before
    _reference_write(tmp_path / "r", get_preset("qwen3-tiny"), torch.float16, seed=1)
    assert _files(tmp_path / "m") == _files(tmp_path / "r")


def test_bad_max_shard_bytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_shard_bytes"):
        write_random_checkpoint(tmp_path / "m", get_preset("qwen3-tiny"), max_shard_bytes=0)


# A child process writes a ~400 MB fp16 checkpoint in 16 MB shards and reports how far its peak
# RSS rose above its resident size before the write (Linux: /proc and ru_maxrss in KB).
_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from anefx.models.presets import get_preset
    from anefx.models.synthetic import write_random_checkpoint

    folder = sys.argv[1]
    # warm-up: imports, lazy transformers modules and the allocator's first arenas
    write_random_checkpoint(folder + "/warm", get_preset("qwen3-tiny"), torch.float16)
    cfg = {**get_preset("qwen3-tiny"), "hidden_size": 1024, "intermediate_size": 4096,
           "num_hidden_layers": 12, "max_window_layers": 12, "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 8192,
           "tie_word_embeddings": False}
    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))

    # reset the peak (VmHWM) so the imports' and the warm-up's peaks do not count
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS:")
    write_random_checkpoint(folder + "/big", cfg, torch.float16, max_shard_bytes=16 << 20)
    print(json.dumps({"growth": status("VmHWM:") - before}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and ru_maxrss in KB")
def test_writing_holds_about_one_shard_not_the_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    big = tmp_path / "big"
    model_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    assert model_bytes > 350e6 and len(list(big.glob("*.safetensors"))) > 20
    # Holding the model (the old writer) would add at least model_bytes (~400 MB); one 16 MiB
    # shard plus the 16 MiB generation scratch measure 32-48 MB; the bound leaves room for the
    # allocator's per-thread arenas (eight shards, still a third of the model).
    assert growth < 8 * (16 << 20) < model_bytes / 3, (growth, model_bytes)
