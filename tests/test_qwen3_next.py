"""Qwen3-Next (models/families/qwen3_next.py) through the pipeline, against transformers'
Qwen3NextForCausalLM on tiny random checkpoints: transformers' own save (experts per expert,
as published; an untied head; a dense layer beside the sparse ones; multi-token-prediction
tensors beside, skipped and said) and a fused-expert one with a tied head. Each loads as
stored; its lowered graph equals the stock model (fp32 within 1e-4 of the largest logit, fp16
>= 60 dB); greedy decoding carrying the conv and delta-rule states equals `generate` for a
prompt longer than the batch; a stateful package passes the checker with at most one Core ML
state per function and `verify` on the reference executor. The fused projections, interleaved
per key head, lower to Qwen3.5's convs (random head counts and widths). The
published preset's count equals transformers' model; the config comes back from the tensors
alone; recognition and malformed tensors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from _headers import MTP, header, headers
from _hybrid_moe import (
    SEQ,
    SHAPES,
    assert_loads_as_stored,
    fp16_lowered,
    fp32_decoder,
    greedy_tokens,
    ids,
    package_checked,
    psnr,
    stateful_error,
    stock_logits,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import anefx
from anefx.errors import AnefxInputError
from anefx.models.families import FAMILIES
from anefx.models.infer_config import infer_config, infer_from_tensors, recognise
from anefx.models.load import (
    build_config,
    build_meta_model,
    count_config_parameters,
    load_model,
)
from anefx.models.presets import (
    PRESETS,
    active_parameters,
    count_parameters,
    get_preset,
    sparse_layers,
)
from anefx.models.synthetic import checkpoint_tensors, random_model, write_random_checkpoint

FAMILY = FAMILIES["qwen3_next"]
CLASS = "Qwen3NextForCausalLM"


def _saved(folder: Path) -> torch.nn.Module:
    """transformers' save_pretrained of the untied tiny preset, plus mtp.* tensors."""
    model = random_model(get_preset("qwen3-next-tiny"), torch.float32, seed=3)
    model.save_pretrained(folder)
    stored = load_file(folder / "model.safetensors")
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in stored  # per expert
    save_file({**stored, **MTP}, folder / "model.safetensors", metadata={"format": "pt"})
    return model


def _fused(folder: Path) -> torch.nn.Module:
    """The tied tiny preset with its experts stored fused, (E, 2I, H) and (E, H, I)."""
    write_random_checkpoint(
        folder,
        get_preset("qwen3-next-tiny-tied"),
        dtype=torch.float32,
        seed=4,
        expert_layout="fused",
    )
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(folder / "model.safetensors")
    return random_model(get_preset("qwen3-next-tiny-tied"), torch.float32, seed=4)


CHECKPOINTS = {"saved-per-expert-untied": _saved, "fused-tied": _fused}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def ckpt(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, CHECKPOINTS[request.param](folder)


def test_loads_as_stored(ckpt, caplog) -> None:
    name, folder, model = ckpt
    with caplog.at_level(logging.INFO):
        assert_loads_as_stored(folder, model.state_dict(), CLASS)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    if name.startswith("saved"):
        (said,) = skipped
        assert f"skipping {len(MTP)} stored tensors" in said and "mtp.*" in said
    else:
        assert skipped == []


@pytest.fixture(scope="module")
def decoder(ckpt):
    return fp32_decoder(ckpt[1])


def test_stateful_fp32_graphs_equal_transformers(ckpt, decoder) -> None:
    """Prefill (full, then padded) and decode steps carrying the states: every position's
    logits within 1e-4 of the largest."""
    _, _, model = ckpt
    assert stateful_error(decoder, model) < 1e-4


def test_greedy_tokens_equal_generate(ckpt, decoder) -> None:
    _, _, model = ckpt
    got, want = greedy_tokens(decoder, model)
    assert got == want


def test_fp16_graph_and_the_expert_blocks(ckpt) -> None:
    """fp16 >= 60 dB, no checker error; every sparse layer's block densified, the compute
    multiplier (E I + Is) / (k I + Is) stated with the shared expert's width."""
    _, folder, model = ckpt
    db, moe = fp16_lowered(folder, model)
    assert db >= 60.0, db
    cfg = model.config
    assert moe["blocks"] == len(sparse_layers(cfg.to_dict())) and "unmatched" not in moe
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    i, shared = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    assert moe["compute_multiplier"] == pytest.approx((e * i + shared) / (k * i + shared))
    assert (moe["shared_expert_width"], moe["shared_expert_gated"]) == (shared, True)


def test_fp16_ranks_experts_by_the_router_logits() -> None:
    """The preset's seeded weights (`anefx diff preset:qwen3-next-tiny`) hold router near-ties:
    experts ranked by their fp16 softmax probabilities gave 50.1 dB at the logits; ranked by
    the logits (the probabilities' order, which transformers' fp16 model keeps by a softmax in
    fp32) the fp16 graph stays >= 60 dB (64.6 here)."""
    name = "preset:qwen3-next-tiny"
    reference = load_model(name, dtype=torch.float32).model.eval()
    low = anefx.lower(name, seq_len=SEQ, dtype=torch.float16)
    tokens = ids(SEQ, 0)
    assert psnr(stock_logits(reference, tokens), low.run(tokens).float()) >= 60.0


# one package per family in the default run (a conversion and a verify each); both with -m slow
@pytest.mark.parametrize(
    "name", ["saved-per-expert-untied", pytest.param("fused-tied", marks=pytest.mark.slow)]
)
def test_package_on_the_executor(name: str, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    CHECKPOINTS[name](folder)
    result = package_checked(folder, tmp_path / "q.mlpackage")
    # verify's own thresholds (50 dB, top-1 0.9) and every reference token in the top 5
    assert result.passed and result.top5_containment == 1.0, result.render()


# ---------------------------------------------------------------------------------------------
# The fused projections: interleaved per key head, split into separate linears


def _one_layer(key_heads: int, per_key: int, key_dim: int, value_dim: int, seed: int):
    """A Qwen3-Next of one linear layer (then a full one) with these linear-attention shapes."""
    cfg = {
        **get_preset("qwen3-next-tiny"),
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_only_layers": [],
        "linear_num_key_heads": key_heads,
        "linear_num_value_heads": key_heads * per_key,
        "linear_key_head_dim": key_dim,
        "linear_value_head_dim": value_dim,
    }
    model = random_model(cfg, torch.float32, seed=seed)
    with torch.no_grad():  # projections large enough that a mixed-up row shows
        model.model.layers[0].linear_attn.in_proj_qkvz.weight.mul_(10)
        model.model.layers[0].linear_attn.in_proj_ba.weight.mul_(10)
    return model


@settings(max_examples=4)
@given(
    key_heads=st.integers(1, 3),
    per_key=st.integers(1, 3),
    key_dim=st.sampled_from([8, 16]),
    value_dim=st.sampled_from([8, 24]),
    seq=st.sampled_from([1, 5, SEQ]),
    seed=st.integers(0, 1000),
)
def test_fused_projections_lower_to_qwen35s_convs(
    key_heads: int, per_key: int, key_dim: int, value_dim: int, seq: int, seed: int
) -> None:
    """transformers de-interleaves in_proj_qkvz / in_proj_ba with a view to (S, Hk, per head)
    and a split of its last axis, then joins q, k and v for the conv; the lowered graph
    computes the same logits with Qwen3.5's convs: one for q | k | v, one for z, one each for
    b and a, and no slice of a projection's output left."""
    model = _one_layer(key_heads, per_key, key_dim, value_dim, seed)
    low = anefx.lower(model, seq_len=seq, dtype=torch.float32)
    tokens = ids(seq, seed)
    ref = stock_logits(model, tokens)
    assert (low.run(tokens) - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    convs: dict[str, list[int]] = {}
    for node in low.graph_module.graph.nodes:
        module = node.meta.get("anefx_module") or ""
        if node.target is torch.ops.aten.conv2d.default and "in_proj_" in module:
            convs.setdefault(module.rsplit(".", 1)[-1], []).append(node.meta["val"].shape[1])
        if node.target is torch.ops.aten.slice.Tensor and module.endswith(("qkvz", "ba")):
            raise AssertionError(f"{node.name} slices a fused projection's output")
    keys, values = key_heads * key_dim, key_heads * per_key * value_dim
    assert sorted(convs["in_proj_qkvz"]) == sorted([2 * keys + values, values]), convs
    assert convs["in_proj_ba"] == [key_heads * per_key] * 2, convs


# ---------------------------------------------------------------------------------------------
# Presets, inference, recognition


def test_published_preset_counts_equal_transformers() -> None:
    for name in FAMILY.presets:
        cfg = get_preset(name)
        config = build_config(cfg, name)
        model = build_meta_model(config, torch.bfloat16)
        total = sum(p.numel() for p in model.parameters())
        assert count_parameters(cfg) == count_config_parameters(config) == total, name
    cfg = PRESETS["qwen3-next-80b-a3b"]
    # 80B in total, 3B active (the model card); the active count here includes the embedding
    # and the head (0.62 B), which Qwen's A3B leaves out
    assert 79.5e9 < count_parameters(cfg) < 80e9
    assert 3.2e9 < active_parameters(cfg) - 2 * cfg["vocab_size"] * cfg["hidden_size"] < 3.3e9
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], len(sparse_layers(cfg))) == (
        512,
        10,
        48,
    )


def test_config_from_the_tensors_alone(ckpt, tmp_path: Path) -> None:
    """Without config.json: the shapes come back; the rest are the family's defaults."""
    _, folder, model = ckpt
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in folder.glob("*.safetensors"):
        (bare / path.name).write_bytes(path.read_bytes())
    result = infer_config(bare, warn=False)
    assert result.config["model_type"] == "qwen3_next"
    assert {k: result.config[k] for k in SHAPES} == {k: getattr(model.config, k) for k in SHAPES}
    assert sparse_layers(result.config) == sparse_layers(model.config.to_dict())
    assert set(result.defaulted) <= {row.field for row in FAMILY.defaults}


def test_published_names_give_the_preset_back() -> None:
    cfg = get_preset("qwen3-next-80b-a3b")
    model = build_meta_model(build_config(cfg), torch.bfloat16)
    result = infer_from_tensors(headers(checkpoint_tensors(model)), "ckpt")
    config = build_config(cfg)
    assert {k: result.config[k] for k in SHAPES} == {k: getattr(config, k) for k in SHAPES}
    assert count_parameters(result.config) == count_parameters(cfg)
    assert result.config["num_experts_per_tok"] == 10
    assert "preset:qwen3-next-80b-a3b" in result.reasons["linear_key_head_dim"]


def test_recognition_beside_the_other_hybrids() -> None:
    for preset, model_type in (
        ("qwen3-next-tiny", "qwen3_next"),
        ("qwen3.5-moe-tiny", "qwen3_5_moe_text"),
        ("qwen3.5-tiny", "qwen3_5_text"),
        ("qwen3-moe-tiny", "qwen3_moe"),
    ):
        model = build_meta_model(build_config(get_preset(preset)), torch.bfloat16)
        family, _ = recognise("ckpt", headers(checkpoint_tensors(model)))
        assert family.model_type == model_type, preset


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model.layers.0.linear_attn.in_proj_qkvz.weight": (100, 64)},
            r"in_proj_qkvz.weight' has shape \[100, 64\]: it holds q \| k \| v \| z per key head",
        ),
        (
            {"model.layers.0.linear_attn.in_proj_ba.weight": (6, 64)},
            r"in_proj_ba.weight' has shape \[6, 64\], expected \[8, 64\] \(2 x value heads",
        ),
        (
            {"model.layers.1.mlp.shared_expert_gate.weight": (2, 64)},
            r"shared_expert_gate.weight' has shape \[2, 64\], expected \[1, 64\]",
        ),
    ],
)
def test_malformed_tensors_are_named(change: dict, message: str) -> None:
    model = build_meta_model(build_config(get_preset("qwen3-next-tiny")), torch.bfloat16)
    tensors = headers(checkpoint_tensors(model))
    tensors.update({k: header(v) for k, v in change.items()})
    with pytest.raises(AnefxInputError, match=message):
        infer_from_tensors(tensors, "ckpt")


def test_the_state_update_and_the_routing_stay_dense() -> None:
    """Palettization compresses the fused q | k | v | z projection with the MLPs; the conv,
    b | a, the router and the shared expert's gate stay dense."""
    for inner, kind in (
        ("linear_attn.in_proj_qkvz", "ffn"),
        ("linear_attn.out_proj", "ffn"),
        ("mlp.shared_expert.down_proj", "ffn"),
        ("linear_attn.in_proj_ba", None),
        ("linear_attn.conv1d", None),
        ("mlp.gate", None),
        ("mlp.shared_expert_gate", None),
    ):
        assert FAMILY.weight_kind(f"model.layers.0.{inner}", "conv") == kind, inner


def test_the_stock_class_is_the_familys() -> None:
    assert FAMILY.model_cls() is transformers.Qwen3NextForCausalLM
    assert FAMILY.config_cls() is transformers.Qwen3NextConfig
