"""Qwen3.5 packages, executed on Linux by the reference executor: a tiny random hybrid's stateful
package and its parts pass the checker with 0 errors and hold at most one Core ML state each
(the conv and delta-rule states are inputs and outputs, said in the report and the manifest);
`verify` on both reaches 55 dB with the reference token in the top 5; the prefill function has
no loop, scatter or rank-5 tensor; palettization keeps the state-update projections dense."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anefx
from anefx.core import rules
from anefx.models.families import FAMILIES
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.coreml import check_package
from anefx.targets.mil_program import function_block, split_op_name
from anefx.targets.reader import read_manifest, read_spec
from anefx.targets.verify import verify

pytest.importorskip("transformers")

CONTEXT, BATCH, STEPS = 64, 8, 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen35")
    write_random_checkpoint(folder, get_preset("qwen3.5-tiny"), dtype=torch.float32, seed=5)
    return folder


@pytest.fixture(scope="module")
def package(ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "q.mlpackage"
    done = anefx.convert(str(ckpt), out, context=CONTEXT, batch=BATCH, max_chunk_mb=10_000)
    assert done.errors == 0 and done.kind == "package"
    return out


@pytest.fixture(scope="module")
def parts(ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parts") / "q"
    # a chunk budget below two layers' weights: a part per layer or two
    done = anefx.convert(str(ckpt), out, context=CONTEXT, batch=BATCH, max_chunk_mb=0.15)
    assert done.errors == 0 and done.kind == "parts"
    return out


def _ids() -> list[int]:
    return torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(4)).tolist()


def _packages(artifact: Path) -> list[Path]:
    if artifact.suffix == ".mlpackage":
        return [artifact]
    return [artifact / p["file"] for p in read_manifest(artifact)["parts"]]


@pytest.mark.parametrize("which", ["package", "parts"])
def test_one_state_per_program_and_no_errors(request, which: str) -> None:
    artifact = request.getfixturevalue(which)
    for pkg in _packages(artifact):
        spec = read_spec(pkg)
        for fn in spec.description.functions:
            held = list(fn.state)
            assert len(held) <= rules.MAX_STATES_PER_PROGRAM, (pkg.name, fn.name)
            inputs = {i.name for i in fn.input}
            outputs = {o.name for o in fn.output}
            carried = {n for n in inputs if n.startswith(("conv_state_", "rec_state_"))}
            assert {f"{n}_out" for n in carried} <= outputs, (pkg.name, fn.name)
        for report in check_package(pkg):
            assert not report.errors, report.render()


def test_the_manifest_says_each_parts_states(parts: Path) -> None:
    manifest = read_manifest(parts)
    layers_with_state = set()
    for part in manifest["parts"]:
        states = part["functions"]["decode"]["states"]
        for st in states:
            if st.get("carried"):
                assert st["kind"] in ("conv", "recurrent") and len(st["layers"]) == 1
                assert st["layers"][0] in part["layers"]  # a part carries its own layers'
            layers_with_state.update(st["layers"])
        assert sum(not st.get("carried") for st in states) <= 1
    assert layers_with_state == set(range(4))  # every layer's state is in some part


@pytest.mark.parametrize("which", ["package", "parts"])
def test_verify_on_the_executor(request, ckpt: Path, which: str) -> None:
    artifact = request.getfixturevalue(which)
    r = verify(artifact, str(ckpt), ids=_ids(), steps=STEPS)
    assert r.functions == ["decode", "prefill"]
    assert r.psnr_db >= 55.0, r.render()
    assert r.top5_containment == 1.0, r.render()
    assert r.kl_max < 1e-3, r.render()


def test_prefill_has_no_loop_scatter_or_rank5(package: Path) -> None:
    spec = read_spec(package)
    block = function_block(spec, "prefill")
    types = {op.type for op in block.operations}
    assert not types & {"while_loop", "scatter", "scatter_nd", "scatter_along_axis", "cond"}
    for op in block.operations:
        for out in op.outputs:
            if out.type.WhichOneof("type") == "tensorType":
                assert out.type.tensorType.rank <= 4, (op.type, out.name)


@pytest.mark.slow  # a third conversion and a verify: under -m slow, to keep the default run short
def test_palettized_keeps_the_state_update_dense(ckpt: Path, tmp_path: Path) -> None:
    """The linear layers' big projections are palettized with the MLPs ("ffn"); the depthwise
    conv's kernels and the decay / write-strength projections stay dense."""
    family = FAMILIES["qwen3_5_text"]
    for inner, kind in (
        ("linear_attn.in_proj_qkv", "ffn"),
        ("linear_attn.in_proj_z", "ffn"),
        ("linear_attn.out_proj", "ffn"),
        ("self_attn.q_proj", "ffn"),
        ("mlp.down_proj", "ffn"),
        ("linear_attn.conv1d", None),
        ("linear_attn.in_proj_a", None),
        ("linear_attn.in_proj_b", None),
    ):
        assert family.weight_kind(f"model.layers.0.{inner}", "conv") == kind, inner
    out = tmp_path / "lut.mlpackage"
    done = anefx.convert(
        str(ckpt), out, context=CONTEXT, batch=BATCH, lut={"ffn": 8}, max_chunk_mb=10_000
    )
    spec = read_spec(out)
    modules = json.loads(spec.description.metadata.userDefined["anefx.modules"])
    block = function_block(spec, "decode")
    made = {o.name: op.type for op in block.operations for o in op.outputs}
    palettized = set()
    for op in block.operations:
        if op.type == "conv":
            weight = op.inputs["weight"].arguments[0].name
            if made.get(weight) == "constexpr_lut_to_dense":
                palettized.add(split_op_name(weight, modules)[0])
    assert any(".linear_attn.in_proj_qkv" in m for m in palettized), palettized
    assert not any(m.endswith(("conv1d", "in_proj_a", "in_proj_b")) for m in palettized)
    r = verify(out, str(ckpt), ids=_ids(), steps=8)
    assert done.errors == 0 and r.top5_containment >= 0.75, r.render()


def test_argmax_package_and_diff_stages(ckpt: Path, tmp_path: Path) -> None:
    """--argmax (the token chosen in the model) converts with 0 errors; `diff` names each
    layer's kind and every stage is at its dtype's threshold."""
    from anefx.lowering.diff import diff

    done = anefx.convert(
        str(ckpt), tmp_path / "a.mlpackage", context=CONTEXT, batch=BATCH, argmax=True
    )
    assert done.errors == 0
    result = diff(str(ckpt), ids=_ids())
    layers = [s for s in result.stages if s.startswith("model.layers.")]
    assert layers == [
        "model.layers.0 (linear)",
        "model.layers.1 (linear)",
        "model.layers.2 (full)",
        "model.layers.3 (linear)",
    ]
    assert result.passed, result.render()
