"""anefx diff: per-stage parity, and the first bad stage named when a fault is planted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anefx
from anefx.lowering.diff import diff
from anefx.lowering.shape_prop import propagate_shapes
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint

LAYERS, SEQ = 4, 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("diff")
    cfg = {**get_preset("qwen3-tiny"), "num_hidden_layers": LAYERS, "max_window_layers": LAYERS}
    write_random_checkpoint(folder, cfg, dtype=torch.float32, seed=5)
    return folder


def _ids() -> list[int]:
    return torch.randint(0, 512, (SEQ,), generator=torch.Generator().manual_seed(0)).tolist()


def test_healthy_model_passes_every_stage(ckpt: Path) -> None:
    r = diff(str(ckpt), ids=_ids())
    assert r.stages == ["embedding", *(f"model.layers.{i}" for i in range(LAYERS))] + [
        "final norm",
        "logits",
    ]
    assert r.first_bad == {"float32": None, "float16": None}
    assert all(s.psnr_db >= 100 for s in r.by_dtype["float32"])
    assert all(s.psnr_db >= 60 for s in r.by_dtype["float16"])
    assert all(s.cosine > 0.9999 for s in r.by_dtype["float16"])


def _plant(low, layer: int, factor: float) -> None:
    """Scale the MLP output of one decoder layer (its down projection) by FACTOR."""
    gm = low.graph_module
    target = f"model.layers.{layer}.mlp.down_proj"
    node = [n for n in gm.graph.nodes if n.meta.get("anefx_module") == target][-1]
    with gm.graph.inserting_after(node):
        bad = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, factor))
    node.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
    bad.meta["anefx_module"] = target
    gm.recompile()
    propagate_shapes(gm)


@pytest.mark.parametrize(
    "dtype, layer, factor", [(torch.float32, 2, 1.01), (torch.float16, 1, 2.0)]
)
def test_planted_fault_is_named(ckpt: Path, dtype, layer: int, factor: float) -> None:
    low = anefx.lower(str(ckpt), seq_len=SEQ, dtype=dtype)
    _plant(low, layer, factor)
    r = diff(str(ckpt), ids=_ids(), dtypes=(dtype,), lowered={dtype: low})
    key = str(dtype).replace("torch.", "")
    assert r.first_bad[key] == f"model.layers.{layer}", r.render()
    before = [s for s in r.by_dtype[key] if s.stage == f"model.layers.{layer - 1}"][0]
    assert before.psnr_db >= r.min_psnr[key]  # the stages before the fault stay healthy
    assert f"first stage below {r.min_psnr[key]:g} dB: model.layers.{layer}" in r.render()


def test_cli_diff_json(capsys, ckpt: Path) -> None:
    from anefx.cli import main

    code = main(["diff", str(ckpt), "--ids", ",".join(map(str, _ids())), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert out["first_bad_stage"] == {"float32": None, "float16": None}
    assert len(out["results"]["float16"]) == LAYERS + 3
    assert {"stage", "max_abs", "psnr_db", "cosine"} <= set(out["results"]["float32"][0])
