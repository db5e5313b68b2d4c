"""Seeded random weights and checkpoints in the Hugging Face on-disk layout.

Tests and demos need real-looking checkpoints without downloads. Values depend only on the
seed, the tensor's name and its shape, so the same model comes out whatever the dtype, the
tying or the order in which tensors are visited.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedConfig, PreTrainedModel

from anefx.models.families import family_of
from anefx.models.family import Part, part_of
from anefx.models.load import (
    build_config,
    build_meta_model,
    checkpoint_names,
    materialize_,
    reset_rotary_,
)
from anefx.models.random_weights import CHUNK, NORM_STD, STD, fill_normal_, init_stats, random_init_

__all__ = [
    "checkpoint_tensors",
    "random_init_",
    "random_model",
    "write_random_checkpoint",
]


def _config_copy(config: dict[str, Any] | PreTrainedConfig) -> PreTrainedConfig:
    """A private, validated config set to eager attention (the caller's object is not touched)."""
    if isinstance(config, PreTrainedConfig):
        cfg = copy.deepcopy(config)
        cfg._attn_implementation = "eager"
        return cfg
    return build_config(dict(config))


def random_model(
    config: dict[str, Any] | PreTrainedConfig, dtype: torch.dtype = torch.float32, seed: int = 0
) -> PreTrainedModel:
    """The stock transformers causal LM for `config`, on CPU, with `random_init_` weights.

    Weights match what `load_model` returns for a checkpoint written with the same seed.
    """
    model = build_meta_model(_config_copy(config), dtype)
    materialize_(model)
    random_init_(model, seed)
    reset_rotary_(model)
    model.config.dtype = dtype
    return model.eval()


def _split(sizes: list[int], shards: int | None, max_shard_bytes: int | None) -> list[int]:
    """Shard index per tensor, keeping state-dict order and every shard non-empty."""
    if max_shard_bytes is not None:
        index, used, out = 0, 0, []
        for size in sizes:
            if used and used + size > max_shard_bytes:
                index, used = index + 1, 0
            out.append(index)
            used += size
        return out
    assert shards is not None
    total = sum(sizes) or 1
    index, done, out = 0, 0, []
    for i, size in enumerate(sizes):
        unopened = shards - 1 - index
        must_open = unopened >= len(sizes) - i
        past_target = done + size / 2 > total * (index + 1) / shards
        if out and out[-1] == index and unopened > 0 and (must_open or past_target):
            index += 1
        out.append(index)
        done += size
    return out


# One stored tensor: (stored name, model parameter, where in that parameter); () for the whole
# parameter, else the per-expert slice of a fused expert parameter or the parameter transposed
# (models/family.py Part).
_Source = tuple[str, str, Part]


def _stored_sources(model: PreTrainedModel, expert_layout: str) -> list[_Source]:
    """Where each tensor of `model`'s checkpoint comes from, in checkpoint (state-dict) order."""
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
    full = model.state_dict()
    stored_parts = family_of(model.config).stored_parts
    sources: list[_Source] = []
    for name in checkpoint_names(model):
        shape = tuple(full[name].shape)
        parts = stored_parts(name, shape) if expert_layout == "per_expert" else []
        if parts:
            sources.extend((src, name, index) for index, src in parts)
        else:
            sources.append((name, name, ()))
    return sources


def checkpoint_tensors(
    model: PreTrainedModel, expert_layout: str = "per_expert"
) -> dict[str, torch.Tensor]:
    """The tensors a Hugging Face checkpoint of `model` stores, by name (views, no copies).

    Tied weights are left out. MoE experts come "per_expert" (`experts.<e>.gate_proj.weight`
    ..., as published and as transformers' save_pretrained writes them) or "fused" (the model's
    own `experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I)). Works on the meta
    device too, for names and shapes only.
    """
    full = model.state_dict()
    return {
        src: part_of(full[name], index)
        for src, name, index in _stored_sources(model, expert_layout)
    }


def write_random_checkpoint(
    folder: str | os.PathLike[str],
    config: dict[str, Any] | PreTrainedConfig,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    expert_layout: str = "per_expert",
) -> Path:
    """Write config.json and seeded random safetensors weights in the HF layout; returns folder.

    One `model.safetensors` when a single shard results, else `model-0000k-of-0000n.safetensors`
    plus `model.safetensors.index.json`. `max_shard_bytes`, if given, overrides `shards`: tensors
    are packed in state-dict order into files of at most that many bytes (a larger tensor gets a
    file of its own). Tied embeddings store no lm_head.weight, as HF does. MoE experts are stored
    "per_expert" (`experts.<e>.gate_proj.weight` ..., as published checkpoints and transformers'
    save_pretrained have them) or "fused" (the model's own `experts.gate_up_proj` (E, 2I, H) and
    `experts.down_proj` (E, H, I)). The files equal what saving `random_model(config, dtype,
    seed)` would give, but the model is never materialised: each shard's tensors are generated,
    written and freed in turn, so peak memory is about one shard (plus, for per-expert tensors,
    the one fused expert parameter they are sliced from). Use an empty folder: files from an
    earlier write are not removed.
    """
    if max_shard_bytes is None and shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    # Names, shapes and the init rule (norm or not) come from the meta model; no storage.
    model = build_meta_model(_config_copy(config), dtype)
    params = dict(model.named_parameters())
    sources = _stored_sources(model, expert_layout)
    for _, name, _ in sources:
        if name not in params:
            raise ValueError(f"checkpoint tensor '{name}' is not a parameter; cannot generate it")
    if max_shard_bytes is None and shards > len(sources):
        raise ValueError(f"cannot split {len(sources)} tensors into {shards} shards")
    metas = [part_of(params[name], index) for _, name, index in sources]
    sizes = [t.numel() * t.element_size() for t in metas]
    assignment = _split(sizes, shards, max_shard_bytes)
    count = assignment[-1] + 1
    last_use = {name: i for i, (_, name, _) in enumerate(sources)}

    def file_name(index: int) -> str:
        if count == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{count:05d}.safetensors"

    scratch = torch.empty(CHUNK, dtype=torch.float32)

    def generate(name: str) -> torch.Tensor:
        # The same values random_init_ puts in the materialised parameter of that name.
        param = params[name]
        tensor = torch.empty(param.shape, dtype=param.dtype)
        mean, std = init_stats(model, name, STD, NORM_STD)
        fill_normal_(tensor, seed, name, mean, std, scratch)
        return tensor

    weight_map: dict[str, str] = {}
    fused_name: str | None = None
    fused: torch.Tensor | None = None
    position = 0
    for index in range(count):
        shard: dict[str, torch.Tensor] = {}
        while position < len(sources) and assignment[position] == index:
            stored, name, where = sources[position]
            if not where:
                shard[stored] = generate(name)
            else:
                if fused_name != name:
                    fused = None  # free the previous one before generating the next
                    fused_name, fused = name, generate(name)
                assert fused is not None
                # A copy, so the fused parameter can go as soon as its last slice is taken.
                shard[stored] = part_of(fused, where).contiguous().clone()
                if last_use[name] == position:
                    fused_name, fused = None, None
            position += 1
        save_file(shard, folder / file_name(index), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name(index)))
    if count > 1:
        index_doc = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))

    model.config.dtype = dtype
    model.config.architectures = [type(model).__name__]
    # The full config (use_diff=False) keeps fields equal to class defaults, e.g. head_dim=128,
    # so the file reads the same to any transformers version.
    model.config.to_json_file(folder / "config.json", use_diff=False)
    return folder
