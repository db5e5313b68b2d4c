"""The language towers of the vision-language models (qwen2_5_vl, qwen3_vl, qwen3_vl_moe): a
checkpoint saved from transformers' vision-language class (Qwen2_5_VL- / Qwen3VL- /
Qwen3VLMoeForConditionalGeneration.save_pretrained, tiny random configs, tied and untied, the
MoE experts in both stored orientations) converts its text decoder without the caller naming
the tower: the vision tower is skipped and said once; the lowered graphs equal the VL class on
text (fp32 at rounding level, fp16 PSNR >= 60 dB, greedy tokens of its `generate` for 32 steps
from a prompt longer than the batch); the package has 0 checker errors and one state. mrope
collapses to the 1-D rotary for text (a property test of the substituted recomposition); with
no image the deepstack branch leaves nothing in the graph (the same ops as the text twin's);
the published flat Qwen2.5-VL config and both tensor layouts load; the presets' parameter counts
equal transformers' meta text models and the text twins' presets."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import anefx
from anefx.core import rules
from anefx.errors import AnefxInputError
from anefx.generation import Session, lower_decoder
from anefx.models.families import FAMILIES
from anefx.models.families.common import (
    MROPE_SUBSTITUTION,
    equal_mrope_streams,
    equal_streams_recomposition,
)
from anefx.models.infer_config import infer_config
from anefx.models.load import build_config, build_meta_model, load_model
from anefx.models.presets import PRESETS, count_parameters, get_preset
from anefx.models.random_weights import random_init_
from anefx.targets.coreml import check_package
from anefx.targets.reader import read_spec

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, CONTEXT = 512, 16, 8, 64
VISION_25 = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "fullatt_block_indexes": [0],
}
VISION_3 = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 4,
    "num_position_embeddings": 16,
    "deepstack_visual_indexes": [0, 1],  # deepstack features for the first two text layers
}
# family -> (outer config class, vision-language class, vision config, text twin's tiny preset)
TOWERS = {
    "qwen2_5_vl_text": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", VISION_25),
    "qwen3_vl_text": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", VISION_3),
    "qwen3_vl_moe_text": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", VISION_3),
}
# (tiny preset, how the MoE experts are stored: "saved" as transformers 5 writes them, the
# model's (E, 2I, H); "published" transposed, (E, H, 2I), as the Qwen repositories hold them)
CASES = {
    "qwen2.5-vl-tied": ("qwen2.5-vl-tiny", None),
    "qwen2.5-vl-untied": ("qwen2.5-vl-tiny-untied", None),
    "qwen3-vl-tied": ("qwen3-vl-tiny", None),
    "qwen3-vl-untied": ("qwen3-vl-tiny-untied", None),
    "qwen3-vl-moe-untied-saved": ("qwen3-vl-moe-tiny", "saved"),
    "qwen3-vl-moe-tied-published": ("qwen3-vl-moe-tiny-tied", "published"),
}


def _family(preset: str):
    return FAMILIES[PRESETS[preset]["model_type"]]


def vl_model(preset: str, seed: int = 0) -> torch.nn.Module:
    """transformers' vision-language model nesting PRESET's text config (fp32, random weights
    everywhere; the head tied as the outer config says, as the VL class ties it); routers with
    large weights, so no two experts' scores are near a tie."""
    outer_cls, vl_cls, vision = TOWERS[PRESETS[preset]["model_type"]]
    text = {k: v for k, v in get_preset(preset).items() if k != "architectures"}
    text["dtype"] = "float32"
    config = getattr(transformers, outer_cls)(
        text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"]
    )
    model = getattr(transformers, vl_cls)(config).float().eval()
    random_init_(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model


def _transpose_experts(folder: Path) -> int:
    """Store the fused experts as the published checkpoints do: (E, H, 2I) and (E, I, H)."""
    done = 0
    for path in folder.glob("*.safetensors"):
        stored = load_file(path)
        for name in [
            n for n in stored if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
        ]:
            stored[name] = stored[name].transpose(1, 2).contiguous()
            done += 1
        save_file(stored, path, metadata={"format": "pt"})
    return done


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(case, folder, the VL model) for a checkpoint saved from the vision-language class."""
    preset, experts = CASES[request.param]
    model = vl_model(preset, seed=7)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    if experts == "published":
        assert _transpose_experts(folder) == 2  # layer 0's gate_up and down (layer 1 is dense)
    return request.param, folder, model


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    err = (ref.double() - out.double()).pow(2).mean().sqrt().item()
    return math.inf if err == 0 else 20 * math.log10(ref.abs().max().item() / err)


def _vision_tensors(model) -> int:
    return sum(1 for n in model.state_dict() if n.startswith("model.visual."))


# ---------------------------------------------------------------------------------------------
# A checkpoint of the vision-language class, as it is


def test_the_folder_reads_as_its_text_decoder(saved, caplog) -> None:
    """No tower named by the caller: the family comes from config.json, the text model's
    tensors are renamed into it, the vision tower's skipped and said once; the head tied as the
    outer config says; the logits are the VL class's on text."""
    case, folder, vl = saved
    preset = CASES[case][0]
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(folder), dtype=torch.float32)
    family = _family(preset)
    assert (
        type(loaded.model) is family.model_cls() and loaded.config.model_type == family.model_type
    )
    tied = PRESETS[preset]["tie_word_embeddings"]
    model = loaded.model
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    text = vl.model.language_model.state_dict()
    got = model.state_dict()
    for key, tensor in text.items():
        assert torch.equal(got[f"model.{key}"], tensor), key
    assert torch.equal(model.lm_head.weight, vl.lm_head.weight)
    said = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(said) == 1 and str(folder) in said[0]
    visual = _vision_tensors(vl)
    # Qwen2.5-VL's save_pretrained writes the vision tower as visual.* (its published layout)
    assert f"skipping {visual} stored tensors" in said[0] and "of the vision tower" in said[0]
    ids = _ids(SEQ, 0)
    assert torch.allclose(_logits(model, ids), _logits(vl, ids), atol=1e-5, rtol=0)


def test_fp32_parity_and_fp16_psnr(saved) -> None:
    """The lowered graph (in torch) against the VL class: fp32 within 1e-4 of the largest
    logit, fp16 at least 60 dB; the fp16 graph has no checker error; the report names the mrope
    substitution, and for MoE the densified experts."""
    case, folder, vl = saved
    ids = _ids(SEQ, 1)
    want = _logits(vl, ids)
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float32)
    err = (low.run(ids) - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), (case, err)
    assert MROPE_SUBSTITUTION in low.report.stats["substitutions"]
    low16 = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float16)
    assert not low16.report.errors, low16.report.render()
    assert _psnr(want, low16.run(ids).float()) >= 60.0, case
    if "moe" in case:
        moe = low16.report.stats["moe"]
        assert moe["blocks"] == 1 and "unmatched" not in moe  # layer 1 is a dense MLP
        assert moe["compute_multiplier"] == 8 / 2


# each family once, tied and untied among them, in the default run; the rest under -m slow
GREEDY_DEFAULT = ("qwen2.5-vl-untied", "qwen3-vl-tied", "qwen3-vl-moe-tied-published")


@pytest.mark.parametrize(
    "case",
    [c if c in GREEDY_DEFAULT else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)],
)
def test_greedy_tokens_equal_the_vl_generate(case: str, tmp_path: Path) -> None:
    """Prefill batch 8, a prompt of 13 tokens (two calls), 32 greedy steps with the KV cache:
    the tokens of the VL class's own `generate` on the same text."""
    preset, experts = CASES[case]
    vl = vl_model(preset, seed=7)
    folder = tmp_path / "ckpt"
    vl.save_pretrained(folder)
    if experts == "published":
        _transpose_experts(folder)
    prompt = _ids(13, 2)[0].tolist()
    with torch.no_grad():
        want = vl.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, len(prompt) :].tolist()
    decoder = lower_decoder(str(folder), batch=BATCH, context=CONTEXT, dtype=torch.float32)
    assert Session(decoder).generate(prompt, max_new_tokens=32) == want, case


@pytest.mark.parametrize(
    "case", ["qwen2.5-vl-untied", "qwen3-vl-tied", "qwen3-vl-moe-untied-saved"]
)
def test_package_has_no_errors_and_one_state(case: str, request, tmp_path: Path) -> None:
    """convert: prefill and decode functions, 0 checker errors on the emitted program, one
    Core ML state (the packed KV cache) per function."""
    preset, _ = CASES[case]
    folder = tmp_path / "ckpt"
    vl_model(preset, seed=3).save_pretrained(folder)
    out = tmp_path / "tower.mlpackage"
    done = anefx.convert(str(folder), out, context=CONTEXT, batch=BATCH, max_chunk_mb=10_000)
    assert done.errors == 0 and done.kind == "package"
    spec = read_spec(out)
    functions = {fn.name: len(fn.state) for fn in spec.description.functions}
    assert functions == {"prefill": 1, "decode": 1}
    for report in check_package(out):
        assert not report.errors, report.render()


# ---------------------------------------------------------------------------------------------
# mrope for text, and no deepstack branch


def _rotary_classes() -> dict[str, type]:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q35
    from transformers.models.qwen3_vl import modeling_qwen3_vl as q3
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as q3m

    return {
        "qwen2.5-vl (sections)": q25.Qwen2_5_VLRotaryEmbedding,
        "qwen3-vl (interleaved)": q3.Qwen3VLTextRotaryEmbedding,
        "qwen3-vl-moe (interleaved)": q3m.Qwen3VLMoeTextRotaryEmbedding,
        "qwen3.5 (interleaved)": q35.Qwen3_5TextRotaryEmbedding,
    }


@settings(max_examples=40, deadline=None)
@given(
    sections=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    seq=st.integers(1, 9),
    which=st.sampled_from(sorted(_rotary_classes())),
    seed=st.integers(0, 2**16),
)
def test_equal_streams_recomposition_is_transformers(sections, seq, which, seed) -> None:
    """For three equal position streams, each family's stock recomposition gives exactly the
    substituted cat(freq, freq) (any sections, any length); for unequal streams it does not
    (the substitution is for text only)."""
    cls = _rotary_classes()[which]
    owner = SimpleNamespace(mrope_section=sections)
    g = torch.Generator().manual_seed(seed)
    one = torch.randn(1, 1, seq, sum(sections), generator=g)
    equal = one.expand(3, -1, -1, -1)
    want = cls.recomposition_frequencies(owner, equal.clone())
    assert torch.equal(equal_streams_recomposition(owner, equal.clone()), want)
    unequal = torch.randn(3, 1, seq, sum(sections), generator=g)
    stock = cls.recomposition_frequencies(owner, unequal.clone())
    assert not torch.equal(equal_streams_recomposition(owner, unequal.clone()), stock)


@pytest.mark.parametrize("preset", ["qwen2.5-vl-tiny", "qwen3-vl-tiny", "qwen3-vl-moe-tiny"])
def test_the_swap_is_on_the_text_rotary_only_while_capturing(preset: str) -> None:
    model = build_meta_model(build_config(get_preset(preset)), torch.float32)
    rotary = type(model.model.rotary_emb)
    stock = vars(rotary)["recomposition_frequencies"]
    with equal_mrope_streams(model):
        assert vars(rotary)["recomposition_frequencies"] is equal_streams_recomposition
    assert vars(rotary)["recomposition_frequencies"] is stock


def _op_counts(graph_module) -> Counter:
    return Counter(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize(
    ("preset", "twin"),
    [
        ("qwen2.5-vl-tiny", "qwen2-tiny"),
        ("qwen3-vl-tiny", "qwen3-tiny"),
        ("qwen3-vl-moe-tiny", "qwen3-moe-tiny"),
    ],
)
def test_the_graph_is_the_text_twins(preset: str, twin: str) -> None:
    """With no image, the captured tower holds nothing its text twin's graph does not (the
    twin's transformers model with the tower's shapes and weights): the deepstack additions (a
    masked scatter into the first layers' hidden states), the three mrope streams and the
    vision inputs leave no op. Before lowering the same violations but for the position
    computation (which the tables fold); after it the same ops and report; the same logits."""
    tower = load_model(f"preset:{preset}", dtype=torch.float32, seed=4).model
    ours = PRESETS[preset]
    shapes = {k: v for k, v in ours.items() if k not in ("model_type", "architectures")}
    cfg = {**get_preset(twin), **shapes, "model_type": PRESETS[twin]["model_type"]}
    rope = ours["rope_parameters"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    stock = _family(twin).model_cls()(build_config(cfg, twin)).eval()
    stock.load_state_dict(tower.state_dict(), strict=True)
    low = [anefx.lower(m, seq_len=8, dtype=torch.float32, raw_report=True) for m in (tower, stock)]
    captured = [
        Counter((v.rule, v.module, v.op, v.dtype) for v in one.captured_report.violations)
        for one in low
    ]
    # captured: the twin's violations, and beside them only the position computation's (the
    # rotary module's, and the three position streams of the integer position ids)
    assert not captured[1] - captured[0]
    for rule, module, op, dtype in captured[0] - captured[1]:
        assert module == "model.rotary_emb" or "int" in str(dtype), (rule, module, op, dtype)
    assert low[0].report.counts() == low[1].report.counts()
    assert _op_counts(low[0].graph_module) == _op_counts(low[1].graph_module)
    ids = _ids(8, 5)
    assert torch.allclose(low[0].run(ids), low[1].run(ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# The published layouts of Qwen2.5-VL, and configs from the tensors alone


def _flatten(folder: Path) -> dict:
    """config.json as the published Qwen2.5-VL files have it: the text fields at the top level,
    rope_theta apart and rope_scaling of type "mrope"."""
    path = folder / "config.json"
    nested = json.loads(path.read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**nested, **{k: v for k, v in text.items() if k != "model_type"}}
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["tie_word_embeddings"] = nested["tie_word_embeddings"]
    path.write_text(json.dumps(flat))
    return flat


def _renest(folder: Path) -> int:
    """The tensors re-saved in transformers 5's in-memory layout: model.language_model.* and
    model.visual.*."""
    moved = 0
    for path in folder.glob("*.safetensors"):
        stored = load_file(path)
        renamed = {}
        for name, tensor in stored.items():
            if name.startswith("visual."):
                name = f"model.{name}"
            elif name.startswith("model.") and not name.startswith("model.visual."):
                name = "model.language_model." + name[len("model.") :]
                moved += 1
            renamed[name] = tensor
        save_file(renamed, path, metadata={"format": "pt"})
    return moved


@pytest.mark.parametrize("tensors", ["published", "renested"])
def test_qwen2_5_vl_published_config_and_layouts(tensors: str, tmp_path: Path, caplog) -> None:
    vl = vl_model("qwen2.5-vl-tiny-untied", seed=9)
    folder = tmp_path / "ckpt"
    vl.save_pretrained(folder)
    assert not any(
        n.startswith("model.language_model.") for n in load_file(folder / "model.safetensors")
    )
    flat = _flatten(folder)
    assert "text_config" not in flat and flat["model_type"] == "qwen2_5_vl"
    if tensors == "renested":
        assert _renest(folder) > 0
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(folder), dtype=torch.float32)
    assert loaded.config.rope_parameters["rope_type"] == "default"
    assert loaded.config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert loaded.config.tie_word_embeddings is False
    prefix = "model.visual.*" if tensors == "renested" else "visual.*"
    said = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(said) == 1 and f"of the vision tower ({prefix})" in said[0]
    ids = _ids(SEQ, 3)
    assert torch.allclose(_logits(loaded.model, ids), _logits(vl, ids), atol=1e-5, rtol=0)


def test_a_pre_v5_text_config_tie_is_the_outer_one(tmp_path: Path) -> None:
    """Qwen2_5_VLConfig ties the head when a nested text_config says so and the outer config
    does not; the loader reads the same tie (the head is then not stored)."""
    vl = vl_model("qwen2.5-vl-tiny", seed=2)  # tied
    folder = tmp_path / "ckpt"
    vl.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("tie_word_embeddings")
    config["text_config"]["tie_word_embeddings"] = True
    path.write_text(json.dumps(config))
    assert transformers.Qwen2_5_VLConfig.from_pretrained(folder).tie_word_embeddings
    loaded = load_model(str(folder), dtype=torch.float32)
    assert loaded.config.tie_word_embeddings is True


def test_configs_inferred_from_the_vl_tensors(saved, tmp_path: Path) -> None:
    """Without config.json: the VL layout (renamed or dropped tensors) says the tower's family,
    and the shapes come back; the text-only tensors of the same decoder say its text twin."""
    case, folder, vl = saved
    preset = CASES[case][0]
    family = _family(preset)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "config.json").unlink()
    result = infer_config(bare, warn=False)
    assert result.config["model_type"] == family.model_type
    cfg = PRESETS[preset]
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        assert result.config[key] == cfg[key], key
    assert result.config["num_attention_heads"] == cfg["num_attention_heads"]
    if "moe" in case:
        assert result.config["moe_intermediate_size"] == cfg["moe_intermediate_size"]
        assert result.config["mlp_only_layers"] == [1]
    with pytest.warns(Warning):
        loaded = load_model(str(bare), dtype=torch.float32)
    got = loaded.model.state_dict()
    for key, tensor in vl.model.language_model.state_dict().items():
        assert torch.equal(got[f"model.{key}"], tensor), key
    if "moe" in case:  # top-2 of the tiny is no shape: the default is the published top-8
        assert result.defaulted["num_experts_per_tok"] == 8
    else:  # the defaults are the tiny presets' own values: the same model
        ids = _ids(SEQ, 4)
        assert torch.allclose(_logits(loaded.model, ids), _logits(vl, ids), atol=1e-5, rtol=0)
    text_only = tmp_path / "text"
    loaded.model.save_pretrained(text_only)
    (text_only / "config.json").unlink()
    assert infer_config(text_only, warn=False).config["model_type"] == family.text_twin


def test_hostile_tower_configs_and_tensors(tmp_path: Path) -> None:
    vl = vl_model("qwen3-vl-moe-tiny", seed=1)
    folder = tmp_path / "ckpt"
    vl.save_pretrained(folder)
    path = folder / "config.json"
    good = json.loads(path.read_text())
    bad = json.loads(path.read_text())
    bad["text_config"].pop("num_experts_per_tok")
    path.write_text(json.dumps(bad))
    with pytest.raises(
        AnefxInputError, match=r"\(text_config\): field 'num_experts_per_tok' missing"
    ):
        load_model(str(folder), meta=True)
    path.write_text(json.dumps(good))
    stored = load_file(folder / "model.safetensors")
    name = "model.language_model.layers.0.mlp.experts.down_proj"
    stored[name] = torch.zeros(8, 16, 16)
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        AnefxInputError, match=rf"tensor '{name}' has shape \[8, 16, 16\], expected \[8, 64, 16\]"
    ):
        load_model(str(folder), meta=True)


# ---------------------------------------------------------------------------------------------
# Presets


TOWER_PRESETS = [n for n, c in PRESETS.items() if c["model_type"] in TOWERS]
PUBLISHED = [n for n in TOWER_PRESETS if "tiny" not in n]
# the text model of each published tower has the shapes of a published text model
TWINS = {
    "qwen2.5-vl-3b": "qwen2.5-3b",
    "qwen2.5-vl-7b": "qwen2.5-7b",
    "qwen2.5-vl-32b": "qwen2.5-32b",
    "qwen3-vl-2b": "qwen3-1.7b",
    "qwen3-vl-4b": "qwen3-4b",
    "qwen3-vl-8b": "qwen3-8b",
    "qwen3-vl-32b": "qwen3-32b",
    "qwen3-vl-30b-a3b": "qwen3-30b-a3b",
    "qwen3-vl-235b-a22b": "qwen3-235b-a22b",
}


@pytest.mark.parametrize("name", TOWER_PRESETS)
def test_preset_counts_equal_transformers_models(name: str) -> None:
    """count_parameters equals the family's meta model and the text model (and head) inside
    transformers' vision-language class nesting the same text config."""
    cfg = get_preset(name)
    config = build_config(cfg, name)
    model = build_meta_model(config, torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == total
    outer_cls, vl_cls, vision = TOWERS[cfg["model_type"]]
    text = {k: v for k, v in cfg.items() if k != "architectures"}
    outer = getattr(transformers, outer_cls)(
        text_config=text, vision_config=vision, tie_word_embeddings=cfg["tie_word_embeddings"]
    )
    with torch.device("meta"):
        vl = getattr(transformers, vl_cls)(outer)
    head = 0 if cfg["tie_word_embeddings"] else vl.lm_head.weight.numel()
    assert sum(p.numel() for p in vl.model.language_model.parameters()) + head == total


def test_published_presets_are_their_text_twins_shapes() -> None:
    for name in PUBLISHED:
        if name in TWINS:
            assert count_parameters(PRESETS[name]) == count_parameters(PRESETS[TWINS[name]])
    assert set(PUBLISHED) - set(TWINS) == {"qwen2.5-vl-72b"}
    # Qwen2.5-72B's text model (73.4B published with its 0.67B vision tower)
    assert 72.6e9 < count_parameters(PRESETS["qwen2.5-vl-72b"]) < 72.8e9
    for name in PUBLISHED:
        rope = PRESETS[name]["rope_parameters"]
        assert rope["mrope_section"] == ([16, 24, 24] if "2.5" in name else [24, 20, 20])
        assert rope.get("mrope_interleaved", False) is ("2.5" not in name)
        assert sum(rope["mrope_section"]) * 2 == 128  # the rotary half of a 128-wide head


def test_the_tiny_presets_differ_where_the_tests_need_it() -> None:
    tied = {n: PRESETS[n]["tie_word_embeddings"] for n in TOWER_PRESETS if "tiny" in n}
    assert sorted(tied.values()) == [False] * 3 + [True] * 3
    moe = PRESETS["qwen3-vl-moe-tiny"]
    width = moe["moe_intermediate_size"]
    assert moe["hidden_size"] not in (width, 2 * width)  # either expert orientation is unambiguous
    assert moe["mlp_only_layers"] == [1]


def test_one_published_tower_per_family_lowers_by_default() -> None:
    """tests/test_presets_lower.py lowers one published preset of each tower family by default
    (and all under -m slow)."""
    from test_presets_lower import DEFAULT

    for model_type in TOWERS:
        assert any(PRESETS[n]["model_type"] == model_type for n in DEFAULT), model_type
    assert rules.MAX_STATES_PER_PROGRAM == 1


def _published_qwen3_vl(text: dict, tied: bool, model_type: str = "qwen3_vl") -> dict:
    """A config.json as the Qwen3-VL repositories publish it: text_config with the legacy rope
    spelling, the outer tie, a vision_config beside."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": model_type,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "tie_word_embeddings": tied,
        "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24},
        "text_config": {
            "model_type": f"{model_type}_text",
            "attention_bias": False,
            "head_dim": 128,
            "hidden_act": "silu",
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": [24, 20, 20],
                "rope_type": "default",
            },
            "rope_theta": 5000000,
            "tie_word_embeddings": tied,
            "vocab_size": 151936,
            "dtype": "bfloat16",
            **text,
        },
    }


PUBLISHED_FILES = {
    # the flat config.json of Qwen/Qwen2.5-VL-7B-Instruct (its text fields; vision abridged)
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    },
    "qwen3-vl-2b": _published_qwen3_vl(
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_attention_heads": 16,
            "num_hidden_layers": 28,
            "num_key_value_heads": 8,
        },
        tied=True,
    ),
    "qwen3-vl-30b-a3b": _published_qwen3_vl(
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_attention_heads": 32,
            "num_hidden_layers": 48,
            "num_key_value_heads": 4,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        tied=False,
        model_type="qwen3_vl_moe",
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_FILES))
def test_published_config_files_read_as_the_presets(name: str) -> None:
    """config.json in the published spelling (flat with rope type "mrope" for Qwen2.5-VL,
    text_config with rope_scaling for Qwen3-VL) gives the preset's text config."""
    config = build_config(json.loads(json.dumps(PUBLISHED_FILES[name])), name)
    preset = build_config(get_preset(name), name)
    assert config.model_type == preset.model_type
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rope_parameters["mrope_section"] == preset.rope_parameters["mrope_section"]
    assert config.rope_parameters["rope_theta"] == preset.rope_parameters["rope_theta"]
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(preset, key), key
    assert count_parameters(config.to_dict()) == count_parameters(PRESETS[name])
