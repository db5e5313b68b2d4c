"""Every Qwen family through the same pipeline, from a checkpoint folder, and the family
descriptions (anefx.models.families) that drive it.

Qwen2 (q/k/v bias, no q/k norm), Qwen3 with each rope scaling transformers implements (yarn in
the legacy `rope_scaling` + `rope_theta` spelling, linear and dynamic in `rope_parameters`), and
Qwen3-MoE (per-expert tensors, as published checkpoints store them): fp32 parity with
transformers at rounding level, fp16 PSNR >= 60 dB, and an emitted package without errors.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from _headers import header, headers
from test_end_to_end import psnr, reference_logits

import anefx
from anefx.errors import AnefxInputError
from anefx.generation import lower_decoder
from anefx.lowering.diff import stage_modules
from anefx.models import families
from anefx.models.capture import context_mask
from anefx.models.families import FAMILIES, family_of
from anefx.models.infer_config import infer_config, recognise
from anefx.models.load import build_config, load_model
from anefx.models.presets import PRESETS, get_preset
from anefx.models.synthetic import checkpoint_tensors, random_model, write_random_checkpoint
from anefx.targets.palettize import palettize_program
from anefx.targets.split_packages import layer_of
from tests.test_infer_config import SHAPE_FIELDS  # the fields tensor shapes determine

SEQ = 16


def _legacy_yarn(cfg: dict) -> dict:
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 1e6
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    return cfg


VARIANTS = {
    "qwen2-bias": lambda: get_preset("qwen2-tiny"),
    "qwen3-yarn-legacy-spelling": lambda: _legacy_yarn(get_preset("qwen3-tiny")),
    "qwen3-linear": lambda: {
        **get_preset("qwen3-tiny"),
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
    },
    # the tables are transformers' for the captured length: here beyond the original 8
    "qwen3-dynamic": lambda: {
        **get_preset("qwen3-tiny"),
        "max_position_embeddings": 8,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0},
    },
    "qwen3-moe": lambda: get_preset("qwen3-moe-tiny"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(folder, VARIANTS[request.param](), dtype=torch.float32, seed=11)
    return request.param, folder


def _ids(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(seed))


def test_fp32_parity(family) -> None:
    name, folder = family
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float32)
    ids = _ids(low.config.vocab_size, 0)
    ref = reference_logits(folder, ids)
    err = (low.run(ids) - ref).abs().max().item()
    assert err < 2e-5 * max(1.0, ref.abs().max().item()), (name, err)
    if name == "qwen3-moe":
        assert low.report.stats["moe"]["blocks"] == 1  # layer 1 is a dense MLP


def test_fp16_psnr_and_package(family, tmp_path: Path) -> None:
    name, folder = family
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float16)
    assert not low.report.errors, low.report.render()
    ids = _ids(low.config.vocab_size, 1)
    assert psnr(reference_logits(folder, ids), low.run(ids).float()) >= 60.0, name
    result = anefx.emit(low, tmp_path / f"{name}.mlpackage")
    (rep,) = result["emitted_reports"]
    assert not rep.errors, rep.render()


def test_dynamic_rope_within_the_original_length_keeps_the_original_tables(tmp_path) -> None:
    cfg = {
        **get_preset("qwen3-tiny"),
        "max_position_embeddings": 32,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0},
    }
    write_random_checkpoint(tmp_path, cfg, dtype=torch.float32, seed=2)
    low = anefx.lower(str(tmp_path), seq_len=SEQ, dtype=torch.float32)
    ids = _ids(low.config.vocab_size, 2)
    ref = reference_logits(tmp_path, ids)
    assert (low.run(ids) - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item())


# ---------------------------------------------------------------------------------------------
# The family descriptions (anefx.models.families): each family in one place, and every field
# read by the code it describes.


def test_the_families_are_discovered() -> None:
    assert set(FAMILIES) == {
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "qwen3_5_text",
        "qwen3_5_moe_text",
        "qwen3_next",
        "qwen2_5_vl_text",
        "qwen3_vl_text",
        "qwen3_vl_moe_text",
        "qwen4_exp_text",
    }
    for model_type, family in FAMILIES.items():
        assert family.model_type == model_type and family.tiny in family.presets
        assert family.config_cls().model_type == model_type
        assert family.model_cls().__name__ in family.architectures
        assert all(p["model_type"] == model_type for p in family.presets.values())
        assert all(name in PRESETS for name in family.presets)
    # every preset belongs to exactly one family
    assert sorted(PRESETS) == sorted(n for f in FAMILIES.values() for n in f.presets)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {},
            "field 'model_type' missing; supported: " + ", ".join(sorted(FAMILIES)),
        ),
        ({"model_type": "llama"}, "model_type 'llama' is not supported; supported: qwen2"),
        ({"model_type": ["qwen3"]}, r"model_type \['qwen3'\] is not supported"),
    ],
)
def test_an_unsupported_family_is_named(given: dict, message: str) -> None:
    with pytest.raises(AnefxInputError, match=message):
        family_of(given, "config.json")


# the families that lower (one whose constructs no pass lowers, Family.unlowered, has its own
# tests: tests/test_qwen4_exp.py). The hybrids with experts run the two generic tests below
# under -m slow (test budget: ~10 s each, the slowest captures): their own modules check the
# same more deeply in the default run (config from the tensors, logits, padded prefills and
# decode steps against transformers: tests/test_qwen3_5_moe.py, tests/test_qwen3_next.py).
_CHECKED_IN_THEIR_MODULES = {"qwen3_5_moe_text", "qwen3_next"}
LOWERING = [
    pytest.param(m, marks=pytest.mark.slow) if m in _CHECKED_IN_THEIR_MODULES else m
    for m in sorted(m for m, f in FAMILIES.items() if not f.unlowered)
]


@pytest.fixture(scope="module", params=LOWERING)
def saved(request, tmp_path_factory):
    """Each family's tiny preset with random weights, as transformers' save_pretrained writes it,
    and the transformers model itself (fp32)."""
    family = FAMILIES[request.param]
    model = random_model(get_preset(family.tiny), torch.float32, seed=5)
    folder = tmp_path_factory.mktemp(family.model_type)
    model.save_pretrained(folder)
    return family, folder, model


def test_the_family_pipeline(saved, tmp_path: Path) -> None:
    """load_model from the folder; the config inferred from the tensors alone (config.json
    removed) has the same shapes, the rest from the family's defaults; lowered, no errors in
    fp16, transformers' logits at rounding level in fp32."""
    family, folder, model = saved
    loaded = load_model(str(folder), dtype=torch.float32)
    assert type(loaded.model) is family.model_cls()

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "config.json").unlink()
    result = infer_config(bare, warn=False)
    # a text-only save of a VL tower's decoder is its text twin's (the same model)
    assert result.config["model_type"] in (family.model_type, family.text_twin)
    shapes = {k: v for k, v in result.config.items() if k in SHAPE_FIELDS and k != "model_type"}
    assert shapes == {k: getattr(loaded.config, k) for k in shapes}
    assert len(shapes) >= 6
    defaults = {row.field for row in FAMILIES[result.config["model_type"]].defaults}
    assert set(result.defaulted) <= defaults and set(result.inferred).isdisjoint(result.defaulted)

    low16 = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float16)
    assert not low16.report.errors, low16.report.render()
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float32)
    ids = _ids(model.config.vocab_size, 2)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    err = (low.run(ids) - ref).abs().max().item()
    assert err < 2e-5 * max(1.0, ref.abs().max().item()), (family.model_type, err)


def test_recognition_scores_and_refusals() -> None:
    """The family scoring highest on the tensor names wins; a tie or a refused layout is an
    error naming the checkpoint."""
    moe = FAMILIES["qwen3_moe"]
    model = random_model(get_preset(moe.tiny), torch.float32)
    shapes = headers(checkpoint_tensors(model), "F32")
    family, layers = recognise("ckpt", shapes)
    assert family is moe and sorted(layers) == [0, 1]
    # dense Qwen3 recognises the q_norm of these tensors too, with a lower score
    suffixes, first = frozenset(s for x in layers.values() for s in x), frozenset(layers[0])
    assert 0 < FAMILIES["qwen3"].recognise(suffixes, first) < moe.recognise(suffixes, first)
    equal = {"a": moe, "b": dataclasses.replace(moe, model_type="copy")}
    with pytest.raises(AnefxInputError, match="match the families qwen3_moe and copy equally"):
        recognise("ckpt", shapes, equal)
    shared = {**shapes, "model.layers.0.mlp.shared_expert.up_proj.weight": header((4, 4), "F32")}
    with pytest.raises(AnefxInputError, match=r"^ckpt: .*shared-expert tensors beside q_norm"):
        recognise("ckpt", shared)
    nothing = {k: v for k, v in shapes.items() if "q_norm" not in k and "mlp." not in k}
    with pytest.raises(
        AnefxInputError, match=r"neither q_norm \(Qwen3\) nor a q_proj bias \(Qwen2\)"
    ):
        recognise("ckpt", nothing)


def test_required_fields_come_from_the_family(monkeypatch) -> None:
    cfg = get_preset("qwen3-tiny")
    build_config(dict(cfg))
    qwen3 = dataclasses.replace(FAMILIES["qwen3"], required=(("head_dim",),))
    monkeypatch.setitem(FAMILIES, "qwen3", qwen3)
    cfg.pop("head_dim")
    with pytest.raises(AnefxInputError, match="field 'head_dim' missing .needed by Qwen3Config"):
        build_config(cfg, "config.json")


def test_diff_stages_come_from_the_family(monkeypatch) -> None:
    config = build_config(get_preset("qwen3-tiny"))
    assert stage_modules(config) == [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.norm",
        "lm_head",
    ]
    moved = dataclasses.replace(FAMILIES["qwen3"], norm_path="model.final_norm")
    monkeypatch.setitem(FAMILIES, "qwen3", moved)
    assert stage_modules(config)[-2] == "model.final_norm"


@pytest.mark.parametrize(
    ("module", "reader", "dense", "moe"),
    [
        ("model.embed_tokens", "gather", "embed", "embed"),
        ("lm_head", "gather", "embed", "embed"),  # a tied table read by a gather
        ("lm_head", "conv", "head", "head"),
        ("lm_head.1", "conv", "head", "head"),  # a slice of a split head
        ("model.layers.3.self_attn.q_proj", "conv", "ffn", "ffn"),
        ("model.layers.0.mlp.gate", "conv", "ffn", None),  # the MoE router stays dense
        ("model.norm", "conv", None, None),
        ("model.layers.0.mlp.up_proj", "matmul", None, None),
    ],
)
def test_weight_kinds_by_family(module: str, reader: str, dense, moe) -> None:
    assert FAMILIES["qwen3"].weight_kind(module, reader) == dense
    assert FAMILIES["qwen3_moe"].weight_kind(module, reader) == moe
    assert families.weight_kind(module, reader) == (dense if dense == moe else None)


def test_palettize_asks_the_family_for_the_kinds() -> None:
    """palettize_program reads the weight kinds from the family it is given."""
    from test_palettize import _fp16, _program

    modules = {"model_layers_0_mlp": "model.layers.0.mlp", "lm_head": "lm_head"}
    weights = {
        "model_layers_0_mlp__p__w": (_fp16(32, 256, 1, 1), "conv"),
        "lm_head__p__w": (_fp16(32, 256, 1, 1, seed=1), "conv"),
    }
    lut = {"ffn": 4, "head": 4}
    as_family = palettize_program(_program(weights), lut, modules, FAMILIES["qwen3"].weight_kind)
    assert {w.kind for w in as_family.weights} == {"ffn", "head"}
    mlp_dense = dataclasses.replace(FAMILIES["qwen3"], dense_in_layer=("mlp",))
    summary = palettize_program(_program(weights), lut, modules, mlp_dense.weight_kind)
    assert [w.kind for w in summary.weights] == ["head"]


def test_layer_paths_come_from_the_family(monkeypatch) -> None:
    assert layer_of("model.layers.12.mlp.down_proj") == 12 and layer_of("model.norm") is None
    assert layer_of("model.layers.x") is None and layer_of(None) is None
    for family in FAMILIES.values():
        monkeypatch.setitem(
            FAMILIES, family.model_type, dataclasses.replace(family, layers_path="model.blocks")
        )
    assert layer_of("model.blocks.4.attn") == 4 and layer_of("model.layers.4.attn") is None


def test_stored_parts_and_the_checkpoint_layout(tmp_path: Path) -> None:
    """Experts are stored per expert (the family's stored_parts) and loaded back from them;
    the dense families store every parameter whole."""
    moe = FAMILIES["qwen3_moe"]
    parts = moe.stored_parts("model.layers.0.mlp.experts.gate_up_proj", (8, 64, 64))
    assert parts[:2] == [
        ((0, slice(0, 32)), "model.layers.0.mlp.experts.0.gate_proj.weight"),
        ((0, slice(32, None)), "model.layers.0.mlp.experts.0.up_proj.weight"),
    ]
    assert FAMILIES["qwen3"].stored_parts("model.layers.0.mlp.experts.down_proj", (8, 64, 32)) == []
    model = random_model(get_preset(moe.tiny), torch.float32)
    names = set(checkpoint_tensors(model))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.0.mlp.experts.down_proj" not in names


@pytest.mark.parametrize("model_type", LOWERING)
def test_states_and_padding_follow_the_family(model_type: str, tmp_path: Path) -> None:
    """The stateful graph holds the family's states (names, kinds, shapes); a prefill with
    padded slots changes only its S slots from its first position in the states the family's
    padding rule names, the real tokens' among them (every state, here: a test that states the
    rule, not one per family); what the padding writes is never read (tests/test_generation.py:
    prompts shorter than the batch, then continued, equal transformers)."""
    family = FAMILIES[model_type]
    folder = tmp_path / "ckpt"
    write_random_checkpoint(folder, get_preset(family.tiny), dtype=torch.float32, seed=3)
    context, batch, start, real = 16, 4, 5, 2
    prefill = lower_decoder(str(folder), batch=batch, context=context, dtype=torch.float32).prefill
    want = family.states(prefill.config, context, "float32")
    assert prefill.signature.states == want
    ruled = [s for s in want if s.kind in family.padding.kinds]
    assert ruled, "the padding rule names no state"
    g = torch.Generator().manual_seed(0)
    before = [torch.randn(s.shape, generator=g) for s in want]  # a cache already in use
    pos = torch.tensor([[*range(start, start + real)] + [context] * (batch - real)])
    ids = torch.randint(0, 512, (1, batch), generator=g)
    with torch.no_grad():
        out = prefill.graph_module(
            ids.int(), pos.int(), context_mask(pos, context, torch.float32), *before
        )
    after = out[len(out) - len(want) :]
    written = torch.zeros(context, dtype=torch.bool)
    written[start : start + batch] = True  # the call's slots: real tokens, then the padding
    for spec, old, new in zip(want, before, after, strict=True):
        if spec not in ruled:
            continue
        axis = spec.axes.index(family.padding.axis)
        keep = (~written).nonzero().flatten()
        assert torch.equal(old.index_select(axis, keep), new.index_select(axis, keep)), spec.name
        rows = torch.arange(start, start + real)
        assert not torch.equal(old.index_select(axis, rows), new.index_select(axis, rows))
