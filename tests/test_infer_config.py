"""Config inference from safetensors headers, expert layouts, the new presets, `anefx inspect`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3MoeForCausalLM

from anefx import cli
from anefx.errors import AnefxInputError
from anefx.models import weights
from anefx.models.infer_config import (
    DEFAULTS,
    ConfigDefaultsWarning,
    infer_config,
    infer_from_tensors,
)
from anefx.models.load import build_config, build_meta_model, load_model
from anefx.models.presets import (
    PRESETS,
    count_parameters,
    get_preset,
    num_experts,
    sparse_layers,
)
from anefx.models.synthetic import (
    checkpoint_tensors,
    random_init_,
    random_model,
    write_random_checkpoint,
)

# Fields tensor shapes determine; the inferred config must match the written one on each.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
    "attention_bias",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
)
EXPECTED_DEFAULTS = {
    "qwen3": {"rope_parameters", "rms_norm_eps", "max_position_embeddings"},
    "qwen2": {
        "rope_parameters",
        "rms_norm_eps",
        "max_position_embeddings",
        "num_attention_heads",
        "num_key_value_heads",
    },
    "qwen3_moe": {
        "rope_parameters",
        "rms_norm_eps",
        "max_position_embeddings",
        "num_experts_per_tok",
        "norm_topk_prob",
    },
    "qwen2_moe": {
        "rope_parameters",
        "rms_norm_eps",
        "max_position_embeddings",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts_per_tok",
        "norm_topk_prob",
    },
}


def _variant(name: str, **changes: object) -> dict:
    cfg = get_preset(name)
    cfg.update(changes)
    return cfg


# name -> (config, whether the defaults equal its non-shape fields, so the logits must match)
CASES: dict[str, tuple[dict, bool]] = {
    "qwen3-tiny": (get_preset("qwen3-tiny"), True),
    "qwen2-tiny": (get_preset("qwen2-tiny"), True),
    "qwen3-moe-tiny": (get_preset("qwen3-moe-tiny"), False),  # top-2, the default is 8
    # the defaults (top-k, heads, positions) from the preset with the same experts
    "qwen2-moe-tiny": (get_preset("qwen2-moe-tiny"), True),
    "qwen3-untied-yarn": (
        _variant(
            "qwen3-tiny",
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 512,
            },
        ),
        False,
    ),
    # top-8 of 8 experts, renormalised: what the MoE defaults assume
    "qwen3-moe-top8": (_variant("qwen3-moe-tiny", num_experts_per_tok=8), True),
    # every second layer sparse: decoder_sparse_step 2, no dense list
    "qwen3-moe-step2": (
        _variant("qwen3-moe-tiny", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[]),
        False,
    ),
    # no preset has these shapes: the head_dim rule (128 does not divide the k rows, 64 does)
    "qwen2-rule": (
        _variant(
            "qwen2-tiny",
            hidden_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=96,
            vocab_size=256,
            tie_word_embeddings=False,
        ),
        True,
    ),
}


def _logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _shape_fields(cfg: dict) -> dict:
    out = {k: cfg[k] for k in SHAPE_FIELDS if k in cfg}
    if cfg["model_type"] == "qwen2":
        out.pop("head_dim", None)  # Qwen2 has no head_dim field
        out.pop("attention_bias", None)  # its q/k/v bias is implied by the class
    if not num_experts(cfg):
        for k in ("num_experts", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers"):
            out.pop(k, None)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_infer_recovers_shapes_and_loads(tmp_path: Path, case: str) -> None:
    cfg, defaults_match = CASES[case]
    folder = write_random_checkpoint(tmp_path / "m", cfg, dtype=torch.float32, seed=3)
    declared = load_model(folder, dtype=torch.float32).model
    (folder / "config.json").unlink()

    with pytest.warns(ConfigDefaultsWarning) as caught:
        result = infer_config(folder)
    assert len(caught) == 1
    message = str(caught[0].message)
    got = _shape_fields(result.config)
    want = _shape_fields(cfg)
    if cfg["model_type"] == "qwen3_moe" and not any(
        i not in sparse_layers(cfg) for i in range(cfg["num_hidden_layers"])
    ):
        want.pop("intermediate_size")  # unused with every layer sparse: a default
    assert {k: got.get(k) for k in want} == want
    assert result.config["dtype"] == "float32"
    assert set(result.defaulted) == EXPECTED_DEFAULTS[cfg["model_type"]] | (
        {"intermediate_size"} if "intermediate_size" not in got else set()
    )
    for field, value in result.defaulted.items():
        assert f"{field}={value!r}" in message
    assert not set(result.defaulted) & set(result.inferred)

    with pytest.warns(ConfigDefaultsWarning):
        inferred = load_model(folder, dtype=None)
    assert inferred.dtype == torch.float32 and not inferred.random_weights
    got_state, want_state = inferred.model.state_dict(), declared.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
    if defaults_match:
        vocab = cfg["vocab_size"]
        assert torch.equal(_logits(inferred.model, vocab), _logits(declared, vocab))


def test_qwen2_heads_come_from_the_matching_preset(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", get_preset("qwen2-tiny"), torch.float32)
    (folder / "config.json").unlink()
    result = infer_config(folder, warn=False)
    assert result.config["num_attention_heads"] == 4  # head_dim 16, not a power-of-two guess
    assert "preset:qwen2-tiny" in result.reasons["num_attention_heads"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_infer_recovers_every_preset_from_names_and_shapes(name: str) -> None:
    """Published layouts (experts stored per expert) give back the published shapes."""
    cfg = get_preset(name)
    model = build_meta_model(build_config(cfg, name), torch.bfloat16)

    class Entry:
        def __init__(self, tensor: torch.Tensor) -> None:
            self.dtype, self.shape = "BF16", tuple(tensor.shape)

    stored = {k: Entry(v) for k, v in checkpoint_tensors(model).items()}
    result = infer_from_tensors(stored, name)
    want = _shape_fields(cfg)
    if cfg["model_type"] == "qwen3_moe" and len(sparse_layers(cfg)) == cfg["num_hidden_layers"]:
        # unused with every layer sparse; the default (3 x hidden) is the published value
        assert result.defaulted["intermediate_size"] == cfg["intermediate_size"]
    assert {k: result.config.get(k) for k in want} == want
    assert count_parameters(result.config) == count_parameters(cfg)


def test_defaults_table_is_consistent() -> None:
    for row in DEFAULTS:
        assert row.families and row.why
    # the qwen3-family defaults are the published Qwen3 values
    qwen3 = get_preset("qwen3-8b")
    for row in DEFAULTS:
        if "qwen3" in row.families and not callable(row.value):
            assert qwen3[row.field] == row.value, row.field


# ---------------------------------------------------------------------------------------------
# Expert layouts


def test_per_expert_and_fused_layouts_load_equal(tmp_path: Path) -> None:
    cfg = get_preset("qwen3-moe-tiny")
    per = write_random_checkpoint(tmp_path / "per", cfg, torch.float32, seed=4)
    fused = write_random_checkpoint(
        tmp_path / "fused", cfg, torch.float32, seed=4, expert_layout="fused"
    )
    with safe_open(str(per / "model.safetensors"), "pt") as fh:
        per_names = set(fh.keys())
    with safe_open(str(fused / "model.safetensors"), "pt") as fh:
        fused_names = set(fh.keys())
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in per_names
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused_names
    assert not any(".experts.0." in n for n in fused_names)

    a = load_model(per, dtype=torch.float32).model
    b = load_model(fused, dtype=torch.float32).model
    ref = random_model(cfg, seed=4)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(a.state_dict()[name], tensor), name
        assert torch.equal(b.state_dict()[name], tensor), name
    assert torch.equal(_logits(a, 512), _logits(ref, 512))


def test_transformers_save_pretrained_layout_loads(tmp_path: Path) -> None:
    """save_pretrained writes experts per expert (it reverts the load-time fusion)."""
    ref = random_model(get_preset("qwen3-moe-tiny"), seed=5)
    ref.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    ours = load_model(tmp_path / "hf", dtype=torch.float32).model
    theirs = Qwen3MoeForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    )
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
        assert torch.equal(theirs.state_dict()[name], tensor), name


def test_sharded_per_expert_checkpoint_without_config(tmp_path: Path) -> None:
    cfg = get_preset("qwen3-moe-tiny")
    folder = write_random_checkpoint(
        tmp_path / "m", cfg, torch.float32, seed=6, max_shard_bytes=20_000
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    experts = {
        v for k, v in index["weight_map"].items() if k.startswith("model.layers.0.mlp.experts.")
    }
    assert len(experts) > 1  # one fused parameter's experts come from several shards
    (folder / "config.json").unlink()
    with pytest.warns(ConfigDefaultsWarning):
        loaded = load_model(folder, dtype=torch.float32)
    ref = random_model(cfg, seed=6)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_missing_expert_named(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", get_preset("qwen3-moe-tiny"), torch.float32)
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.5.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(AnefxInputError, match=r"experts\.5\.down_proj\.weight' missing"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------
# Errors


def test_no_config_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnefxInputError) as info:
        load_model(tmp_path / "empty")
    message = str(info.value)
    assert "config.json" in message and "safetensors" in message and "missing" in message


def test_not_a_causal_lm_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "odd").mkdir()
    save_file({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "odd" / "model.safetensors")
    with pytest.raises(AnefxInputError, match="model.embed_tokens.weight' missing") as info:
        load_model(tmp_path / "odd")
    assert "cannot infer the config" in str(info.value)


def test_moe_config_needs_its_widths() -> None:
    cfg = get_preset("qwen3-moe-tiny")
    del cfg["moe_intermediate_size"]
    with pytest.raises(AnefxInputError, match="'moe_intermediate_size' missing"):
        build_config(cfg, "x")
    with pytest.raises(AnefxInputError, match="num_experts_per_tok"):
        build_config(_variant("qwen3-moe-tiny", num_experts_per_tok=9), "x")


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_matches_meta_model(name: str) -> None:
    model = build_meta_model(build_config(get_preset(name), name), torch.bfloat16)
    assert count_parameters(PRESETS[name]) == sum(p.numel() for p in model.parameters())


def test_new_presets_published_totals() -> None:
    billions = {n: count_parameters(PRESETS[n]) / 1e9 for n in PRESETS}
    assert 0.49 < billions["qwen2.5-0.5b"] < 0.50
    assert 7.6 < billions["qwen2.5-7b"] < 7.7
    assert 30.4 < billions["qwen3-30b-a3b"] < 30.6
    assert 234 < billions["qwen3-235b-a22b"] < 236
    assert PRESETS["qwen3-4b-2507"]["rope_parameters"]["rope_theta"] == 5e6


def test_moe_preset_runs_with_sensible_random_experts() -> None:
    loaded = load_model("preset:qwen3-moe-tiny", dtype=torch.float32)
    logits = _logits(loaded.model, 512)
    assert logits.shape == (2, 9, 512) and torch.isfinite(logits).all()
    experts = loaded.model.model.layers[0].mlp.experts
    router = loaded.model.model.layers[0].mlp.gate.weight
    for weight in (experts.gate_up_proj, experts.down_proj, router):
        assert abs(weight.std().item() - 0.02) < 0.003 and abs(weight.mean().item()) < 0.003
    again = random_init_(random_model(get_preset("qwen3-moe-tiny"), seed=9), seed=0)
    assert torch.equal(again.model.layers[0].mlp.experts.down_proj, experts.down_proj)


FAMILY_TINY = ("qwen3-tiny", "qwen2-tiny", "qwen3-moe-tiny", "qwen2-moe-tiny")
ROPE_SCALINGS = {
    "none": None,
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 512},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
}


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: write_random_checkpoint(root / name, get_preset(name), torch.float32)
        for name in FAMILY_TINY
    }


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
@pytest.mark.parametrize("family", FAMILY_TINY)
def test_both_rope_spellings_load_the_same(
    tmp_path: Path, family_ckpts: dict[str, Path], family: str, scaling: str
) -> None:
    """config.json with legacy rope_theta + rope_scaling ("type" or "rope_type") and with the
    transformers-5 rope_parameters give the same rotary tables."""
    base = json.loads((family_ckpts[family] / "config.json").read_text())
    base.pop("rope_parameters")
    params = ROPE_SCALINGS[scaling]
    spellings = {
        "v5": {
            "rope_parameters": {
                "rope_theta": 500000.0,
                "rope_type": scaling if params else "default",
                **(params or {}),
            }
        },
        "legacy-rope_type": {
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": scaling, **params} if params else None,
        },
        "legacy-type": {
            "rope_theta": 500000.0,
            "rope_scaling": {"type": scaling, **params} if params else None,
        },
    }
    rotary = {}
    for spelling, fields in spellings.items():
        folder = tmp_path / spelling
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**base, **fields}))
        (folder / "model.safetensors").hardlink_to(family_ckpts[family] / "model.safetensors")
        emb = load_model(folder, dtype=torch.float32).model.model.rotary_emb
        rotary[spelling] = (emb.rope_type, emb.inv_freq, emb.attention_scaling)
    kind, inv_freq, scaling_factor = rotary["v5"]
    assert kind == (scaling if params else "default")
    for other in ("legacy-rope_type", "legacy-type"):
        assert rotary[other][0] == kind
        assert torch.equal(rotary[other][1], inv_freq)
        assert rotary[other][2] == scaling_factor
    if scaling == "yarn":
        assert scaling_factor > 1.0


# ---------------------------------------------------------------------------------------------
# anefx inspect, and the warning through the CLI


def test_inspect_json_inferred(capsys, tmp_path: Path, monkeypatch) -> None:
    folder = write_random_checkpoint(tmp_path / "m", get_preset("qwen3-moe-tiny"), torch.float32)
    (folder / "config.json").unlink()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(weights, "safe_open", no_reading)  # headers only
    assert cli.main(["inspect", str(folder), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    info = json.loads(out[-1])
    for key in ("hidden_size", "num_experts", "moe_intermediate_size", "rope_parameters"):
        assert key in info
    assert info["_config"] == "inferred" and info["_source"] == str(folder)
    assert "num_experts" in info["_inferred"] and "num_experts_per_tok" in info["_defaulted"]
    assert info["_parameters"] == count_parameters(get_preset("qwen3-moe-tiny"))
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert info["_weight_bytes"] == info["_weight_bytes_by_dtype"]["F32"]
    assert 0 < stored - info["_weight_bytes"] < 20_000  # the rest is the header


def test_inspect_declared_and_preset(capsys, tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", get_preset("qwen2-tiny"), torch.bfloat16)
    assert cli.main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["_config"] == "config.json" and info["_inferred"] == []
    assert info["model_type"] == "qwen2" and "hidden_size" in info["_declared"]
    assert info["_weight_bytes_by_dtype"] == {"BF16": 2 * info["_parameters"]}

    assert cli.main(["inspect", "preset:qwen3-235b-a22b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["_parameters"] == count_parameters(PRESETS["qwen3-235b-a22b"])
    assert 21e9 < info["_active_parameters"] < 23e9
    assert info["_tensors"] is None and info["num_hidden_layers"] == 94

    assert cli.main(["inspect", "preset:qwen3-tiny"]) == 0
    text = capsys.readouterr().out
    assert "head_dim" in text and "declared" in text


def test_inspect_bad_input_exit_2(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert cli.main(["inspect", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "safetensors" in err


def test_cli_lets_the_defaults_warning_through(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", get_preset("qwen3-tiny"), torch.float32)
    (folder / "config.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        cli._quiet()  # what every subcommand runs first: silences the library chatter
        warnings.warn("chatter", UserWarning, stacklevel=1)
        load_model(folder, meta=True)
    kinds = [w.category for w in caught]
    assert kinds == [ConfigDefaultsWarning]
