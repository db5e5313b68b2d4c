"""Qwen3.5 checkpoints in (models/families/qwen3_5/layout.py and the loader): the published
presets against transformers' own models, both layouts loaded from a folder (the text model's
`model.*` and the published vision-language `model.language_model.*`, whose vision tower and
multi-token-prediction tensors are skipped and said once), the config inferred from the tensors
alone, recognition beside the other families, and hostile configs and tensors refused with one
line naming the file and the field or tensor."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from _cli import cli, one_line
from _headers import MTP, header, headers
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from anefx.errors import AnefxInputError
from anefx.models.checkpoint_files import TensorEntry
from anefx.models.families import FAMILIES
from anefx.models.families.qwen3_5.layout import FULL, LINEAR, every_fourth
from anefx.models.infer_config import (
    ConfigDefaultsWarning,
    infer_config,
    infer_from_tensors,
    recognise,
)
from anefx.models.load import (
    build_config,
    build_meta_model,
    count_config_parameters,
    load_model,
    preflight,
)
from anefx.models.presets import PRESETS, count_parameters, get_preset
from anefx.models.random_weights import random_init_
from anefx.models.synthetic import checkpoint_tensors, random_model

FAMILY = FAMILIES["qwen3_5_text"]
OURS = [name for name, cfg in PRESETS.items() if cfg["model_type"] == "qwen3_5_text"]
PUBLISHED = [name for name in OURS if "tiny" not in name]
TINY = ("qwen3.5-tiny", "qwen3.5-tiny-untied")
# what tensor shapes determine, and must come back from them
SHAPES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "layer_types",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
)
VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 4,
    "num_position_embeddings": 16,
}


def _ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(), use_cache=False, **kwargs).logits


def _skips(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", OURS)
def test_preset_counts_equal_transformers_models(name: str) -> None:
    """count_parameters (a dict) and count_config_parameters (the built config) equal the
    parameters of transformers' Qwen3_5ForCausalLM, and of the text model (and head) inside a
    Qwen3_5ForConditionalGeneration nesting the same text config."""
    cfg = get_preset(name)
    config = build_config(cfg, name)
    model = build_meta_model(config, torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg) == count_config_parameters(config) == total
    text = {k: v for k, v in cfg.items() if k != "architectures"}
    outer = transformers.Qwen3_5Config(
        text_config=text, vision_config=VISION, tie_word_embeddings=cfg["tie_word_embeddings"]
    )
    with torch.device("meta"):
        vl = transformers.Qwen3_5ForConditionalGeneration(outer)
    head = 0 if cfg["tie_word_embeddings"] else vl.lm_head.weight.numel()
    assert sum(p.numel() for p in vl.model.language_model.parameters()) + head == total


def test_published_presets_share_the_published_values() -> None:
    for name in PUBLISHED:
        cfg = PRESETS[name]
        layers = cfg["num_hidden_layers"]
        assert cfg["layer_types"] == [LINEAR, LINEAR, LINEAR, FULL] * (layers // 4), name
        assert cfg["rope_parameters"] == {
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        }
        shared = (cfg["vocab_size"], cfg["head_dim"], cfg["linear_conv_kernel_dim"])
        assert shared == (248320, 256, 4)
        assert cfg["linear_key_head_dim"] == cfg["linear_value_head_dim"] == 128
        assert cfg["linear_num_key_heads"] == 16 and cfg["eos_token_id"] == 248046
        assert (cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (1e-6, 262144)
        assert cfg["dtype"] == "bfloat16" and cfg["model_type"] == "qwen3_5_text"
    # the sizes, from the names: published totals include the vision tower (about 0.1-0.5B)
    billions = {n: count_parameters(PRESETS[n]) / 1e9 for n in PUBLISHED}
    for name, (low, high) in {
        "qwen3.5-0.8b": (0.7, 0.8),
        "qwen3.5-2b": (1.8, 2.0),
        "qwen3.5-4b": (4.0, 4.3),
        "qwen3.5-9b": (8.8, 9.1),
        "qwen3.5-27b": (26.5, 27.2),
    }.items():
        assert low < billions[name] < high, (name, billions[name])
    assert [PRESETS[n]["tie_word_embeddings"] for n in PUBLISHED] == [True] * 3 + [False] * 2
    # the tiny presets come after every published one (presets.py lists them last)
    names = list(PRESETS)
    published = [n for n in names if "tiny" not in n]
    assert max(map(names.index, published)) < min(map(names.index, TINY))


def test_the_tiny_presets_differ_where_the_tests_need_it() -> None:
    tiny, untied = PRESETS["qwen3.5-tiny"], PRESETS["qwen3.5-tiny-untied"]
    assert tiny["linear_num_value_heads"] > tiny["linear_num_key_heads"]
    assert tiny["linear_key_head_dim"] != tiny["linear_value_head_dim"]
    assert tiny["layer_types"] != every_fourth(4) and tiny["tie_word_embeddings"]
    assert untied["linear_num_value_heads"] == untied["linear_num_key_heads"]
    assert untied["linear_key_head_dim"] == untied["linear_value_head_dim"]
    assert untied["layer_types"] == every_fourth(4) and not untied["tie_word_embeddings"]


# ---------------------------------------------------------------------------------------------
# Checkpoints in both layouts


@pytest.fixture(scope="module")
def text_ckpts(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each tiny preset as transformers' save_pretrained writes it (qwen3_5_text, model.*)."""
    out = {}
    for seed, name in enumerate(TINY):
        model = random_model(get_preset(name), torch.float32, seed=seed + 3)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder, model
    return out


def _vl_model(text_preset: str, outer_tie: bool, inner_tie: bool, seed: int):
    text = {k: v for k, v in get_preset(text_preset).items() if k != "architectures"}
    text.update(dtype="float32", tie_word_embeddings=inner_tie)
    config = transformers.Qwen3_5Config(
        text_config=text, vision_config=VISION, tie_word_embeddings=outer_tie
    )
    model = transformers.Qwen3_5ForConditionalGeneration(config).float().eval()
    return random_init_(model, seed)  # every weight random (norms too: their init is 0)


@pytest.fixture(scope="module", params=[True, False], ids=["outer-tied", "outer-untied"])
def vl_ckpt(request, tmp_path_factory):
    """The published layout: Qwen3_5ForConditionalGeneration.save_pretrained, whose outer
    tie_word_embeddings contradicts its text_config's, plus mtp.* tensors as published files
    carry (the untied one sharded, the mtp tensors in a shard of their own)."""
    outer = request.param
    model = _vl_model("qwen3.5-tiny", outer_tie=outer, inner_tie=not outer, seed=7)
    folder = tmp_path_factory.mktemp(f"vl-{outer}")
    if outer:
        model.save_pretrained(folder)
        stored = load_file(folder / "model.safetensors")
        save_file({**stored, **MTP}, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        model.save_pretrained(folder, max_shard_size="200KB")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        save_file(MTP, folder / "mtp.safetensors", metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(MTP, "mtp.safetensors"))
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    visual = sum(1 for n, _ in model.named_parameters() if n.startswith("model.visual."))
    return folder, model, outer, visual


@pytest.mark.parametrize("name", TINY)
def test_text_layout_loads(text_ckpts, name: str, caplog) -> None:
    folder, saved = text_ckpts[name]
    with caplog.at_level(logging.INFO):
        loaded = load_model(folder, dtype=torch.float32)
    assert type(loaded.model) is transformers.Qwen3_5ForCausalLM
    assert {k: getattr(loaded.config, k) for k in SHAPES} == {
        k: getattr(saved.config, k) for k in SHAPES
    }
    got = loaded.model.state_dict()
    for key, tensor in saved.state_dict().items():
        assert torch.equal(got[key], tensor), key
    assert torch.equal(_logits(loaded.model), _logits(saved))
    assert loaded.plan.notes == () and _skips(caplog) == []


def test_vl_layout_loads_the_text_model(vl_ckpt, caplog) -> None:
    """model.language_model.* -> model.*, the head tied as the outer config says (as the
    composite model ties it), the vision tower and mtp.* skipped and said once."""
    folder, vl, outer, visual = vl_ckpt
    with caplog.at_level(logging.INFO):
        loaded = load_model(folder, dtype=torch.float32)
    model = loaded.model
    assert type(model) is transformers.Qwen3_5ForCausalLM
    assert loaded.config.tie_word_embeddings is outer
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is outer
    text = vl.model.language_model.state_dict()
    got = model.state_dict()
    assert {k for k in got if k.startswith("model.")} == {f"model.{k}" for k in text}
    for key, tensor in text.items():
        assert torch.equal(got[f"model.{key}"], tensor), key
    assert torch.equal(model.lm_head.weight, vl.lm_head.weight)
    assert torch.allclose(_logits(model), _logits(vl), atol=1e-5, rtol=0)
    (said,) = _skips(caplog)
    assert f"skipping {visual + len(MTP)} stored tensors" in said and str(folder) in said
    assert f"{visual} of the vision tower (model.visual.*)" in said
    assert f"{len(MTP)} of multi-token prediction (mtp.*)" in said
    # transformers' composite class reads the same head; its AutoModelForCausalLM agrees when
    # the checkpoint stores the head (tied only by the outer flag it would build a random one)
    theirs = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(folder).eval()
    assert torch.equal(theirs.lm_head.weight, model.lm_head.weight)
    if not outer:
        auto = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert torch.allclose(_logits(auto), _logits(model), atol=1e-5, rtol=0)


def test_vl_layout_inspected(vl_ckpt) -> None:
    folder, _, outer, visual = vl_ckpt
    code, _, err = cli("inspect", folder)
    assert code == 0, err
    (said,) = [line for line in err.splitlines() if "skipping" in line]  # progress, once
    code, out, err = cli("inspect", folder, "--json")
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["_notes"] == [said.split("] ", 1)[1]]
    assert info["model_type"] == "qwen3_5_text" and info["tie_word_embeddings"] is outer
    assert info["_tensors"] == len(load_model(folder, meta=True).model.state_dict()) - outer
    assert info["layer_kinds"] == "3 linear, 1 full: L,L,F,L"
    assert info["linear_attention"] == "2 key x 16, 4 value x 24, conv 4"
    assert info["full_attention"] == "4 heads, 2 KV x 32, gated, rotary 8"
    assert {"layer_kinds", "linear_attention", "layer_types"} <= set(info["_declared"])
    assert "vision_config" not in info["_declared"]  # the text model's config


# ---------------------------------------------------------------------------------------------
# The config from the tensors alone


def _bare(folder: Path, tmp_path: Path) -> Path:
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "config.json").unlink()
    return bare


def _check_inferred(bare: Path, config, weights: dict[str, torch.Tensor], logits) -> None:
    result = infer_config(bare, warn=False)
    assert result.config["model_type"] == "qwen3_5_text"
    assert {k: result.config[k] for k in SHAPES} == {k: getattr(config, k) for k in SHAPES}
    assert set(result.defaulted) <= {row.field for row in FAMILY.defaults}
    assert not set(result.defaulted) & set(result.inferred)
    with pytest.warns(ConfigDefaultsWarning):
        loaded = load_model(bare, dtype=None)
    assert loaded.dtype == torch.float32
    got = loaded.model.state_dict()
    assert got.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(got[key], tensor), key
    # the defaults are the tiny presets' own non-shape values: the same model
    assert torch.allclose(_logits(loaded.model), logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_inferred_text_config(text_ckpts, name: str, tmp_path: Path) -> None:
    folder, saved = text_ckpts[name]
    _check_inferred(_bare(folder, tmp_path), saved.config, saved.state_dict(), _logits(saved))


def test_inferred_vl_config(vl_ckpt, tmp_path: Path, caplog) -> None:
    folder, vl, outer, _ = vl_ckpt
    declared = load_model(folder, dtype=torch.float32)
    bare = _bare(folder, tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _check_inferred(bare, declared.config, declared.model.state_dict(), _logits(vl))
    assert len(_skips(caplog)) == 1  # one load


@pytest.mark.parametrize("name", OURS)
def test_inferred_from_published_names(name: str) -> None:
    """Every preset's tensor names and shapes (text and vision-language names, with vision and
    mtp tensors beside) give back its shapes and its parameter count."""
    cfg = get_preset(name)
    config = build_config(cfg, name)
    stored = headers(checkpoint_tensors(build_meta_model(config, torch.bfloat16)))
    nested = {k.replace("model.", "model.language_model.", 1): v for k, v in stored.items()}
    nested.update(headers({"model.visual.blocks.0.attn.qkv.weight": torch.empty(6, 2), **MTP}))
    for tensors in (stored, nested):
        result = infer_from_tensors(tensors, name)
        assert {k: result.config[k] for k in SHAPES} == {k: getattr(config, k) for k in SHAPES}
        assert count_parameters(result.config) == count_parameters(cfg)


def test_the_key_split_is_a_default_named_in_the_warning() -> None:
    """No tensor splits the key width Hk x dk: a preset of the same shapes decides, else
    dk = dv as published, else an assumption; all three are said."""

    def inferred(**changes):
        cfg = {**get_preset("qwen3.5-tiny-untied"), "hidden_size": 96, **changes}
        model = build_meta_model(build_config(cfg), torch.bfloat16)
        return infer_from_tensors(headers(checkpoint_tensors(model)), "ckpt")

    result = inferred()  # 2 key heads x 16 = dv: the published rule
    assert (result.config["linear_num_key_heads"], result.config["linear_key_head_dim"]) == (2, 16)
    assert "the value head dim, as published" in result.reasons["linear_key_head_dim"]
    assert "linear_key_head_dim" in result.defaulted
    odd = inferred(linear_num_value_heads=4, linear_value_head_dim=24)  # 2 x 16 beside 4 x 24
    assert odd.config["linear_num_key_heads"] * odd.config["linear_key_head_dim"] == 32
    assert "assumed" in odd.reasons["linear_num_key_heads"]
    full = infer_from_tensors(_names(TINY[0]), "ckpt")  # 2 x 16 beside 4 x 24: the preset's
    assert "preset:qwen3.5-tiny" in full.reasons["linear_key_head_dim"]


# ---------------------------------------------------------------------------------------------
# Recognition beside the other families


def _names(preset: str, **changes) -> dict[str, TensorEntry]:
    cfg = {**get_preset(preset), **changes}
    return headers(checkpoint_tensors(build_meta_model(build_config(cfg), torch.bfloat16)))


def test_recognition() -> None:
    for preset in TINY:
        assert recognise("ckpt", _names(preset))[0] is FAMILY
    # a full-attention layer 0 carries dense Qwen3's q_norm: Qwen3.5 still scores higher
    first_full = _names(TINY[0], layer_types=[FULL, LINEAR, LINEAR, LINEAR])
    assert recognise("ckpt", first_full)[0] is FAMILY
    for other in ("qwen3-tiny", "qwen2-tiny", "qwen3-moe-tiny"):
        assert recognise("ckpt", _names(other))[0].model_type == PRESETS[other]["model_type"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (  # Qwen3-Next's fused q | k | v | z projection: its family, which wants in_proj_ba
            lambda t: {k.replace("in_proj_qkv", "in_proj_qkvz"): v for k, v in t.items()},
            r"^ckpt: .*tensor 'model.layers.0.linear_attn.in_proj_ba.weight' missing",
        ),
        (
            lambda t: {**t, "model.layers.0.self_attn.q_proj.weight": header((8, 64))},
            r"^ckpt: .*layer 0 \('model.layers.0.\*'\) has both linear_attn.\* and self_attn",
        ),
        (
            lambda t: {**t, "model.language_model.norm.weight": header((64,))},
            r"^ckpt: tensors 'model.norm.weight' and 'model.language_model.norm.weight' are both "
            r"the text model's 'model.norm.weight'",
        ),
        (
            lambda t: {
                **t,
                "model.layers.0.linear_attn.in_proj_z.weight": header((48, 64)),
            },
            r"^ckpt: .*tensor 'model.layers.0.linear_attn.in_proj_z.weight' has shape \[48, 64\], "
            r"expected \[32, 64\]",
        ),
        (
            lambda t: {
                **t,
                "model.layers.0.linear_attn.conv1d.weight": header((96, 2, 4)),
            },
            r"conv1d.weight' has shape \[96, 2, 4\], expected \[96, 1, kernel >= 2\]",
        ),
        (
            lambda t: {k: v for k, v in t.items() if not k.endswith("0.linear_attn.A_log")},
            r"tensor 'model.layers.0.linear_attn.A_log' missing",
        ),
        (
            lambda t: {
                **t,
                "model.layers.3.self_attn.q_proj.weight": header((96, 64)),
            },
            r"q_proj.weight' has 96 rows, not a multiple of 2 x head_dim: a query and a gate",
        ),
    ],
)
def test_malformed_tensors_are_named(change, message: str) -> None:
    tensors = change(_names(TINY[1]))
    with pytest.raises(AnefxInputError, match=message):
        infer_from_tensors(tensors, "ckpt")


# ---------------------------------------------------------------------------------------------
# Hostile configs and tensors through the command line: exit 2, one line naming file and field


def _edit(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set(**fields):
    def change(config: dict) -> None:
        target = config.get("text_config", config)
        for key, value in fields.items():
            if value is ...:
                target.pop(key, None)
            else:
                target[key] = value

    return change


def _rope(**fields):
    return lambda config: config.get("text_config", config)["rope_parameters"].update(fields)


TEXT_CASES = {
    "layer_types-truncated": (
        _set(layer_types=[LINEAR, LINEAR, FULL]),
        ("'layer_types'", "one entry per layer (4)"),
    ),
    "layer_types-unknown-kind": (
        _set(layer_types=[LINEAR, "moe_attention", FULL, LINEAR]),
        ("'layer_types'", "'moe_attention'", "layer 1"),
    ),
    "layer_types-sliding": (
        _set(layer_types=[LINEAR, "sliding_attention", FULL, LINEAR]),
        ("'layer_types'", "'sliding_attention'"),
    ),
    "value-heads-not-a-multiple": (
        _set(linear_num_value_heads=3),
        ("'linear_num_value_heads' (3)", "'linear_num_key_heads' (2)"),
    ),
    "conv-kernel-1": (_set(linear_conv_kernel_dim=1), ("'linear_conv_kernel_dim' is 1",)),
    # the config class would silently give the 9B's 32 value heads
    "value-heads-missing": (
        _set(linear_num_value_heads=...),
        ("'linear_num_value_heads' missing", "Qwen3_5TextConfig"),
    ),
    "key-dim-zero": (_set(linear_key_head_dim=0), ("'linear_key_head_dim'", "positive")),
    "key-dim-string": (_set(linear_key_head_dim="16"), ("'linear_key_head_dim'", "'16'")),
    "value-heads-huge": (_set(linear_num_value_heads=10**9), ("MAX_HEADS",)),
    "interval-zero": (
        _set(layer_types=..., full_attention_interval=0),
        ("'full_attention_interval'",),
    ),
    "partial-zero": (_rope(partial_rotary_factor=0), ("'partial_rotary_factor'",)),
    "partial-above-one": (_rope(partial_rotary_factor=1.5), ("'partial_rotary_factor'", "1.5")),
    "partial-odd-width": (
        _rope(partial_rotary_factor=0.03125),
        ("'partial_rotary_factor'", "rotates 1 of the 32"),
    ),
    "mrope-section-string": (
        _rope(mrope_section="abc"),
        ("'rope_parameters.mrope_section'", "'abc'"),
    ),
    "mrope-interleaved-int": (
        _rope(mrope_interleaved=2),
        ("'rope_parameters.mrope_interleaved'",),
    ),
}
VL_CASES = {
    "text_config-missing": (lambda c: c.pop("text_config"), ("'text_config' missing",)),
    "text_config-a-list": (lambda c: c.update(text_config=[1]), ("'text_config'", "object")),
    "text_config-other-family": (
        lambda c: c["text_config"].update(model_type="qwen3"),
        ("'text_config.model_type'", "'qwen3'"),
    ),
    "outer-tie-string": (
        lambda c: c.update(tie_word_embeddings="yes"),
        ("'tie_word_embeddings'", "'yes'"),
    ),
    "outer-quantized": (
        lambda c: c.update(quantization_config={"quant_method": "fp8"}),
        ("'quantization_config'",),
    ),
    "nested-layer_types-truncated": (
        _set(layer_types=[LINEAR]),
        ("(text_config)", "'layer_types'", "one entry per layer (4)"),
    ),
    "nested-value-heads": (
        _set(linear_num_value_heads=5),
        ("(text_config)", "'linear_num_value_heads' (5)"),
    ),
}


def _refused(folder: Path, needles: tuple[str, ...]) -> None:
    code, _, err = cli("inspect", folder)
    assert code == 2, err
    one_line(err, *needles)


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_hostile_text_configs(text_ckpts, case: str, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(text_ckpts["qwen3.5-tiny"][0], folder)
    change, needles = TEXT_CASES[case]
    _edit(folder, change)
    _refused(folder, (str(folder / "config.json"), *needles))


@pytest.mark.parametrize("case", sorted(VL_CASES))
def test_hostile_vl_configs(vl_ckpt, case: str, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(vl_ckpt[0], folder)
    change, needles = VL_CASES[case]
    _edit(folder, change)
    _refused(folder, (str(folder / "config.json"), *needles))


def _replace_tensor(folder: Path, name: str, tensor: torch.Tensor) -> Path:
    """Store TENSOR as NAME in whichever file holds NAME; returns that file."""
    for path in sorted(folder.glob("*.safetensors")):
        stored = load_file(path)
        if name in stored:
            stored[name] = tensor
            save_file(stored, path, metadata={"format": "pt"})
            return path
    raise AssertionError(name)


@pytest.mark.parametrize("with_config", [True, False], ids=["config", "inferred"])
def test_a_linear_tensor_of_the_wrong_shape(vl_ckpt, tmp_path: Path, with_config: bool) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(vl_ckpt[0], folder)
    stored = "model.language_model.layers.1.linear_attn.in_proj_z.weight"
    path = _replace_tensor(folder, stored, torch.zeros(8, 64))
    if with_config:  # the file and the tensor as the file names it
        _refused(folder, (str(path), f"'{stored}'", "[8, 64]", "expected [96, 64]"))
    else:  # inferred from layer 0, then checked: the loader names the layer that disagrees
        (folder / "config.json").unlink()
        _refused(folder, (str(path), f"'{stored}'", "[8, 64]"))


# Accepted mutations of the Qwen3.5 fields must load and run; refused ones end in one line.
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-4, max_value=80),
    st.sampled_from([10**9, 2.5, "x", [], [1, 1, 2]]),
    st.lists(st.sampled_from([LINEAR, FULL, "sliding_attention", 3]), max_size=5),
)
_FIELDS = [
    "layer_types",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "full_attention_interval",
    "head_dim",
    "num_attention_heads",
    "tie_word_embeddings",
]


@given(
    edits=st.lists(st.tuples(st.sampled_from(_FIELDS), _VALUES), min_size=1, max_size=3),
    rope=st.dictionaries(
        st.sampled_from(["partial_rotary_factor", "mrope_section", "mrope_interleaved"]),
        _VALUES | st.floats(min_value=-1, max_value=2),
        max_size=2,
    ),
)
def test_config_mutations_load_or_are_refused(
    text_ckpts, tmp_path_factory, edits: list, rope: dict
) -> None:
    folder = tmp_path_factory.mktemp("mut") / "ckpt"
    shutil.copytree(text_ckpts["qwen3.5-tiny-untied"][0], folder)
    _edit(folder, _set(**{k: (... if v is None else v) for k, v in edits}))
    _edit(folder, _rope(**rope))
    code, _, err = cli("inspect", folder)
    assert code in (0, 2), err
    if code == 2:  # the config, or a stored tensor it does not fit
        line = one_line(err)
        assert "config.json: field '" in line or ".safetensors: tensor '" in line, line
        return
    loaded = load_model(folder, dtype=torch.float32)
    logits = _logits(loaded.model)
    assert logits.shape == (1, 9, 512) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# What is a family field, not a model_type test


def test_partial_rotary_is_the_familys(monkeypatch) -> None:
    """The loader accepts a partial rotary for a family that says it rotates part of each head,
    and only for one."""
    qwen3 = {**get_preset("qwen3-tiny"), "rope_parameters": {"rope_theta": 1e6}}
    qwen3["rope_parameters"]["partial_rotary_factor"] = 0.5
    with pytest.raises(AnefxInputError, match="'partial_rotary_factor' is 0.5; Qwen models rotate"):
        build_config(dict(qwen3), "x")
    monkeypatch.setitem(
        FAMILIES, "qwen3", dataclasses.replace(FAMILIES["qwen3"], partial_rotary=True)
    )
    config = build_config(dict(qwen3), "x")
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    monkeypatch.setitem(FAMILIES, "qwen3_5_text", dataclasses.replace(FAMILY, partial_rotary=False))
    with pytest.raises(AnefxInputError, match="'partial_rotary_factor' is 0.25"):
        build_config(get_preset("qwen3.5-tiny"), "x")


def test_inspect_says_the_layer_kinds(text_ckpts, tmp_path: Path) -> None:
    code, out, err = cli("inspect", "preset:qwen3.5-27b")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "48 linear, 16 full: [L,L,L,F] x 16" in rows["layer_kinds"]
    assert rows["layer_kinds"].endswith("declared")
    assert "16 key x 128, 48 value x 128, conv 4" in rows["linear_attention"]
    assert "24 heads, 4 KV x 256, gated, rotary 64" in rows["full_attention"]
    assert f"{count_parameters(PRESETS['qwen3.5-27b']):,}" in out
    bare = _bare(text_ckpts["qwen3.5-tiny"][0], tmp_path)
    code, out, err = cli("inspect", bare, "--json")
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert {"layer_kinds", "layer_types", "linear_num_value_heads"} <= set(info["_inferred"])
    assert info["_defaulted"]["linear_key_head_dim"] == 16 and "_notes" not in info
    assert info["_parameters"] == count_parameters(PRESETS["qwen3.5-tiny"])
    # a plan needs nothing but the headers: the same for the preflight the CLI ran
    assert preflight(bare).config.layer_types == PRESETS["qwen3.5-tiny"]["layer_types"]


@pytest.mark.parametrize("name", TINY)
def test_text_layouts_lower_to_transformers(text_ckpts, name: str) -> None:
    """Tied and untied tiny hybrids, loaded from their folders: the lowered stateful graphs
    (prefill, then decode steps) equal the saved model's logits (fp32, 1e-4 relative)."""
    from anefx.generation import Session, lower_decoder

    folder, saved = text_ckpts[name]
    ids = _ids()[0].tolist() + _ids()[0].tolist()[:4]
    session = Session(lower_decoder(str(folder), batch=8, context=32, dtype=torch.float32))
    got = session.feed_all(ids)
    with torch.no_grad():
        want = saved(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_vl_layout_lowers_to_the_vl_models_logits(vl_ckpt) -> None:
    import anefx

    folder, vl, _, _ = vl_ckpt
    low = anefx.lower(str(folder), seq_len=9, dtype=torch.float32)
    want = _logits(vl)
    got = low.run(_ids())
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
