"""Progress on stderr: stage lines and step counts, plain lines off a terminal, nothing on
stdout; with --json, stdout is one JSON document."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from _cli import cli

from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_steps_are_plain_lines_off_a_terminal_and_a_bar_on_one() -> None:
    log = io.StringIO()
    p = Progress(stream=log)
    assert list(p.steps(iter("abc"), 3, "decode steps")) == ["a", "b", "c"]
    lines = log.getvalue().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines] == [f"decode steps {i}/3" for i in (1, 2, 3)]
    assert "\r" not in log.getvalue()  # a log file gets whole lines only

    tty = _Terminal()
    p = Progress(stream=tty)
    assert list(p.steps(range(4), 4, "parts")) == [0, 1, 2, 3]
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue()  # tqdm redraws its bar

    silent = io.StringIO()
    p = Progress(enabled=False, stream=silent)
    p("stage")
    assert list(p.steps([1, 2], 2, "x")) == [1, 2] and silent.getvalue() == ""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("progress") / "ck"
    return write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float16)


def _stages(err: str) -> list[str]:
    return [ln.split("] ", 1)[1] for ln in err.splitlines() if ln.startswith("[")]


def test_long_commands_say_what_they_do_and_json_keeps_stdout_clean(ckpt, tmp_path) -> None:
    pkg = tmp_path / "m.mlpackage"
    code, out, err = cli("convert", ckpt, "-o", pkg, "--context", "32", "--batch", "4")
    assert code == 0 and any(s.startswith("loading") for s in _stages(err)), err
    assert "ANE constraint report" in out
    code, out, err = cli("verify", pkg, ckpt, "--steps", "3")
    stages = _stages(err)
    assert code == 0 and stages[0].startswith("reading") and "sha256" in stages[0], err
    assert [s for s in stages if s.startswith("the package: decode steps")] == [
        f"the package: decode steps {i}/2" for i in (1, 2)
    ]
    code, out, err = cli("diff", ckpt, "--dtype", "float16")
    assert code == 0 and any("lowering and running" in s for s in _stages(err)), err
    code, out, err = cli("inspect", ckpt)
    assert code == 0 and any(s.startswith("building its structure") for s in _stages(err))
    for argv in (
        ("inspect", ckpt, "--json"),
        ("verify", pkg, ckpt, "--steps", "2", "--json"),
        ("convert", ckpt, "-o", pkg, "--seq", "8", "--json"),
    ):
        code, out, err = cli(*argv)
        assert code == 0, err
        json.loads(out)  # the whole of stdout is one JSON document
        assert _stages(err) == [], err  # and progress is quiet
