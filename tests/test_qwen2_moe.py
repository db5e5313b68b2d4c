"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) through the pipeline: tiny random checkpoints
with experts stored per expert (as published) and fused (the model's own parameters), tied and
untied, lower with fp32 parity at rounding level and fp16 logits >= 60 dB against transformers;
the stateful graphs' greedy tokens equal transformers' `generate`; the package passes the
checker with one Core ML state per program and verifies on the reference executor; the config
comes back from the tensors alone (the shared expert's width, q/k/v bias, the heads); the
presets are the published sizes and the report's multiplier counts the shared expert."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from _headers import header, headers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_end_to_end import psnr, reference_logits

import anefx
from anefx.core import rules
from anefx.errors import AnefxInputError
from anefx.generation import Session, lower_decoder
from anefx.models.families import FAMILIES
from anefx.models.infer_config import infer_config, infer_from_tensors, recognise
from anefx.models.load import build_config, build_meta_model, load_model
from anefx.models.presets import (
    PRESETS,
    active_parameters,
    count_parameters,
    get_preset,
    sparse_layers,
)
from anefx.models.synthetic import checkpoint_tensors, random_model, write_random_checkpoint
from anefx.targets.coreml import check_package
from anefx.targets.reader import read_spec
from anefx.targets.verify import verify

FAMILY = FAMILIES["qwen2_moe"]
TINY = get_preset(FAMILY.tiny)
SEQ, BATCH, CONTEXT = 16, 8, 64
# the tiny preset's block: 8 experts of width 32, top 2, a shared expert of width 48
MULTIPLIER = Fraction(8 * 32 + 48, 2 * 32 + 48)

LAYOUTS = {
    "per_expert-untied": ("per_expert", False),
    "per_expert-tied": ("per_expert", True),
    "fused-untied": ("fused", False),
    "fused-tied": ("fused", True),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def ckpt(request, tmp_path_factory) -> tuple[str, Path]:
    layout, tied = LAYOUTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    cfg = {**TINY, "tie_word_embeddings": tied}
    write_random_checkpoint(folder, cfg, dtype=torch.float32, seed=7, expert_layout=layout)
    return request.param, folder


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def _stored(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return set(fh.keys())


def test_fp32_parity_and_the_report(ckpt) -> None:
    """The stored layout is the one asked for; lowered fp32 logits equal transformers' within
    1e-4 of their largest; the report counts the shared expert in the multiplier."""
    name, folder = ckpt
    layout, tied = LAYOUTS[name]
    stored = _stored(folder)
    fused = "model.layers.0.mlp.experts.gate_up_proj" in stored
    assert fused == (layout == "fused")
    assert ("model.layers.0.mlp.experts.7.down_proj.weight" in stored) == (not fused)
    assert ("lm_head.weight" in stored) == (not tied)
    assert "model.layers.0.mlp.shared_expert_gate.weight" in stored
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float32)
    assert low.config.model_type == "qwen2_moe"
    ids = _ids(SEQ, 0)
    ref = reference_logits(folder, ids)
    err = (low.run(ids).float() - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), (name, err)
    moe = low.report.stats["moe"]
    assert moe["blocks"] == 1 and "unmatched" not in moe  # layer 1 is a dense MLP
    assert Fraction(moe["compute_multiplier"]).limit_denominator(1000) == MULTIPLIER
    assert moe["shared_expert_width"] == 48 and moe["shared_expert_gated"]
    assert "routing" not in low.report.counts()


def test_fp16_psnr_and_no_errors(ckpt) -> None:
    name, folder = ckpt
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float16)
    assert not low.report.errors, low.report.render()
    ids = _ids(SEQ, 1)
    assert psnr(reference_logits(folder, ids), low.run(ids).float()) >= 60.0, name


def _model(tied: bool, qkv_bias: bool = True) -> torch.nn.Module:
    """The tiny preset with weights large enough that neither the router's top-k nor the greedy
    token sits on a near-tie (random_model's 0.02 leaves logits nearly flat)."""
    cfg = {**TINY, "tie_word_embeddings": tied, "qkv_bias": qkv_bias}
    model = random_model(cfg, torch.float32, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
            elif p.dim() > 1:
                p.normal_(0.0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model.eval()


# the tied head changes only the head and embedding, whose parity the checkpoints above prove:
# the tied run is under -m slow
@pytest.mark.parametrize("tied", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_greedy_tokens_equal_generate(tied: bool) -> None:
    """Prompts shorter than, equal to and longer than the prefill batch (the last: a full
    batch, then a padded one), 32 greedy steps with the KV cache, fp32."""
    model = _model(tied)
    dec = lower_decoder(model, batch=BATCH, context=CONTEXT, dtype=torch.float32)
    for n in (5, BATCH, 13):
        prompt = _ids(n, seed=n)[0].tolist()
        with torch.no_grad():
            want = model.generate(
                torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False
            )[0, n:].tolist()
        assert Session(dec).generate(prompt, max_new_tokens=32) == want, n


def test_without_qkv_bias() -> None:
    """`qkv_bias` false (the config field; the published files predate it and have the bias):
    no bias tensors, the same parity."""
    model = _model(tied=False, qkv_bias=False)
    assert not any(n.endswith("q_proj.bias") for n, _ in model.named_parameters())
    low = anefx.lower(model, seq_len=SEQ, dtype=torch.float32)
    ids = _ids(SEQ, 2)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert (low.run(ids).float() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, Path]:
    """The published layout (per expert, untied) converted to a stateful package."""
    folder = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(folder, TINY, dtype=torch.float32, seed=9)
    out = tmp_path_factory.mktemp("pkg") / "q2moe.mlpackage"
    done = anefx.convert(str(folder), out, context=CONTEXT, batch=BATCH, max_chunk_mb=10_000)
    assert done.errors == 0 and done.kind == "package"
    return folder, out


def test_package_has_no_errors_and_one_state(package) -> None:
    _, out = package
    spec = read_spec(out)
    functions = {fn.name: len(fn.state) for fn in spec.description.functions}
    assert set(functions) == {"prefill", "decode"}
    assert all(n <= rules.MAX_STATES_PER_PROGRAM == 1 for n in functions.values()), functions
    for report in check_package(out):
        assert not report.errors, report.render()
        assert "routing" not in report.counts()


def test_package_verifies_on_the_executor(package) -> None:
    folder, out = package
    r = verify(out, str(folder), ids=_ids(11, 4)[0].tolist(), steps=16)
    assert r.psnr_db >= 60.0, r.render()
    assert r.top1_agreement == 1.0, r.render()


# ---------------------------------------------------------------------------------------------
# The family description: recognition, config inference, presets, errors


def _headers(model: torch.nn.Module, extra: dict[str, tuple[int, ...]] | None = None) -> dict:
    """What a checkpoint's safetensors headers say of MODEL's tensors (per expert), plus EXTRA."""
    entries = headers(checkpoint_tensors(model), "F32")
    return entries | {k: header(v, "F32") for k, v in (extra or {}).items()}


def test_recognised_above_dense_qwen2() -> None:
    """A shared expert beside Qwen2's attention: qwen2_moe, above dense Qwen2 (whose q_proj
    bias these layers carry too); beside q_norm it is refused (not this family), named."""
    family, layers = recognise("ckpt", _headers(random_model(TINY, torch.float32)))
    assert family is FAMILY and sorted(layers) == [0, 1]
    suffixes = frozenset(s for x in layers.values() for s in x)
    first = frozenset(layers[0])
    assert 0 < FAMILIES["qwen2"].recognise(suffixes, first) < FAMILY.recognise(suffixes, first)
    q_norm = _headers(
        random_model(TINY, torch.float32), {"model.layers.0.self_attn.q_norm.weight": (16,)}
    )
    with pytest.raises(AnefxInputError, match=r"^ckpt: .*shared-expert tensors beside q_norm"):
        recognise("ckpt", q_norm)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_config_inferred_from_the_tensors(layout: str, tmp_path: Path) -> None:
    """Without config.json: every shape field back, the heads from the preset with these
    shapes (head_dim 16, not a power-of-two guess), the rest from the family's defaults, which
    equal the preset's: the inferred model computes the same logits."""
    folder = write_random_checkpoint(tmp_path, TINY, torch.float32, seed=1, expert_layout=layout)
    declared = anefx.lower(str(folder), seq_len=4, dtype=torch.float32)
    (folder / "config.json").unlink()
    result = infer_config(folder, warn=False)
    got = result.config
    for key in (*_SHAPES, "num_attention_heads", "num_key_value_heads", "num_experts_per_tok"):
        assert got[key] == TINY[key], key
    assert got["model_type"] == "qwen2_moe" and got["qkv_bias"] is True
    assert "preset:qwen2-moe-tiny" in result.reasons["num_attention_heads"]
    assert set(result.defaulted) == {
        "rope_parameters",
        "rms_norm_eps",
        "max_position_embeddings",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts_per_tok",
        "norm_topk_prob",
    }
    with pytest.warns(UserWarning, match="no config.json"):
        inferred = anefx.lower(str(folder), seq_len=4, dtype=torch.float32)
    ids = _ids(4, 5)
    assert torch.equal(inferred.run(ids), declared.run(ids))


_SHAPES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
    "tie_word_embeddings",
)


@pytest.mark.parametrize(
    "change",
    [
        # every second layer sparse: decoder_sparse_step 2 (the published models use 1)
        {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": []},
        # every layer sparse, no bias: intermediate_size is unused and defaulted (to the tiny
        # preset's, whose experts these are)
        {"mlp_only_layers": [], "qkv_bias": False},
    ],
)
def test_sparse_layers_and_bias_inferred(change: dict) -> None:
    cfg = {**TINY, **change}
    model = build_meta_model(build_config(cfg), torch.float32)
    result = infer_from_tensors(_headers(model), "ckpt")
    got = result.config
    for key in _SHAPES:
        assert got[key] == cfg[key], key
    assert got["qkv_bias"] is cfg.get("qkv_bias", True)
    every_layer_sparse = len(sparse_layers(cfg)) == cfg["num_hidden_layers"]
    assert ("intermediate_size" in result.defaulted) == every_layer_sparse
    assert count_parameters(got) == count_parameters(cfg)


def test_published_presets() -> None:
    """Totals and active counts as published (14.3B / 2.7B active; 57B / 14B active); the
    meta model's count is checked for every preset in tests/test_infer_config.py."""
    small, large = PRESETS["qwen1.5-moe-a2.7b"], PRESETS["qwen2-57b-a14b"]
    assert 14.3e9 < count_parameters(small) < 14.35e9
    assert 2.65e9 < active_parameters(small) < 2.75e9
    assert 57.3e9 < count_parameters(large) < 57.5e9
    assert 14.0e9 < active_parameters(large) < 14.5e9
    for cfg in (small, large):
        assert cfg["norm_topk_prob"] is False and cfg["decoder_sparse_step"] == 1
        assert cfg["mlp_only_layers"] == [] and not cfg["tie_word_embeddings"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shared_expert_intermediate_size": None}, "'shared_expert_intermediate_size' missing"),
        ({"shared_expert_intermediate_size": -4}, "shared_expert_intermediate_size"),
        ({"shared_expert_intermediate_size": 10**7}, "MAX_INTERMEDIATE"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
    ],
)
def test_bad_config_fields_are_named(change: dict, message: str) -> None:
    cfg = {**TINY, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(AnefxInputError, match=message):
        build_config(cfg, "config.json")


def test_the_router_and_the_shared_gate_stay_dense() -> None:
    kind = FAMILY.weight_kind
    assert kind("model.layers.0.mlp.gate", "conv") is None
    assert kind("model.layers.0.mlp.shared_expert_gate", "conv") is None
    assert kind("model.layers.0.mlp.shared_expert.up_proj", "conv") == "ffn"
    assert kind("model.layers.0.mlp.experts", "conv") == "ffn"


def test_a_shared_expert_that_disagrees_is_named(tmp_path: Path) -> None:
    """config.json's shared width against the stored tensors, and a missing shared-expert
    tensor: one error naming the tensor, before the model is built."""
    folder = write_random_checkpoint(tmp_path / "m", TINY, torch.float32, seed=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "shared_expert_intermediate_size": 64})
    )
    with pytest.raises(AnefxInputError, match=r"shared_expert\.gate_proj\.weight' has shape \[48"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.shared_expert_gate.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(AnefxInputError, match=r"shared_expert_gate\.weight' missing"):
        load_model(folder)
