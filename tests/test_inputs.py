"""Tests for the input layer: presets, seeded checkpoints and the checkpoint loader."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from anefx.errors import AnefxInputError
from anefx.models import load as load_mod
from anefx.models.families import supported
from anefx.models.load import LoadedModel, build_meta_model, load_model
from anefx.models.presets import PRESETS, count_parameters, describe_presets, get_preset
from anefx.models.synthetic import random_init_, random_model, write_random_checkpoint

REQUIRED_PRESETS = {
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-14b",
    "qwen3-32b",
    "qwen3-tiny",
}


def tiny(**overrides: object) -> dict:
    cfg = get_preset("qwen3-tiny")
    cfg.update(overrides)
    return cfg


def qwen2_tiny(**overrides: object) -> dict:
    cfg = {
        "model_type": "qwen2",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def token_ids(vocab: int, length: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def raises_input_error(spec: object, *needles: str, **kwargs: object) -> str:
    with pytest.raises(AnefxInputError) as info:
        load_model(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A tied qwen3-tiny checkpoint in fp32."""
    return write_random_checkpoint(tmp_path / "ckpt", tiny(), dtype=torch.float32)


@pytest.fixture
def untied_sharded(tmp_path: Path) -> Path:
    return write_random_checkpoint(
        tmp_path / "sharded", tiny(tie_word_embeddings=False), dtype=torch.float32, shards=3
    )


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tmp_path: Path, dtype: torch.dtype, shards: int, tied: bool) -> None:
    cfg = tiny(tie_word_embeddings=tied)
    folder = write_random_checkpoint(tmp_path / "m", cfg, dtype=dtype, shards=shards, seed=3)

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    stored: dict[str, torch.Tensor] = {}
    for name in files:
        stored.update(load_file(folder / name))
    if shards == 1:
        assert files == ["model.safetensors"]
        assert not (folder / "model.safetensors.index.json").exists()
    else:
        assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(stored)
        assert set(index["weight_map"].values()) == set(files)
    assert ("lm_head.weight" in stored) == (not tied)
    assert {t.dtype for t in stored.values()} == {dtype}

    loaded = load_model(folder, dtype=None)
    assert isinstance(loaded, LoadedModel)
    assert loaded.dtype == dtype and not loaded.meta and not loaded.random_weights
    assert loaded.source == str(folder)
    assert not loaded.model.training

    source = random_model(cfg, dtype=dtype, seed=3)
    got, want = loaded.model.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    tied_now = loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert tied_now == tied

    ids = token_ids(cfg["vocab_size"])
    assert torch.equal(logits(loaded.model, ids), logits(source, ids))


def test_matches_transformers_own_loader(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", tiny(), dtype=torch.bfloat16, shards=3)
    ours = load_model(folder, dtype=torch.bfloat16).model
    theirs = Qwen3ForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="eager"
    )
    ids = token_ids(512)
    assert torch.equal(logits(ours, ids), logits(theirs, ids))
    assert torch.equal(ours.model.rotary_emb.inv_freq, theirs.model.rotary_emb.inv_freq)


def test_qwen2_round_trip(tmp_path: Path) -> None:
    cfg = qwen2_tiny()
    folder = write_random_checkpoint(tmp_path / "q2", cfg, dtype=torch.float32, shards=2)
    loaded = load_model(folder, dtype=torch.float32)
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    bias = loaded.model.model.layers[0].self_attn.q_proj.bias
    assert bias is not None and bias.abs().sum() > 0
    ids = token_ids(cfg["vocab_size"])
    assert torch.equal(logits(loaded.model, ids), logits(random_model(cfg), ids))


def test_write_from_config_object(tmp_path: Path) -> None:
    config = Qwen3Config(**{k: v for k, v in tiny().items() if k != "model_type"})
    folder = write_random_checkpoint(tmp_path / "m", config, dtype=torch.float32, seed=4)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    ids = token_ids(512)
    loaded = load_model(folder, dtype=torch.float32)
    assert torch.equal(logits(loaded.model, ids), logits(random_model(tiny(), seed=4), ids))


def test_load_casts_to_requested_dtype(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", tiny(), dtype=torch.bfloat16)
    as_fp32 = load_model(folder, dtype=torch.float32)
    as_default = load_model(folder)
    source = random_model(tiny(), dtype=torch.bfloat16)
    assert as_fp32.dtype == torch.float32 and as_default.dtype == torch.float16
    for name, want in source.state_dict().items():
        assert torch.equal(as_fp32.model.state_dict()[name], want.float()), name
        assert as_default.model.state_dict()[name].dtype == torch.float16
    # RoPE frequencies stay float32 whatever the weight dtype, as in transformers.
    assert as_default.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_dtype_none_without_config_dtype_uses_tensor_dtype(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", tiny(), dtype=torch.bfloat16)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_model(folder, dtype=None).dtype == torch.bfloat16


def test_legacy_config_spelling(tmp_path: Path) -> None:
    """Published config.json files say rope_theta and torch_dtype, not the v5 names."""
    folder = write_random_checkpoint(tmp_path / "m", tiny(), dtype=torch.float16)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(folder, dtype=None)
    assert loaded.dtype == torch.float16
    assert loaded.config.rope_parameters["rope_theta"] == 1e6
    source = random_model(tiny(), dtype=torch.float16)
    ids = token_ids(512)
    assert torch.equal(logits(loaded.model, ids), logits(source, ids))


def test_max_shard_bytes(tmp_path: Path) -> None:
    folder = write_random_checkpoint(
        tmp_path / "m", tiny(), dtype=torch.float32, max_shard_bytes=100_000
    )
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 3
    embed_bytes = 512 * 64 * 4  # the one tensor larger than the limit gets a shard alone
    assert all(p.stat().st_size < 100_000 + embed_bytes for p in shards)
    ids = token_ids(512)
    assert torch.equal(
        logits(load_model(folder, torch.float32).model, ids), logits(random_model(tiny()), ids)
    )


# ---------------------------------------------------------------------------------------------
# Presets, rotary, attention, meta


def test_preset_rotary_matches_normal_construction() -> None:
    loaded = load_model("preset:qwen3-tiny", dtype=torch.float16)
    assert loaded.random_weights and loaded.source == "preset:qwen3-tiny"
    reference = Qwen3ForCausalLM(
        Qwen3Config(**{k: v for k, v in tiny().items() if k != "model_type"})
    )
    ours, ref = loaded.model.model.rotary_emb, reference.model.rotary_emb
    assert ours.inv_freq.dtype == torch.float32
    assert torch.equal(ours.inv_freq, ref.inv_freq)
    assert torch.equal(ours.original_inv_freq, ref.original_inv_freq)
    assert ours.attention_scaling == ref.attention_scaling


def test_preset_weights_are_seeded() -> None:
    a = load_model("preset:qwen3-tiny", dtype=torch.float32, seed=5).model.state_dict()
    b = load_model("preset:qwen3-tiny", dtype=torch.float32, seed=5).model.state_dict()
    c = load_model("preset:qwen3-tiny", dtype=torch.float32, seed=6).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])


def test_random_init_distributions() -> None:
    model = random_model(tiny(attention_bias=True), dtype=torch.float32, seed=0)
    norm = model.model.layers[0].self_attn.q_norm.weight
    assert not torch.equal(norm, torch.ones_like(norm))
    assert abs(norm.mean().item() - 1.0) < 0.05
    q = model.model.layers[0].self_attn.q_proj
    assert abs(q.weight.std().item() - 0.02) < 0.002
    assert q.bias.abs().sum() > 0
    embed = model.model.embed_tokens.weight
    assert abs(embed.std().item() - 0.02) < 0.002
    again = random_init_(random_model(tiny(attention_bias=True), seed=9), seed=0)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_eager_attention_uses_4d_additive_mask() -> None:
    loaded = load_model("preset:qwen3-tiny", dtype=torch.float32)
    assert loaded.config._attn_implementation == "eager"
    length = 6
    ids = token_ids(512, length)[:1]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    assert torch.allclose(
        logits(loaded.model, ids, attention_mask=causal), logits(loaded.model, ids)
    )
    open_mask = torch.zeros(1, 1, length, length)
    assert not torch.allclose(
        logits(loaded.model, ids, attention_mask=open_mask), logits(loaded.model, ids)
    )


@pytest.mark.parametrize("spec", ["preset:qwen3-tiny", "folder"])
def test_meta_model_is_structure_only_and_exports(spec: str, ckpt: Path) -> None:
    loaded = load_model(ckpt if spec == "folder" else spec, dtype=torch.float16, meta=True)
    assert loaded.meta
    assert all(p.is_meta for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.float16
    length = 5
    ids = torch.zeros(1, length, dtype=torch.long, device="meta")
    mask = torch.zeros(1, 1, length, length, dtype=torch.float16, device="meta")
    exported = torch.export.export(
        loaded.model, (ids,), kwargs={"attention_mask": mask, "use_cache": False}
    )
    assert len(exported.graph.nodes) > 10


def test_big_preset_meta_only() -> None:
    loaded = load_model("preset:qwen3-32b", meta=True)
    assert loaded.dtype == torch.float16
    assert sum(p.numel() for p in loaded.model.parameters()) == count_parameters(
        PRESETS["qwen3-32b"]
    )


def test_preset_too_big_for_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "_total_ram_bytes", lambda: 100_000)
    raises_input_error("preset:qwen3-tiny", "preset:qwen3-tiny", "--meta")
    assert load_model("preset:qwen3-tiny", meta=True).meta


def test_presets_listed() -> None:
    assert REQUIRED_PRESETS <= set(PRESETS)
    rows = {row["name"]: row for row in describe_presets()}
    assert REQUIRED_PRESETS <= set(rows)
    small = rows["qwen3-0.6b"]
    assert small["params"] == 596_049_920
    assert small["fp16_bytes"] == 2 * 596_049_920
    assert (small["layers"], small["hidden"], small["heads"], small["kv_heads"]) == (
        28,
        1024,
        16,
        8,
    )
    assert small["tied"] and not rows["qwen3-8b"]["tied"]
    assert 8.0e9 < rows["qwen3-8b"]["params"] < 8.3e9
    assert 32.5e9 < rows["qwen3-32b"]["params"] < 33e9


@pytest.mark.parametrize(
    "cfg",
    [
        *(get_preset(name) for name in PRESETS),
        tiny(tie_word_embeddings=False, attention_bias=True),
        qwen2_tiny(),
        qwen2_tiny(tie_word_embeddings=True),
    ],
    ids=[*PRESETS, "tiny-untied-bias", "qwen2", "qwen2-tied"],
)
def test_count_parameters_matches_transformers(cfg: dict) -> None:
    model = build_meta_model(load_mod.build_config(cfg), torch.float16)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_get_preset_returns_a_copy() -> None:
    first = get_preset("qwen3-0.6b")
    first["hidden_size"] = 1
    first["rope_parameters"]["rope_theta"] = 1.0
    again = get_preset("qwen3-0.6b")
    assert again["hidden_size"] == 1024
    assert again["rope_parameters"]["rope_theta"] == 1e6
    assert PRESETS["qwen3-0.6b"]["rope_parameters"]["rope_theta"] == 1e6


def test_unknown_preset() -> None:
    with pytest.raises(AnefxInputError, match="qwen3-0.6b") as info:
        get_preset("qwen9")
    assert "qwen9" in str(info.value)
    raises_input_error("preset:qwen9", "qwen9", "qwen3-tiny")


# ---------------------------------------------------------------------------------------------
# Bad folders and configs


def edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def test_folder_missing(tmp_path: Path) -> None:
    raises_input_error(tmp_path / "nope", "nope", "does not exist")


def test_path_is_a_file(ckpt: Path) -> None:
    raises_input_error(ckpt / "config.json", "config.json", "not a folder")


def test_no_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    raises_input_error(ckpt, str(ckpt), "safetensors")


def test_config_missing(ckpt: Path) -> None:
    # Without config.json the shapes give the config (tests/test_infer_config.py); without
    # safetensors as well there is nothing to load.
    (ckpt / "config.json").unlink()
    (ckpt / "model.safetensors").unlink()
    raises_input_error(ckpt, "config.json", "safetensors", "missing")


def test_config_not_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{\n  "model_type": "qwen3",\n  "hidden_size": 64,,\n}')
    raises_input_error(ckpt, "config.json", "line 3 column")


def test_config_not_an_object(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("[1, 2]")
    raises_input_error(ckpt, "config.json", "object")


def test_model_type_missing(ckpt: Path) -> None:
    edit_config(ckpt, model_type=...)
    raises_input_error(ckpt, "config.json", "model_type", f"supported: {supported()}")


def test_model_type_unsupported(ckpt: Path) -> None:
    edit_config(ckpt, model_type="llama")
    raises_input_error(ckpt, "config.json", "'llama'", f"supported: {supported()}")


def test_required_field_missing(ckpt: Path) -> None:
    edit_config(ckpt, hidden_size=...)
    raises_input_error(ckpt, "config.json", "'hidden_size'", "missing")


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", "64"), ("num_hidden_layers", 2.0), ("vocab_size", True), ("head_dim", 0)],
)
def test_field_wrong_type(ckpt: Path, field: str, value: object) -> None:
    edit_config(ckpt, **{field: value})
    raises_input_error(ckpt, "config.json", f"'{field}'", "positive integer")


def test_field_rejected_by_config_class(ckpt: Path) -> None:
    edit_config(ckpt, rms_norm_eps="tiny")
    raises_input_error(ckpt, "config.json", "rms_norm_eps")


def test_heads_not_multiple_of_kv_heads(ckpt: Path) -> None:
    edit_config(ckpt, num_key_value_heads=3)
    raises_input_error(ckpt, "config.json", "num_key_value_heads")


def test_unsupported_dtype_argument(ckpt: Path) -> None:
    raises_input_error(ckpt, "float64", dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Bad tensors and files


def test_index_references_missing_shard(untied_sharded: Path) -> None:
    (untied_sharded / "model-00002-of-00003.safetensors").unlink()
    raises_input_error(
        untied_sharded, "model.safetensors.index.json", "model-00002-of-00003.safetensors"
    )


def test_index_lists_tensor_absent_from_shard(untied_sharded: Path) -> None:
    index_path = untied_sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    raises_input_error(untied_sharded, "model-00001-of-00003.safetensors", "model.norm.weight")


def test_index_not_json(untied_sharded: Path) -> None:
    (untied_sharded / "model.safetensors.index.json").write_text("{oops")
    raises_input_error(untied_sharded, "model.safetensors.index.json", "line 1 column 2")


def rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tensor_missing(ckpt: Path) -> None:
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    raises_input_error(ckpt, str(ckpt), "'model.layers.1.mlp.up_proj.weight'", "missing")


def test_untied_lm_head_missing(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "u", tiny(tie_word_embeddings=False))
    rewrite(folder / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    raises_input_error(folder, "'lm_head.weight'", "missing")


def test_tensor_wrong_shape(ckpt: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(tensors: dict) -> None:
        tensors[name] = tensors[name][:32].contiguous()

    rewrite(ckpt / "model.safetensors", shrink)
    raises_input_error(ckpt, "model.safetensors", name, "[32, 64]", "[64, 64]")


def test_tensor_integer_dtype(ckpt: Path) -> None:
    name = "model.norm.weight"

    def to_int(tensors: dict) -> None:
        tensors[name] = tensors[name].to(torch.int32)

    rewrite(ckpt / "model.safetensors", to_int)
    raises_input_error(ckpt, "model.safetensors", name, "I32")


def test_truncated_file(untied_sharded: Path) -> None:
    shard = untied_sharded / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    raises_input_error(untied_sharded, "model-00003-of-00003.safetensors", "truncated or corrupt")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:5],
        lambda data: (10**12).to_bytes(8, "little") + data[8:],
        lambda data: data[:8] + b"#" + data[9:],
        lambda data: data + b"\0" * 16,
    ],
    ids=["shorter-than-length", "huge-header-length", "header-not-json", "trailing-bytes"],
)
def test_corrupt_file(ckpt: Path, damage: Callable[[bytes], bytes]) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    raises_input_error(ckpt, "model.safetensors", "truncated or corrupt")


def test_extra_tensor_warns(ckpt: Path) -> None:
    def add(tensors: dict) -> None:
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)

    rewrite(ckpt / "model.safetensors", add)
    with pytest.warns(UserWarning, match="rotary_emb.inv_freq"):
        loaded = load_model(ckpt, dtype=torch.float32)
    assert torch.equal(loaded.model.model.norm.weight, random_model(tiny()).model.norm.weight)


def test_tied_checkpoint_with_lm_head_copy(ckpt: Path) -> None:
    def add_same(tensors: dict) -> None:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    rewrite(ckpt / "model.safetensors", add_same)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(ckpt, dtype=torch.float32)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight

    def add_different(tensors: dict) -> None:
        tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])

    rewrite(ckpt / "model.safetensors", add_different)
    with pytest.warns(UserWarning, match="lm_head.weight"):
        load_model(ckpt, dtype=torch.float32)
