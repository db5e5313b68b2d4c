"""Qwen3.5-MoE (models/families/qwen3_5_moe.py) through the pipeline, against transformers on
tiny random checkpoints: the published vision-language layout (Qwen3_5MoeForConditionalGeneration
.save_pretrained: `model.language_model.*` with the experts stored per expert, the vision tower
and multi-token-prediction tensors beside, an untied head), converted without naming the tower,
and a text-only one with the experts stored fused and a tied head. Each loads as stored;
its lowered graph equals the stock model (fp32 within 1e-4 of the largest logit, fp16 >= 60 dB);
greedy decoding carrying the conv and delta-rule states equals `generate` for a prompt longer
than the batch; a stateful package passes the checker with at most one Core ML state per
function and `verify` on the reference executor. The published presets' counts equal
transformers' models; the config comes back from the tensors alone; recognition and malformed
tensors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from _headers import MTP, header, headers
from _hybrid_moe import (
    SHAPES,
    assert_loads_as_stored,
    fp16_lowered,
    fp32_decoder,
    greedy_tokens,
    package_checked,
    stateful_error,
)
from safetensors.torch import load_file, save_file

from anefx.errors import AnefxInputError
from anefx.models.families import FAMILIES
from anefx.models.infer_config import infer_config, infer_from_tensors
from anefx.models.load import (
    build_config,
    build_meta_model,
    count_config_parameters,
    load_model,
)
from anefx.models.presets import PRESETS, active_parameters, count_parameters, get_preset
from anefx.models.random_weights import random_init_
from anefx.models.synthetic import checkpoint_tensors, random_model, write_random_checkpoint

FAMILY = FAMILIES["qwen3_5_moe_text"]
CLASS = "Qwen3_5MoeForCausalLM"
PUBLISHED = [n for n in FAMILY.presets if "tiny" not in n]
VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 4,
    "num_position_embeddings": 16,
}


def _vl_model(preset: str, seed: int) -> torch.nn.Module:
    text = {k: v for k, v in get_preset(preset).items() if k != "architectures"}
    text["dtype"] = "float32"
    config = transformers.Qwen3_5MoeConfig(
        text_config=text, vision_config=VISION, tie_word_embeddings=text["tie_word_embeddings"]
    )
    model = transformers.Qwen3_5MoeForConditionalGeneration(config).float().eval()
    return random_init_(model, seed)  # every weight random (norms too: their init is 0)


class _Checkpoint:
    """A folder, the stock model whose logits it must give, and its text weights as the
    causal LM names them."""

    def __init__(self, folder: Path, reference: torch.nn.Module, text: dict):
        self.folder, self.reference, self.text = folder, reference, text


def _vl(folder: Path) -> _Checkpoint:
    """The published layout: experts per expert, the vision tower and mtp.* beside, untied."""
    vl = _vl_model("qwen3.5-moe-tiny", seed=7)
    vl.save_pretrained(folder)
    stored = load_file(folder / "model.safetensors")
    assert "model.language_model.layers.0.mlp.experts.7.up_proj.weight" in stored  # per expert
    assert any(k.startswith("model.visual.") for k in stored)
    save_file({**stored, **MTP}, folder / "model.safetensors", metadata={"format": "pt"})
    text = {f"model.{k}": v for k, v in vl.model.language_model.state_dict().items()}
    text["lm_head.weight"] = vl.lm_head.weight
    return _Checkpoint(folder, vl, text)


def _fused(folder: Path) -> _Checkpoint:
    """The text layout with the experts stored fused, (E, 2I, H) and (E, H, I), a tied head."""
    preset = get_preset("qwen3.5-moe-tiny-tied")
    write_random_checkpoint(folder, preset, dtype=torch.float32, seed=4, expert_layout="fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(folder / "model.safetensors")
    model = random_model(preset, torch.float32, seed=4)
    return _Checkpoint(folder, model, model.state_dict())


CHECKPOINTS = {"vl-per-expert-untied": _vl, "text-fused-tied": _fused}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def ckpt(request, tmp_path_factory) -> tuple[str, _Checkpoint]:
    return request.param, CHECKPOINTS[request.param](tmp_path_factory.mktemp(request.param))


def test_loads_as_stored(ckpt, caplog) -> None:
    name, c = ckpt
    with caplog.at_level(logging.INFO):
        assert_loads_as_stored(c.folder, c.text, CLASS)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    if name.startswith("vl"):  # the tower and mtp.* said once, never named by the caller
        (said,) = skipped
        assert "of the vision tower (model.visual.*)" in said and "mtp.*" in said
    else:
        assert skipped == []


@pytest.fixture(scope="module")
def decoder(ckpt):
    return fp32_decoder(ckpt[1].folder)


def test_stateful_fp32_graphs_equal_transformers(ckpt, decoder) -> None:
    """Prefill (full, then padded) and decode steps carrying the states: every position's
    logits within 1e-4 of the largest (against the vision-language model itself for its
    checkpoint)."""
    _, c = ckpt
    assert stateful_error(decoder, c.reference) < 1e-4


def test_greedy_tokens_equal_generate(ckpt, decoder) -> None:
    """transformers' generate of the stock causal LM holding the checkpoint's text weights
    (for the vision-language checkpoint: the causal LM the loader builds, whose weights
    test_loads_as_stored holds equal to the composite model's)."""
    name, c = ckpt
    reference = c.reference
    if name.startswith("vl"):
        reference = load_model(str(c.folder), dtype=torch.float32).model
    got, want = greedy_tokens(decoder, reference)
    assert got == want


def test_fp16_graph_and_the_expert_blocks(ckpt) -> None:
    """fp16 >= 60 dB, no checker error; every layer's block densified, the compute multiplier
    (E I + Is) / (k I + Is) stated with the shared expert's width."""
    _, c = ckpt
    db, moe = fp16_lowered(c.folder, c.reference)
    assert db >= 60.0, db
    cfg = get_preset("qwen3.5-moe-tiny")
    assert moe["blocks"] == cfg["num_hidden_layers"] and "unmatched" not in moe
    e, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    i, shared = cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    assert moe["compute_multiplier"] == pytest.approx((e * i + shared) / (k * i + shared))
    assert (moe["shared_expert_width"], moe["shared_expert_gated"]) == (shared, True)


# one package per family in the default run (a conversion and a verify each); both with -m slow.
# The vision-language folder converts as it is: the caller names no tower.
@pytest.mark.parametrize(
    "name", ["vl-per-expert-untied", pytest.param("text-fused-tied", marks=pytest.mark.slow)]
)
def test_package_on_the_executor(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    CHECKPOINTS[name](folder)
    result = package_checked(folder, tmp_path / "q.mlpackage")
    # verify's own thresholds (50 dB, top-1 0.9) and every reference token in the top 5
    assert result.passed and result.top5_containment == 1.0, result.render()


# ---------------------------------------------------------------------------------------------
# Presets, inference, recognition


@pytest.mark.parametrize("name", list(FAMILY.presets))
def test_preset_counts_equal_transformers(name: str) -> None:
    """count_parameters and count_config_parameters equal transformers' Qwen3_5MoeForCausalLM,
    and the text model (and head) of a Qwen3_5MoeForConditionalGeneration nesting it."""
    cfg = get_preset(name)
    config = build_config(cfg, name)
    model = build_meta_model(config, torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == count_config_parameters(config) == total
    text = {k: v for k, v in cfg.items() if k != "architectures"}
    outer = transformers.Qwen3_5MoeConfig(
        text_config=text, vision_config=VISION, tie_word_embeddings=cfg["tie_word_embeddings"]
    )
    with torch.device("meta"):
        vl = transformers.Qwen3_5MoeForConditionalGeneration(outer)
    head = 0 if cfg["tie_word_embeddings"] else vl.lm_head.weight.numel()
    assert sum(p.numel() for p in vl.model.language_model.parameters()) + head == total


def test_published_presets() -> None:
    """The sizes the names say (published totals add the vision tower and mtp), Qwen3.5's
    shared values, every layer sparse with a shared expert."""
    for name, (total, active) in {
        "qwen3.5-35b-a3b": ((34.5, 35.0), (3.3, 3.5)),
        "qwen3.5-122b-a10b": ((121.5, 122.5), (9.5, 10.0)),
        "qwen3.5-397b-a17b": ((395.5, 397.0), (17.0, 17.5)),
    }.items():
        cfg = PRESETS[name]
        billions = count_parameters(cfg) / 1e9, active_parameters(cfg) / 1e9
        assert total[0] < billions[0] < total[1] and active[0] < billions[1] < active[1], name
        assert (cfg["vocab_size"], cfg["head_dim"], cfg["eos_token_id"]) == (248320, 256, 248046)
        assert cfg["rope_parameters"]["mrope_section"] == [11, 11, 10]
        assert cfg["shared_expert_intermediate_size"] == cfg["moe_intermediate_size"]
        assert not cfg["tie_word_embeddings"] and "intermediate_size" not in cfg
    assert list(PRESETS).index("qwen3.5-35b-a3b") < list(PRESETS).index("qwen3.5-tiny")


@pytest.mark.parametrize("bare", [True, False], ids=["inferred", "declared"])
def test_config_from_the_tensors_alone(ckpt, tmp_path: Path, bare: bool) -> None:
    """Without config.json (either layout): the shapes come back, the rest are the family's
    defaults; the model built from them equals the declared one's."""
    _, c = ckpt
    if not bare:
        config = load_model(str(c.folder), meta=True).config
        assert {k: getattr(config, k) for k in SHAPES} == _shapes(c)
        return
    folder = tmp_path / "bare"
    folder.mkdir()
    for path in c.folder.glob("*.safetensors"):
        (folder / path.name).write_bytes(path.read_bytes())
    result = infer_config(folder, warn=False)
    assert result.config["model_type"] == "qwen3_5_moe_text"
    assert {k: result.config[k] for k in SHAPES} == _shapes(c)
    assert set(result.defaulted) <= {row.field for row in FAMILY.defaults}
    assert result.config["num_experts_per_tok"] == 2  # the tiny preset's, whose shapes these are


def _shapes(c: _Checkpoint) -> dict:
    config = getattr(c.reference.config, "text_config", c.reference.config)
    shapes = {k: getattr(config, k) for k in SHAPES if k != "tie_word_embeddings"}
    shapes["tie_word_embeddings"] = "lm_head.weight" not in _stored_names(c.folder)
    return {k: shapes[k] for k in SHAPES}


def _stored_names(folder: Path) -> set[str]:
    return {k for p in folder.glob("*.safetensors") for k in load_file(p)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_names_give_the_preset_back(name: str) -> None:
    """Each preset's tensor names and shapes, as the published vision-language layout stores
    them (experts per expert under model.language_model.*, the tower and mtp beside), give
    back its shapes, top-k and parameter count."""
    cfg = get_preset(name)
    config = build_config(cfg)
    stored = checkpoint_tensors(build_meta_model(config, torch.bfloat16))
    nested = {k.replace("model.", "model.language_model.", 1): v for k, v in stored.items()}
    nested.update({"model.visual.blocks.0.attn.qkv.weight": torch.empty(6, 2), **MTP})
    result = infer_from_tensors(headers(nested), name)
    assert {k: result.config[k] for k in SHAPES} == {k: getattr(config, k) for k in SHAPES}
    assert result.config["num_experts_per_tok"] == cfg["num_experts_per_tok"]
    assert count_parameters(result.config) == count_parameters(cfg)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (  # a dense MLP where every Qwen3.5-MoE layer routes
            lambda t: {
                **{k: v for k, v in t.items() if not k.startswith("model.layers.1.mlp.")},
                "model.layers.1.mlp.gate_proj.weight": header((128, 64)),
            },
            r"layer 1 \('model.layers.1.mlp.\*'\) has no experts; every Qwen3.5-MoE layer",
        ),
        (
            lambda t: {
                **t,
                "model.layers.2.mlp.experts.down_proj": header((8, 64, 16)),
            },
            r"layers disagree on moe_intermediate_size \(layer 0: 32, layer 1: 32, layer 2: 16",
        ),
        (
            lambda t: {k: v for k, v in t.items() if "3.mlp.shared_expert_gate" not in k},
            r"tensor 'model.layers.3.mlp.shared_expert_gate.weight' missing",
        ),
    ],
)
def test_malformed_tensors_are_named(change, message: str) -> None:
    model = build_meta_model(build_config(get_preset("qwen3.5-moe-tiny")), torch.bfloat16)
    tensors = change(headers(checkpoint_tensors(model, expert_layout="fused")))
    with pytest.raises(AnefxInputError, match=message):
        infer_from_tensors(tensors, "ckpt")


def test_the_state_update_and_the_routing_stay_dense() -> None:
    for inner, kind in (
        ("linear_attn.in_proj_qkv", "ffn"),
        ("mlp.shared_expert.up_proj", "ffn"),
        ("linear_attn.in_proj_a", None),
        ("linear_attn.conv1d", None),
        ("mlp.gate", None),
        ("mlp.shared_expert_gate", None),
    ):
        assert FAMILY.weight_kind(f"model.layers.0.{inner}", "conv") == kind, inner
