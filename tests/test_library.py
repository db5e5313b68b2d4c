"""The library entry points: ``anefx.convert`` does the whole job and returns what it wrote;
``anefx verify`` gates on thresholds; the CLI's convert is a thin call of the library's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anefx
from anefx.errors import AnefxInputError
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from tests._cli import cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lib") / "qwen3-tiny"
    write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float16, seed=3)
    return folder


@pytest.fixture(scope="module")
def converted(ckpt: Path, tmp_path_factory) -> anefx.conversion.Conversion:
    out = tmp_path_factory.mktemp("out") / "tiny.mlpackage"
    return anefx.convert(str(ckpt), out, context=32, batch=8)


def test_convert_returns_what_it_wrote(converted, ckpt: Path) -> None:
    assert converted.kind == "package" and converted.output.is_dir()
    assert set(converted.functions) == {"prefill", "decode"}
    assert converted.errors == 0
    assert {"load", "emit"} <= set(converted.seconds)
    # the report is the one stored in the package, signatures included
    stored = json.loads((converted.output / "Data/anefx/report.json").read_text())
    assert stored["signatures"].keys() == converted.report["signatures"].keys()
    assert stored["model"] == str(ckpt)


def test_verify_gates_on_its_thresholds(converted, ckpt: Path) -> None:
    ok = anefx.verify(converted.output, str(ckpt), ids=[1, 2, 3], steps=2)
    assert ok.passed and ok.psnr_db >= 50
    strict = anefx.verify(converted.output, str(ckpt), ids=[1, 2, 3], steps=2, min_psnr=500)
    assert not strict.passed
    args = ("verify", converted.output, ckpt, "--ids", "1,2,3", "--steps", "2")
    assert cli(*args)[0] == 0
    code, _, err = cli(*args, "--min-psnr", "500")
    assert code == 1, err


def test_bad_options_are_refused_before_loading(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(AnefxInputError, match="batch"):
        anefx.convert(str(ckpt), tmp_path / "x.mlpackage", batch=8)  # --batch needs --context
    with pytest.raises(AnefxInputError, match="lut"):
        anefx.convert(str(ckpt), tmp_path / "x.mlpackage", seq=8, lut={"attention": 4})
    assert not (tmp_path / "x.mlpackage").exists()


def test_the_cli_convert_is_a_call_of_the_library(monkeypatch, ckpt: Path, tmp_path: Path) -> None:
    """cli.cmd_convert hands its flags to anefx.conversion.convert and prints what it returns."""
    import anefx.conversion as conversion

    seen = {}
    real = conversion.convert

    def spy(model, output, **kwargs):
        seen.update(model=model, output=output, **kwargs)
        return real(model, output, **kwargs)

    monkeypatch.setattr(conversion, "convert", spy)
    out = tmp_path / "cli.mlpackage"
    code, stdout, _ = cli("convert", ckpt, "-o", out, "--seq", "8", "--lut", "4", "--json")
    assert code == 0 and out.is_dir()
    assert seen["model"] == str(ckpt) and Path(seen["output"]) == out
    assert seen["seq"] == 8 and seen["lut"] == {"embed": 4, "ffn": 4, "head": 4}
    assert json.loads(stdout.strip().splitlines()[-1])["errors"] == 0


def test_both_writers_refuse_errors_unless_forced(ckpt: Path, tmp_path: Path) -> None:
    """One rule for a package and for parts: fp32 breaks the fp16 rule, so nothing is written
    without force; with it the artifact says it was forced."""
    from anefx.errors import AnefxGraphError

    for out in (tmp_path / "one.mlpackage", tmp_path / "parts"):
        with pytest.raises(AnefxGraphError, match=r"refusing to emit: \d+ ANE error.*--force"):
            anefx.convert(str(ckpt), out, seq=8, dtype=torch.float32)
        assert not out.exists() and not list(tmp_path.glob(".*staging*"))
    package = anefx.convert(
        str(ckpt), tmp_path / "one.mlpackage", seq=8, dtype=torch.float32, force=True
    )
    assert package.report["forced"] is True
    assert sum(len(r.errors) for r in package.lowered.values()) > 0  # the graph's, not the MIL's
    parts = anefx.convert(str(ckpt), tmp_path / "parts", seq=8, dtype=torch.float32, force=True)
    assert parts.manifest["checker"]["forced"] is True
