"""Where convert writes: only new paths, empty folders and its own artifacts, staged and swapped.

Every case compares the sha256 of every file under the test's folder (links recorded as links,
never followed) before and after: a folder anefx did not write, the checkpoint and the target
of a link are never modified. A full disk is a file-size limit (RLIMIT_FSIZE) set for the
conversion: the kernel refuses the write exactly as a full disk does (EFBIG for ENOSPC).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from _cli import one_line, snapshot

from anefx.cli import main
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.artifact import PACKAGE_FORMAT, REPORT_ITEM, STAGING_MARKER, staging_path

TINY = ["--context", "32", "--batch", "4"]


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("out-safety") / "ck"
    write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float16, seed=5)
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def artifact(ckpt: Path, tmp_path_factory) -> Path:
    """A parts folder converted once (tiny parts: embedding, two layers, head)."""
    out = tmp_path_factory.mktemp("art") / "parts"
    code = main(["convert", str(ckpt), "-o", str(out), *TINY, "--max-chunk-mb", "0.06"])
    assert code == 0
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------------------------------
# What is in the way is never replaced


@pytest.mark.parametrize("suffix", [".mlpackage", ""])
def test_a_folder_anefx_did_not_write_is_refused(capsys, ckpt, tmp_path, suffix) -> None:
    target = tmp_path / f"notes{suffix}"
    target.mkdir()
    (target / "mine.txt").write_text("a user's notes")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "convert", ckpt, "-o", target, "--seq", "8")
    assert code == 2
    one_line(err, target, "mine.txt")
    assert snapshot(tmp_path) == before
    assert "loading" not in err  # refused before any weight is read


@pytest.mark.parametrize("suffix", [".mlpackage", ""])
def test_a_file_in_the_way_is_refused(capsys, ckpt, tmp_path, suffix) -> None:
    target = tmp_path / f"report{suffix}"
    target.write_text("keep me")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "convert", ckpt, "-o", target, "--seq", "8")
    assert code == 2
    one_line(err, target, "a file")
    assert snapshot(tmp_path) == before


def test_the_checkpoint_is_never_an_output(capsys, ckpt, tmp_path) -> None:
    # a checkpoint folder named like a package, given as input and output
    ck = copy_tree(ckpt, tmp_path / "ck.mlpackage")
    before = snapshot(tmp_path)
    for out in (ck, ck / "out", ck / "sub" / "m.mlpackage"):
        code, _, err = run(capsys, "convert", ck, "-o", out, "--seq", "8")
        assert code == 2
        one_line(err, "checkpoint")
    assert snapshot(tmp_path) == before
    # a plain checkpoint folder as the output of parts
    code, _, err = run(capsys, "convert", ckpt, "-o", ckpt, *TINY)
    assert code == 2
    one_line(err, "checkpoint", ckpt.resolve())


def test_links_are_never_written_through(capsys, ckpt, artifact, tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "tokenizer.json").write_text("someone else's file")
    link = tmp_path / "link.mlpackage"
    link.symlink_to(victim, target_is_directory=True)
    # a link at the output path
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "convert", ckpt, "-o", link, "--seq", "8")
    assert code == 2
    one_line(err, "symbolic link")
    # a link planted inside an artifact anefx wrote
    planted = copy_tree(artifact, tmp_path / "planted")
    (planted / "tokenizer.json").unlink()
    (planted / "tokenizer.json").symlink_to(victim / "tokenizer.json")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "convert", ckpt, "-o", planted, *TINY, "--max-chunk-mb", "0.06")
    assert code == 2
    one_line(err, "symbolic link", "tokenizer.json")
    assert snapshot(tmp_path) == before


def test_a_foreign_file_inside_an_artifact_is_refused(capsys, ckpt, artifact, tmp_path) -> None:
    mixed = copy_tree(artifact, tmp_path / "mixed")
    (mixed / "my-notes.txt").write_text("mine")
    inner = copy_tree(artifact, tmp_path / "inner")  # a file put inside one of its parts
    (inner / "00_embed.mlpackage" / "Data" / "notes.txt").write_text("mine too")
    damaged = copy_tree(artifact, tmp_path / "damaged")  # no longer recognisably anefx's
    (damaged / "manifest.json").write_text('{"format": "anefx-chunked/1", "parts": [')
    before = snapshot(tmp_path)
    for out, needle in ((mixed, "my-notes.txt"), (inner, "Data/notes.txt"), (damaged, "did not")):
        for resume in ([], ["--resume"]):
            code, _, err = run(capsys, "convert", ckpt, "-o", out, *TINY, *resume)
            assert code == 2
            one_line(err, needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "output",
    ["/proc/anefx-test.mlpackage", "/proc/anefx-test-parts", "FILE/sub/m.mlpackage", "FILE/x"],
)
def test_unwritable_places(capsys, ckpt, tmp_path, output) -> None:
    (tmp_path / "FILE").write_text("a file")
    output = output.replace("FILE", str(tmp_path / "FILE"))
    before = snapshot(tmp_path)
    args = ["--seq", "8"] if output.endswith(".mlpackage") else TINY
    code, _, err = run(capsys, "convert", ckpt, "-o", output, *args)
    assert code == 2
    one_line(err, "-o")
    assert "loading" not in err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Replacing an artifact: the old one stays whole until the new one is


def test_interrupted_replacement_keeps_the_old_artifact_then_resumes(
    capsys, ckpt, artifact, tmp_path, monkeypatch
) -> None:
    import anefx.targets.coreml as coreml

    out = copy_tree(artifact, tmp_path / "parts")
    old = snapshot(out)
    tmpdir = tmp_path / "system-tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    real, calls = coreml.write_package, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second part is written
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(coreml, "write_package", interrupted)
    # other options (no tokenizer kind change): a new conversion into the same folder
    argv = ["convert", ckpt, "-o", out, "--context", "64", "--batch", "8", "--max-chunk-mb", "0.06"]
    code, _, err = run(capsys, *argv)
    assert code == 130
    assert "--resume" in err
    assert snapshot(out) == old  # the old artifact, whole and unchanged
    staged = staging_path(out)
    assert sorted(p.name for p in (staged / out.name).iterdir() if p.suffix == ".mlpackage") == [
        "00_embed.mlpackage"
    ]
    assert not (staged / "tmp").exists() and list(tmpdir.iterdir()) == []
    monkeypatch.setattr(coreml, "write_package", real)
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    assert "already written, kept (--resume)" in err
    assert not staged.exists() and list(tmpdir.iterdir()) == []
    man = json.loads((out / "manifest.json").read_text())
    assert man["context"] == 64 and snapshot(out) != old
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p["file"] for p in man["parts"]] + ["manifest.json", *man["tokenizer_files"]]
    )


def test_resume_and_flags_that_do_not_apply_are_refused_before_loading(capsys, ckpt, tmp_path):
    cases = [
        (["-o", tmp_path / "m.mlpackage", "--resume"], "--resume"),
        (["-o", tmp_path / "d", "--max-chunk-mb", "nan"], "--max-chunk-mb"),
        (["-o", tmp_path / "d", "--max-chunk-mb", "inf"], "--max-chunk-mb"),
        (["-o", tmp_path / "d", "--max-chunk-mb", "0"], "--max-chunk-mb"),
        (["-o", tmp_path / "d", "--context", "0"], "--context"),
        (["-o", tmp_path / "d", "--context", "99999"], "--context"),
        (["-o", tmp_path / "d", "--context", "32", "--batch", "0"], "--batch"),
        (["-o", tmp_path / "d", "--context", "32", "--batch", "64"], "--batch"),
        (["-o", tmp_path / "d", "--batch", "8"], "--batch"),
        (["-o", tmp_path / "d", "--argmax"], "--argmax"),
        (["-o", tmp_path / "d", "--context", "32", "--seq", "8"], "--seq"),
        (["-o", tmp_path / "d", "--lut", "5"], "5"),
        (["-o", tmp_path / "d", "--lut-ffn", "-1"], "--lut-ffn"),
        (["-o", tmp_path / "d", "--seq", "0"], "--seq"),
    ]
    for extra, needle in cases:
        try:
            code, _, err = run(capsys, "convert", ckpt, *extra)
        except SystemExit as exc:  # argparse: a flag's own value
            code, err = exc.code, capsys.readouterr().err
        assert code == 2, (extra, err)
        one_line(err, needle)
        assert "loading" not in err
    assert list(tmp_path.iterdir()) == []


def test_model_is_required_and_every_help_lists_exit_codes(capsys) -> None:
    for argv in (["check"], ["convert", "-o", "x"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        one_line(capsys.readouterr().err, "model")
    for command in ("check", "convert", "inspect", "diff", "verify", "generate", "matrix"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "exit codes:" in text and "  2 " in text, command


# ---------------------------------------------------------------------------------------------
# A full disk


def _limited(limit: int, fn):
    """Run FN with files limited to LIMIT bytes (a write beyond fails as on a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        return fn()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize(
    "kind, limit, extra",
    [
        ("package", 5_000, []),  # the weights (weight.bin 330 KB)
        ("package", 100_000, ["--lut", "4"]),  # the model spec (weights 92 KB, spec 122 KB)
        ("parts", 100_000, []),  # the second part's weights, after the first part finished
        ("parts", 145_000, []),  # manifest.json (150 KB), after every part
    ],
)
def test_a_full_disk_ends_in_exit_2_and_leaves_nothing(
    capsys, ckpt, artifact, tmp_path, kind, limit, extra
) -> None:
    if kind == "package":
        out, argv = tmp_path / "m.mlpackage", ["--seq", "8"]
    else:  # replacing an artifact: the old one must stay whole
        out, argv = copy_tree(artifact, tmp_path / "parts"), [*TINY, "--max-chunk-mb", "0.06"]
    before = snapshot(tmp_path)
    code = _limited(limit, lambda: main(["convert", str(ckpt), "-o", str(out), *argv, *extra]))
    err = capsys.readouterr().err
    assert code == 2, err
    one_line(err, out, "no more bytes")
    assert snapshot(tmp_path) == before  # no staging left, the old artifact whole


# ---------------------------------------------------------------------------------------------
# Two processes, one result; no temporary files outside the output


_CONVERT_TWO = """
import sys
from anefx.cli import main
ck, bf16, out = sys.argv[1:4]
assert main(["convert", "preset:qwen3-tiny", "-o", out + "/tiny.mlpackage", "--seq", "8"]) == 0
assert main(["convert", bf16, "-o", out + "/bf16", "--context", "32", "--batch", "4",
             "--max-chunk-mb", "0.06"]) == 0
"""


def _child_env(tmpdir: Path, hash_seed: str = "random") -> dict:
    # two hash seeds: set and protobuf-map iteration orders differ between the processes (seeds
    # 1 and 2 ordered the functions of a part differently before check_spec sorted them)
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONHASHSEED=hash_seed)
    env.pop("ANEFX_TMPDIR", None)
    return env


def test_two_processes_write_identical_bytes_and_no_temporary_files(ckpt, tmp_path) -> None:
    bf16 = tmp_path / "bf16"
    write_random_checkpoint(bf16, get_preset("qwen3-tiny"), dtype=torch.bfloat16, seed=9)
    trees = []
    for run_, seed in (("a", "1"), ("b", "2")):
        out, tmpdir = tmp_path / run_, tmp_path / f"tmp-{run_}"
        out.mkdir()
        tmpdir.mkdir()
        subprocess.run(
            [sys.executable, "-c", _CONVERT_TWO, str(ckpt), str(bf16), str(out)],
            env=_child_env(tmpdir, seed),
            check=True,
            capture_output=True,
        )
        assert list(tmpdir.iterdir()) == []  # nothing staged in $TMPDIR, nothing left
        trees.append(snapshot(out))
    assert trees[0] == trees[1]
    assert f"tiny.mlpackage/{REPORT_ITEM}" in trees[0] and "bf16/manifest.json" in trees[0]


_KILLED = """
import os, sys, time
import coremltools.models.model as m
from anefx.cli import main
ck, out, flag = sys.argv[1:4]
real, calls = m._create_mlpackage, []
def hang(*args, **kwargs):  # the second part: coremltools has written its weights
    calls.append(1)
    if len(calls) == 2:
        open(flag, "w").close()
        time.sleep(120)
    return real(*args, **kwargs)
m._create_mlpackage = hang
main(["convert", ck, "-o", out, "--context", "32", "--batch", "4", "--max-chunk-mb", "0.06"])
"""


def test_sigkill_then_resume_leaves_no_staging_anywhere(
    capsys, ckpt, tmp_path, monkeypatch
) -> None:
    out, flag, tmpdir = tmp_path / "parts", tmp_path / "flag", tmp_path / "system-tmp"
    tmpdir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(ckpt), str(out), str(flag)],
        env=_child_env(tmpdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(1200):
            if flag.exists() or child.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert flag.exists(), "the conversion never reached the second part"
    finally:
        child.kill()
        child.wait()
    staged = staging_path(out)
    assert list(tmpdir.iterdir()) == []  # coremltools staged its weights in anefx's staging
    assert (staged / STAGING_MARKER).is_file() and any((staged / "tmp").iterdir())
    assert not out.exists()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    code, _, err = run(
        capsys, "convert", ckpt, "-o", out, *TINY, "--max-chunk-mb", "0.06", "--resume"
    )
    assert code == 0, err
    assert "00_embed.mlpackage: already written, kept (--resume)" in err
    assert not staged.exists() and list(tmpdir.iterdir()) == []
    assert (out / "manifest.json").is_file()


def test_a_package_carries_its_report_and_replaces_its_predecessor(capsys, ckpt, tmp_path):
    pkg = tmp_path / "m.mlpackage"
    (tmp_path / "report.json").write_text("a user's report")  # beside it: never touched
    code, _, err = run(capsys, "convert", ckpt, "-o", pkg, "--seq", "8")
    assert code == 0, err
    report = json.loads((pkg / REPORT_ITEM).read_text())
    assert report["format"] == PACKAGE_FORMAT and report["seq_len"] == 8
    assert set(report["files"]) == {
        str(f.relative_to(pkg)) for f in pkg.rglob("*") if f.is_file()
    } - {REPORT_ITEM}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage", "report.json"]
    code, _, err = run(capsys, "convert", ckpt, "-o", pkg, "--seq", "16")
    assert code == 0, err
    assert json.loads((pkg / REPORT_ITEM).read_text())["seq_len"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage", "report.json"]
    assert (tmp_path / "report.json").read_text() == "a user's report"


def test_something_that_appears_at_the_output_meanwhile_is_kept(
    capsys, ckpt, tmp_path, monkeypatch
) -> None:
    import anefx.targets.coreml as coreml

    out = tmp_path / "m.mlpackage"
    real = coreml.write_package

    def meanwhile(*args, **kwargs):  # the user saves a folder there while anefx converts
        out.mkdir()
        (out / "mine.txt").write_text("written during the conversion")
        return real(*args, **kwargs)

    monkeypatch.setattr(coreml, "write_package", meanwhile)
    code, _, err = run(capsys, "convert", ckpt, "-o", out, "--seq", "8")
    assert code == 2
    one_line(err, out, "appeared there during the conversion")
    assert snapshot(tmp_path) == {
        "m.mlpackage": "dir",
        "m.mlpackage/mine.txt": snapshot(out)["mine.txt"],
    }
