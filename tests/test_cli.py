"""The CLI: exit codes, one-line messages on bad input, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anefx.cli import main
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.bfloat16, seed=1)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_clear_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("anefx:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_check_clean_model_exits_0_and_json_has_counts(capsys, ckpt: Path) -> None:
    code, out, _ = _run(capsys, "check", str(ckpt), "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["stage"] == "lowered" and rep["errors"] == 0
    assert rep["counts"].get("gather") == 1


def test_check_raw_exits_1_with_errors(capsys, ckpt: Path) -> None:
    code, out, _ = _run(capsys, "check", str(ckpt), "--raw")
    assert code == 1
    assert "linear" in out and "rms_pow_rsqrt" in out and "model.layers.0" in out


def test_presets_lists_shapes(capsys) -> None:
    code, out, _ = _run(capsys, "presets")
    assert code == 0
    for name in ("qwen3-0.6b", "qwen3-32b", "qwen3-tiny"):
        assert name in out


def test_convert_writes_package_and_report(capsys, ckpt: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "m.mlpackage"
    code, out, err = _run(capsys, "convert", str(ckpt), "-o", str(out_path), "--seq", "16")
    assert code == 0, err
    assert (out_path / "Data" / "anefx" / "report.json").is_file()  # the report travels inside
    assert "emitted:main" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]


def _bad_inputs(ckpt: Path, tmp: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    cases = {}
    cases["missing-folder"] = (str(tmp / "nope"), ("nope",))
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((ckpt / "config.json").read_text())
    cases["no-safetensors"] = (str(empty), ("safetensors", "empty"))
    bad_json = _copy(ckpt, tmp / "badjson")
    (bad_json / "config.json").write_text('{"model_type": "qwen3",,}')
    cases["bad-json"] = (str(bad_json), ("config.json",))
    unknown = _copy(ckpt, tmp / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "llama9"
    (unknown / "config.json").write_text(json.dumps(cfg))
    cases["unknown-model-type"] = (str(unknown), ("model_type", "llama9"))
    from safetensors.torch import load_file, save_file

    missing = _copy(ckpt, tmp / "missing")
    tensors = load_file(missing / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    del tensors[name]
    save_file(tensors, missing / "model.safetensors")
    cases["missing-tensor"] = (str(missing), (name,))
    wrong = _copy(ckpt, tmp / "wrong")
    tensors = load_file(wrong / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, wrong / "model.safetensors")
    cases["wrong-shape"] = (str(wrong), (name,))
    trunc = _copy(ckpt, tmp / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (str(trunc), ("model.safetensors",))
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "missing-folder",
        "no-safetensors",
        "bad-json",
        "unknown-model-type",
        "missing-tensor",
        "wrong-shape",
        "truncated",
    ],
)
def test_bad_input_exit_2_one_line_no_output(capsys, ckpt: Path, tmp_path: Path, case) -> None:
    (tmp_path / "in").mkdir()
    model, needles = _bad_inputs(ckpt, tmp_path / "in")[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = _run(capsys, "convert", model, "-o", str(out_dir / "m.mlpackage"))
    assert code == 2
    _one_clear_line(err, *needles)
    assert list(out_dir.iterdir()) == []
    code, _, err = _run(capsys, "check", model)
    assert code == 2
    _one_clear_line(err, *needles)


def test_unwritable_output_path(capsys, ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "sub" / "m.mlpackage"
    code, _, err = _run(capsys, "convert", str(ckpt), "-o", str(target), "--seq", "8")
    assert code == 2
    _one_clear_line(err, str(blocker))
    assert blocker.read_text() == "not a folder"


def test_force_emits_despite_errors(capsys, ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    # an fp32 lowering breaks the fp16 rule: refused without --force, emitted with it
    out = tmp_path / "f.mlpackage"
    code, _, err = _run(
        capsys, "convert", str(ckpt), "-o", str(out), "--seq", "8", "--dtype", "float32"
    )
    assert code == 1 and "--force" in err and not out.exists()
    code, _, err = _run(
        capsys, "convert", str(ckpt), "-o", str(out), "--seq", "8", "--dtype", "float32", "--force"
    )
    assert out.is_dir() and "--force" in err
