"""Reading a converted artifact under hostile input (issue 12): verify and generate.

Two artifacts are converted once per module from a tiny checkpoint: a parts folder (embedding,
two one-layer chunks, head) and a stateful single package. Each case copies one, damages the
copy (manifest fields, part files, weight and spec bytes, links, digests, progress records) and
runs ``anefx verify`` / ``anefx generate`` through ``anefx.cli.main``: the exit code, exactly one
stderr line starting with ``anefx:`` that names the file, field or flag, no exception escaping
``main``, and the sha256 of every file of the copy the same before and after (reading never
modifies an artifact). Some cases "reseal" the copy (recompute the digests the manifest or the
package report records, as an attacker would) to reach the checks behind the digests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from _cli import cli, one_line, snapshot
from hypothesis import given
from hypothesis import strategies as st

from anefx.cli import main
from anefx.errors import AnefxInputError
from anefx.lowering.diff import DEFAULT_MIN_PSNR, DiffResult, StageDiff, below, json_safe
from anefx.models.limits import MAX_STEPS
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets import artifact
from anefx.targets.coreml_exec import load_package
from anefx.targets.verify import (
    DEFAULT_MIN_PSNR_DB,
    DEFAULT_MIN_TOP1,
    VerifyResult,
    lowest,
    verdict,
)

TINY = ["--context", "32", "--batch", "4"]
RUN = ["--ids", "1,2,3", "--max-new-tokens", "2"]  # the cheapest generate that runs the program
HEAD, CHUNK, EMBED = "03_head.mlpackage", "01_layers_0-0.mlpackage", "00_embed.mlpackage"
WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"
SPEC = "Data/com.apple.CoreML/model.mlmodel"


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("hostile") / "ckpt"
    write_random_checkpoint(folder, {**get_preset("qwen3-tiny")}, dtype=torch.float16)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))  # copied beside the parts
    return folder


@pytest.fixture(scope="module")
def built(ckpt: Path, tmp_path_factory) -> dict[str, Path]:
    """Converted once: a parts folder and a stateful single package."""
    root = tmp_path_factory.mktemp("artifacts")
    parts, package = root / "parts", root / "one.mlpackage"
    assert main(["convert", str(ckpt), "-o", str(parts), *TINY, "--max-chunk-mb", "0.1"]) == 0
    assert main(["convert", str(ckpt), "-o", str(package), *TINY]) == 0
    assert artifact.package_report(package) is not None  # the report travels inside
    names = sorted(p["file"] for p in json.loads((parts / "manifest.json").read_text())["parts"])
    assert names == [EMBED, CHUNK, "02_layers_1-1.mlpackage", HEAD]
    return {"parts": parts, "package": package}


def refused(
    path: Path, *needles: object, commands=("verify", "generate"), model="preset:qwen3-tiny"
) -> str:
    """verify and generate on PATH: exit 2, one line holding NEEDLES, PATH not modified."""
    before = snapshot(path)
    line = ""
    for command in commands:
        argv = [command, path, model] if command == "verify" else [command, path, *RUN]
        code, _, err = cli(*argv)
        assert code == 2, (command, err)
        line = one_line(err, *needles)
    assert snapshot(path) == before
    return line


@pytest.fixture
def parts(built, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["parts"], tmp_path / "parts", symlinks=True))


@pytest.fixture
def package(built, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["package"], tmp_path / "one.mlpackage", symlinks=True))


def reseal(path: Path) -> None:
    """Recompute the digests the artifact records for its files (as an attacker would)."""
    if (path / artifact.MANIFEST).is_file():
        doc = json.loads((path / artifact.MANIFEST).read_text())
        for p in doc["parts"]:
            p["sha256"] = artifact.tree_digest(path / p["file"])
        (path / artifact.MANIFEST).write_text(json.dumps(doc))
    else:
        item = path / artifact.REPORT_ITEM
        report = json.loads(item.read_text())
        report["files"] = artifact.package_files(path)
        item.write_text(json.dumps(report))


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# the artifacts as written pass, and reading them changes nothing


def test_intact_artifacts_verify_and_generate(built, ckpt: Path) -> None:
    for path in built.values():
        before = snapshot(path)
        code, out, err = cli("verify", path, ckpt, "--steps", "3", "--json")
        assert code == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["passed"] and result["psnr_db"] >= DEFAULT_MIN_PSNR_DB
        code, out, err = cli("generate", path, *RUN)
        assert code == 0, err
        assert len(out.strip().splitlines()[-1].split()) == 2
        assert snapshot(path) == before  # Manifest.json included: no MLModel rewrote it
    code, out, err = cli("generate", built["parts"], "--prompt", "w1 w2", "--max-new-tokens", "2")
    assert code == 0 and out.strip().startswith("w"), err


# ---------------------------------------------------------------------------------------------
# manifest.json of a parts folder: every kind of damage, one line naming the field


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value(node[keys[-1]]) if callable(value) else value

    return edit


def _delete(*keys):
    def edit(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return edit


def _both(*edits):
    def edit(doc):
        for e in edits:
            e(doc)

    return edit


def _fns(part: int, tail: tuple, value) -> object:
    """Set the same field of both functions of PART."""
    return _both(
        *(_set("parts", part, "functions", fn, *tail, value) for fn in ("prefill", "decode"))
    )


MANIFEST_CASES = {
    "not-an-object": (lambda d: [], ["manifest.json: must be a JSON object, got []"]),
    "not-json": (lambda d: '{"format": ', ["manifest.json: invalid JSON at line 1"]),
    "nested-too-deeply": (lambda d: "[" * 100_000, ["manifest.json: invalid JSON"]),
    "format": (_set("format", "anefx-chunked/9"), ["field 'format'", "anefx-chunked/9"]),
    "model-missing": (_delete("model"), ["field 'model' is missing"]),
    "layers-a-string": (
        _set("model", "num_hidden_layers", "2"),
        ["field 'model.num_hidden_layers' must be an integer"],
    ),
    "functions-not-a-list": (_set("functions", "decode"), ["field 'functions' must be a list"]),
    "default-unknown": (_set("default_function", "sample"), ["field 'default_function'"]),
    "parts-not-a-list": (_set("parts", "00_embed"), ["field 'parts' must be a list"]),
    "parts-empty": (_set("parts", []), ["field 'parts' must hold 1 to"]),
    "part-a-string": (_set("parts", 0, EMBED), ["field 'parts[0]' must be an object"]),
    "part-file-empty": (_set("parts", 0, "file", ""), ["'parts[0].file' must be a non-empty"]),
    "part-file-an-int": (_set("parts", 0, "file", 7), ["'parts[0].file'", "got 7"]),
    "part-file-absolute": (
        _set("parts", 0, "file", "/tmp/x.mlpackage"),
        ["'parts[0].file'", "must be a plain file name"],
    ),
    "part-file-dotdot": (
        _set("parts", 0, "file", "../other/part"),
        ["'parts[0].file'", "'../other/part' must be a plain file name"],
    ),
    "part-file-missing": (
        _set("parts", 0, "file", "09_gone.mlpackage"),
        ["'parts[0].file'", "is not in the folder"],
    ),
    "part-twice": (
        lambda d: d["parts"].insert(1, d["parts"][0]),
        ["'parts[1].file'", "names a part listed before"],
    ),
    "sha256-not-hex": (_set("parts", 1, "sha256", "xyz"), ["'parts[1].sha256'", "hex"]),
    "inputs-missing": (
        _delete("parts", 1, "functions", "decode", "inputs"),
        ["field 'parts[1].functions.decode.inputs' is missing"],
    ),
    "shape-not-a-list": (
        _set("parts", 0, "functions", "decode", "inputs", 0, "shape", "1x1"),
        ["'parts[0].functions.decode.inputs[0].shape' must be a list"],
    ),
    "shape-negative": (
        _set("parts", 0, "functions", "decode", "inputs", 0, "shape", [1, -1]),
        ["'parts[0].functions.decode.inputs[0].shape'", "positive integer sizes"],
    ),
    "shape-bool": (
        _set("parts", 0, "functions", "decode", "inputs", 0, "shape", [True, 1]),
        ["'parts[0].functions.decode.inputs[0].shape'", "positive integer sizes"],
    ),
    "dtype-unknown": (
        _set("parts", 0, "functions", "decode", "outputs", 0, "dtype", "bfloat16"),
        ["'parts[0].functions.decode.outputs[0].dtype'", "bfloat16"],
    ),
    "state-shape-1e9": (
        _fns(1, ("states", 0, "shape"), [1, 2, 10**9, 32]),
        ["'parts[1].functions.prefill.states[0].shape'", "MAX_STATE_BYTES"],
    ),
    "context-disagrees": (
        _set("context", 64),
        ["field 'context' is 64", "state kv_cache_0", "32 positions"],
    ),
    "seq-len-disagrees": (_set("seq_len", "prefill", 8), ["field 'seq_len'", "prefill: 8"]),
    "input-from-a-later-part": (
        _set("parts", 1, "functions", "decode", "inputs", 0, "from", {"part": 3, "output": "x"}),
        ["'parts[1].functions.decode.inputs[0].from.part'", "no earlier part gives it"],
    ),
    "input-from-nowhere": (
        _set("parts", 1, "functions", "decode", "inputs", 0, "from", {"model": "attention"}),
        ["'parts[1].functions.decode.inputs[0].from.model'", "is not a model input"],
    ),
    "layer-missing": (_set("parts", 2, "layers", []), ["field 'parts'", "each of 0..1 once"]),
    "layer-twice": (_set("parts", 2, "layers", [0]), ["field 'parts'", "each of 0..1 once"]),
    "tokenizer-outside": (
        _set("tokenizer_files", ["../ckpt/tokenizer.json"]),
        ["'tokenizer_files[0]'", "plain file name"],
    ),
    # what the manifest says must be what the part's program declares
    "renamed-output": (
        _fns(3, ("outputs", 0, "name"), "scores"),
        [f"part {HEAD}", "output 'scores' is not in the part's program", "logits"],
    ),
    "renamed-state": (
        _fns(1, ("states", 0, "name"), "k_cache_9"),
        [f"part {CHUNK}", "state 'k_cache_9' is not in the part's program"],
    ),
    "reshaped-output": (
        _fns(3, ("outputs", 0, "shape"), lambda s: [*s[:-1], s[-1] + 1]),
        [
            f"part {HEAD}, function prefill: output 'logits' is float16[1, 4, 512]",
            "the manifest says float16[1, 4, 513]",
        ],
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_damaged_manifest(parts: Path, ckpt: Path, case: str) -> None:
    edit, needles = MANIFEST_CASES[case]
    path = parts / "manifest.json"
    doc = json.loads(path.read_text())
    new = edit(doc)
    new = doc if new is None else new
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    refused(parts, str(path), *needles, model=ckpt)


def test_manifest_size_bound(parts: Path, ckpt: Path, monkeypatch) -> None:
    from anefx.targets import reader

    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 1000)
    refused(parts, "manifest.json", "more than the 1000", model=ckpt)


# ---------------------------------------------------------------------------------------------
# the files: links, digests, truncation, garbage


def test_part_file_linked_outside(parts: Path, ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.mlpackage"
    shutil.move(parts / EMBED, outside)
    (parts / EMBED).symlink_to(outside)
    refused(parts, f"'parts[0].file' '{EMBED}' is a symbolic link", str(outside), model=ckpt)


def test_manifest_a_link_or_a_fifo(parts: Path, ckpt: Path, tmp_path: Path) -> None:
    manifest = parts / "manifest.json"
    shutil.move(manifest, tmp_path / "manifest.json")
    manifest.symlink_to(tmp_path / "manifest.json")
    refused(parts, "manifest.json: a symbolic link; anefx writes none", model=ckpt)
    manifest.unlink()
    os.mkfifo(manifest)  # opened as a file it would block the reader forever
    refused(parts, "manifest.json: not a file", model=ckpt)


def test_link_inside_a_part_or_package(parts: Path, package: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    shutil.copy(parts / HEAD / WEIGHTS, secret)
    for root in (parts / HEAD, package):
        (root / WEIGHTS).unlink()
        (root / WEIGHTS).symlink_to(secret)
    reseal(parts)
    refused(parts, "weight.bin: a symbolic link", str(secret))
    refused(package, "weight.bin: a symbolic link", str(secret))


def test_flipped_weight_byte(parts: Path, package: Path, ckpt: Path) -> None:
    """Before: verify printed PSNR nan dB and exited 0, generate printed 0 0 0 0."""
    flip_byte(parts / CHUNK / WEIGHTS)
    refused(
        parts, CHUNK, "does not match the sha256 manifest.json records", "weight.bin", model=ckpt
    )
    flip_byte(package / WEIGHTS)
    refused(package, f"{WEIGHTS} does not match the sha256 in its anefx report", model=ckpt)


def test_package_files_against_its_report(package: Path, tmp_path: Path) -> None:
    extra = package / "Data/com.apple.CoreML/notes.txt"
    extra.write_text("hello")
    refused(package, "Data/com.apple.CoreML/notes.txt is not listed in its anefx report")
    extra.unlink()
    spec = package / SPEC
    moved = tmp_path / "model.mlmodel"
    shutil.move(spec, moved)
    refused(package, f"{SPEC} is missing (its anefx report lists it)")
    shutil.move(moved, spec)
    shutil.rmtree(package / "Data/anefx")
    refused(package, "not written by anefx", "convert it again")


def test_truncated_weight_file(parts: Path, package: Path) -> None:
    for file in (parts / CHUNK / WEIGHTS, package / WEIGHTS):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    # the executor itself: one AnefxInputError naming the file and the offset
    prog = load_package(parts / CHUNK)  # the spec is intact: the weights are read lazily
    with pytest.raises(AnefxInputError, match=r"weight\.bin: the weight at offset \d+"):
        prog.run("decode", *_zero_feeds(prog, "decode"))
    # behind resealed digests: exit 2, named
    reseal(parts)
    reseal(package)
    refused(parts, str(parts / CHUNK / WEIGHTS), "the weight at offset", commands=("generate",))
    refused(package, str(package / WEIGHTS), "the weight at offset", commands=("generate",))


def _zero_feeds(prog, fn: str) -> tuple[dict, dict]:
    import numpy as np

    f = prog.functions[fn]
    return {t.name: np.zeros(t.shape, t.dtype) for t in f.inputs}, prog.zero_states(fn)


def test_garbage_or_truncated_spec(parts: Path, package: Path) -> None:
    (parts / CHUNK / SPEC).write_bytes(b"not a Core ML model " * 50)
    spec = package / SPEC
    spec.write_bytes(spec.read_bytes()[: spec.stat().st_size // 2])
    reseal(parts)
    reseal(package)
    refused(parts, f"{CHUNK}/{SPEC}: not a readable Core ML model spec")
    refused(package, f"{SPEC}: not a readable Core ML model spec")
    spec.write_bytes(b"")
    reseal(package)
    refused(package, f"{SPEC}: holds no Core ML model")


def test_package_manifest_items_confined(package: Path) -> None:
    manifest = package / artifact.PACKAGE_MANIFEST
    doc = json.loads(manifest.read_text())
    root = doc["rootModelIdentifier"]
    for bad, needle in (
        ("../../../../etc/passwd", "leads outside"),
        ("/etc/passwd", "leads outside"),
    ):
        doc["itemInfoEntries"][root]["path"] = bad
        manifest.write_text(json.dumps(doc))
        reseal(package)
        refused(package, "Manifest.json: the root model item", needle)
    doc["rootModelIdentifier"] = "nothing"
    manifest.write_text(json.dumps(doc))
    reseal(package)
    refused(package, "Manifest.json: field 'rootModelIdentifier'", "names no item")


def test_blob_file_name_confined(package: Path) -> None:
    """A weight whose file name in the spec is '..' never leaves the weights folder."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / SPEC).read_bytes())
    changed = 0
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                value = op.attributes.get("val")
                if value is not None and value.WhichOneof("value") == "blobFileValue":
                    value.blobFileValue.fileName = "@model_path/weights/.."
                    changed += 1
    assert changed
    (package / SPEC).write_bytes(spec.SerializeToString())
    reseal(package)
    refused(package, "reads the weight file '@model_path/weights/..'", commands=("generate",))


def test_nan_weights_fail_both_thresholds(package: Path, ckpt: Path) -> None:
    """Weights turned NaN behind resealed digests: verify and generate exit 1, JSON null."""
    file = package / WEIGHTS
    data = bytearray(file.read_bytes())
    _, _, nbytes, start, _ = struct.unpack_from("<IIQQQ", data, 64)  # the first weight
    data[start : start + nbytes] = b"\x00\x7e" * (nbytes // 2)  # fp16 NaN
    file.write_bytes(bytes(data))
    reseal(package)
    code, out, err = cli("verify", package, ckpt, "--steps", "2", "--json")
    assert code == 1, err
    result = json.loads(out)  # stdout is the JSON object only, valid: null, not NaN
    assert result["psnr_db"] is None and result["passed"] is False
    code, out, err = cli("verify", package, ckpt, "--steps", "2")
    assert code == 1 and "FAILED: lowest PSNR nan dB < --min-psnr 50" in out
    code, _, err = cli("generate", package, *RUN)
    assert code == 1
    one_line(err, "anefx: graph error: the logits after 3 tokens are not finite")


def test_hostile_tokenizer(parts: Path) -> None:
    (parts / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    code, _, err = cli("generate", parts, "--prompt", "w1", "--max-new-tokens", "1")
    assert code == 2
    one_line(err, "tokenizer.json: not a readable tokenizer")


# ---------------------------------------------------------------------------------------------
# interrupted conversions


def test_interrupted_conversions(parts: Path, tmp_path: Path, ckpt: Path) -> None:
    (parts / "manifest.json").unlink()
    (parts / artifact.PROGRESS).write_text("{not json")  # an old in-place run, its record torn
    refused(parts, "an interrupted conversion", "with --resume", model=ckpt)
    # the staged layout: nothing at the output yet, its work beside it (a torn marker too)
    out = tmp_path / "later"
    staging = artifact.staging_path(out)
    shutil.copytree(parts, staging / "later")
    (staging / artifact.STAGING_MARKER).write_text("\0\0")
    for command in ("verify", "generate"):
        argv = [command, out, ckpt] if command == "verify" else [command, out, *RUN]
        code, _, err = cli(*argv)
        assert code == 2
        one_line(err, f"{out}: an interrupted conversion", str(staging), "--resume")
    code, _, err = cli("verify", tmp_path / "nothing", ckpt)
    assert code == 2
    one_line(err, "nothing: no such artifact")


# ---------------------------------------------------------------------------------------------
# flags: each out of range is refused naming it, before anything is loaded


def _no_model_load(monkeypatch) -> None:
    """Make loading transformers a test failure: these checks must come first."""
    import anefx.models.load as load

    def refuse(*_a, **_k):
        raise AssertionError("transformers was loaded before the flags were checked")

    monkeypatch.setattr(load, "load_model", refuse)


GENERATE_FLAGS = {
    "max-new-tokens-0": (["--max-new-tokens", "0"], "--max-new-tokens: must be between 1"),
    "max-new-tokens-huge": (["--max-new-tokens", str(MAX_STEPS + 1)], "--max-new-tokens"),
    "temperature-negative": (["--temperature", "-1"], "--temperature: must be a finite"),
    "temperature-nan": (["--temperature", "nan"], "--temperature: must be a finite"),
    "temperature-inf": (["--temperature", "inf"], "--temperature: must be a finite"),
    "top-k-0": (["--top-k", "0"], "--top-k: must be at least 1"),
    "top-p-0": (["--top-p", "0"], "--top-p: must be a finite number in (0, 1]"),
    "top-p-above-1": (["--top-p", "1.5"], "--top-p"),
    "top-p-nan": (["--top-p", "nan"], "--top-p"),
    "seed-negative": (["--seed", "-1"], "--seed: must be between 0 and"),
    "seed-65-bits": (["--seed", str(2**64)], "--seed: must be between 0 and"),
    "seed-not-a-number": (["--seed", "x"], "--seed: expected an integer"),
    "context-0": (["--context", "0"], "--context: must be between 1 and 16384"),
    "context-huge": (["--context", "16385"], "--context: must be between 1 and 16384"),
    "batch-0": (["--batch", "0"], "--batch: must be between 1 and 16384"),
    "batch-above-context": (
        ["--context", "32", "--batch", "64"],
        "--batch 64 must not exceed --context 32",
    ),
    "batch-above-default-context": (
        ["--batch", "600"],
        "--batch 600 must not exceed the default --context 512",
    ),
    "ids-not-integers": (["--ids", "1,x"], "--ids must be comma-separated integers"),
    "ids-empty": (["--ids", ""], "the prompt is empty"),
    "prompt-past-context": (
        ["--context", "32", "--batch", "4", "--ids", ",".join(["1"] * 30), "--max-new-tokens", "4"],
        "a prompt of 30 tokens and --max-new-tokens 4 need 33 positions; the context holds 32",
    ),
}


@pytest.mark.parametrize("case", list(GENERATE_FLAGS))
def test_bad_generate_flags(ckpt: Path, case: str, monkeypatch) -> None:
    _no_model_load(monkeypatch)
    flags, needle = GENERATE_FLAGS[case]
    argv = ["generate", ckpt, *flags]
    if "--ids" not in flags:
        argv += ["--ids", "1,2"]
    code, _, err = cli(*argv, parsing=True)
    assert code == 2
    one_line(err, needle)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--context", "32"], "--context: fixed by the artifact"),
        (["--batch", "4"], "--batch: fixed by the artifact"),
        (["--context", "64", "--batch", "8"], "--context and --batch: fixed by the artifact"),
        (["--max-new-tokens", "40"], "need 42 positions; the context holds 32"),
    ],
)
def test_generate_flags_an_artifact_fixes(built, flags: list[str], needle: str) -> None:
    for path in built.values():
        code, _, err = cli("generate", path, "--ids", "1,2,3", *flags)
        assert code == 2
        line = one_line(err, needle)
        assert "fixed" not in needle or "context 32, batch 4" in line


VERIFY_FLAGS = {
    "steps-0": (["--steps", "0"], "--steps: must be between 1 and"),
    "steps-huge": (["--steps", str(MAX_STEPS + 1)], "--steps: must be between 1 and"),
    "steps-not-a-number": (["--steps", "x"], "--steps: expected an integer"),
    "min-psnr-nan": (["--min-psnr", "nan"], "--min-psnr: must be a finite number"),
    "min-top1-above-1": (["--min-top1", "1.5"], "--min-top1: must be a finite number in [0, 1]"),
    "ids-not-integers": (["--ids", "1;2"], "--ids must be comma-separated integers"),
    "ids-outside-vocabulary": (["--ids", "512"], "--ids must be token ids in [0, 512)"),
    "ids-empty": (["--ids", ""], "--ids must be token ids in [0, 512)"),
    # before: verify --steps 100000 ran the whole reference for minutes first
    "steps-past-context": (
        ["--steps", "100000"],
        "prompt + steps = 100015 tokens exceed the context 32",
    ),
}


@pytest.mark.parametrize("case", list(VERIFY_FLAGS))
def test_bad_verify_flags(built, ckpt: Path, case: str, monkeypatch) -> None:
    _no_model_load(monkeypatch)
    flags, needle = VERIFY_FLAGS[case]
    code, _, err = cli("verify", built["parts"], ckpt, *flags, parsing=True)
    assert code == 2
    one_line(err, needle)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--min-psnr-fp32", "nan"], "--min-psnr-fp32: must be a finite number"),
        (["--min-psnr-fp16", "-1"], "--min-psnr-fp16: must be a finite number in [0, 1000]"),
        (["--ids", "1,two"], "--ids must be comma-separated integers"),
        (["--dtype", "bfloat16"], "--dtype: invalid choice"),
    ],
)
def test_bad_diff_flags(ckpt: Path, flags: list[str], needle: str, monkeypatch) -> None:
    _no_model_load(monkeypatch)
    code, _, err = cli("diff", ckpt, *flags, parsing=True)
    assert code == 2
    one_line(err, needle)


@pytest.mark.parametrize("command", ["verify", "generate", "diff"])
def test_help_ends_with_exit_codes(command: str) -> None:
    code, out, _ = cli(command, "--help", parsing=True)
    assert code == 0
    tail = out[out.index("exit codes:") :]
    out = " ".join(out.split())  # argparse wraps the help to the terminal's width
    assert out.rstrip().endswith("interrupted (Ctrl-C)")
    for c in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {c}" in tail, (c, tail)
    if command == "verify":  # the defaults shown are the module's
        assert f"(default {DEFAULT_MIN_PSNR_DB:g})" in out
        assert f"(default {DEFAULT_MIN_TOP1:g})" in out
    if command == "diff":
        for dt in (torch.float32, torch.float16):
            assert f"(default {DEFAULT_MIN_PSNR[dt]:g})" in out


# ---------------------------------------------------------------------------------------------
# NaN never passes


def test_nan_never_passes() -> None:
    assert verdict(60.0, 1.0, 50.0, 0.9) and verdict(math.inf, 0.9, 50.0, 0.9)
    assert not verdict(math.nan, 1.0, 50.0, 0.9)
    assert not verdict(60.0, math.nan, 50.0, 0.9)
    assert not verdict(49.9, 1.0, 50.0, 0.9) and not verdict(60.0, 0.89, 50.0, 0.9)
    assert math.isnan(lowest([70.0, math.nan, 60.0])) and lowest([70.0, 60.0]) == 60.0
    assert below(math.nan, 80.0) and below(79.9, 80.0) and not below(math.inf, 80.0)
    r = VerifyResult("p", "m", ["main"], 3, 2, math.nan, 1.0, [math.nan, math.inf], [1], [1], 0.1)
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["per_position_psnr_db"] == [
        None,
        None,
    ]
    # diff: every stage NaN was "every stage at or above 80 dB"
    d = DiffResult("m", 4, ["embedding", "logits"])
    d.by_dtype["float32"] = [StageDiff(s, math.nan, math.nan, math.nan) for s in d.stages]
    d.min_psnr["float32"] = 80.0
    d.first_bad["float32"] = next(s.stage for s in d.by_dtype["float32"] if below(s.psnr_db, 80))
    assert not d.passed and "first stage below 80 dB: embedding" in d.render()
    assert json.loads(json.dumps(d.to_dict(), allow_nan=False))["results"]["float32"][0] == {
        "stage": "embedding",
        "max_abs": None,
        "psnr_db": None,
        "cosine": None,
    }
    assert json_safe({"a": [1.0, -math.inf], "b": "x"}) == {"a": [1.0, None], "b": "x"}


# ---------------------------------------------------------------------------------------------
# Hypothesis: any mutation of manifest.json is a pass, a failed threshold or one clear line

# subtrees nothing reads back (checker reports, conversion options): mutated as a whole only
_OPAQUE = {"emitted", "lowered", "modules", "checker", "options", "lut", "conversion_key"}


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    if prefix and prefix[-1] in _OPAQUE:
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


_JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.just([]),
    st.just({}),
    st.lists(st.integers(-3, 2**40), max_size=5),
)


@given(data=st.data())
def test_mutated_manifest_never_escapes(built, data) -> None:
    good = json.loads((built["parts"] / "manifest.json").read_text())
    paths = _paths(good)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(built["parts"], Path(tmp) / "parts"))
        doc = json.loads(json.dumps(good))
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            path = data.draw(st.sampled_from(paths), label="path")
            try:
                parent = doc
                for k in path[:-1]:
                    parent = parent[k]
                old = parent[path[-1]]
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation removed it
            action = data.draw(st.sampled_from(["replace", "scale", "delete"]), label="action")
            if action == "delete":
                del parent[path[-1]]
            elif action == "scale" and isinstance(old, (int, float)) and not isinstance(old, bool):
                parent[path[-1]] = old * data.draw(st.sampled_from([0, -1, 2, 10**9, 0.5]))
            else:
                parent[path[-1]] = data.draw(_JSON_VALUES, label="value")
        (folder / "manifest.json").write_text(json.dumps(doc))
        before = snapshot(folder)
        code, _, err = cli("generate", folder, "--ids", "1,2,3", "--max-new-tokens", "1")
        assert code in (0, 1, 2), err
        if code:
            one_line(err)
        assert snapshot(folder) == before
