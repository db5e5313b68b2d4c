"""Hostile and malformed checkpoints through the real CLI: exit 2, one line naming the file, field
or tensor, no traceback, nothing in the checkpoint (or behind its symlinks) modified.

Every case fails in preflight, before the model is built or a weight is read, so the file runs
in seconds; the Hypothesis tests mutate config.json and the safetensors header at random.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _cli import cli, snapshot
from hypothesis import event, given
from hypothesis import strategies as st

from anefx.models import limits
from anefx.models.load import load_model, preflight
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp16 qwen3 checkpoint, written once; each case works on a copy."""
    folder = tmp_path_factory.mktemp("base") / "ckpt"
    return write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# Helpers


def one_error_line(err: str, needles: tuple[str, ...]) -> str:
    """ERR holds one "anefx:" line, the error, naming NEEDLES (progress lines may precede it)."""
    lines = [line for line in err.splitlines() if line.startswith("anefx:")]
    assert len(lines) == 1 and lines[0].startswith("anefx: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    return lines[0]


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + body


def last_tensor(header: dict) -> str:
    """The tensor stored last in the file."""
    names = [k for k in header if k != "__metadata__"]
    return max(names, key=lambda k: header[k]["data_offsets"][0])


def edit_weights(folder: Path, change: Callable[[bytes], bytes]) -> None:
    path = folder / WEIGHTS
    path.write_bytes(change(path.read_bytes()))


def edit_config(folder: Path, **fields: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))  # NaN and Infinity as JSON5-ish literals, as Python does


def write_index(folder: Path, overrides: dict[str, str]) -> None:
    """An index mapping every tensor to model.safetensors, but for OVERRIDES (tensor -> shard)."""
    header, _ = split((folder / WEIGHTS).read_bytes())
    weight_map = {k: WEIGHTS for k in header if k != "__metadata__"}
    weight_map.update(overrides)
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---------------------------------------------------------------------------------------------
# The cases: each damages a copy of the checkpoint (and may plant files beside it), then every
# command must refuse it the same way.


@dataclass(frozen=True)
class Case:
    damage: Callable[[Path, Path], object]  # (checkpoint folder, the folder around it)
    needles: tuple[str, ...]  # what the message must name
    commands: tuple[str, ...] = ("check", "inspect", "convert")


def _overlap(data: bytes) -> bytes:
    # the last tensor starts 8 bytes early, inside its neighbour; sizes and the total still
    # add up, so only the offsets are wrong (a reader that checks sizes reads shifted weights)
    header, body = split(data)
    begin, end = header[last_tensor(header)]["data_offsets"]
    header[last_tensor(header)]["data_offsets"] = [begin - 8, end - 8]
    return join(header, body[:-8])


def _gap(data: bytes) -> bytes:
    header, body = split(data)
    begin, end = header[last_tensor(header)]["data_offsets"]
    header[last_tensor(header)]["data_offsets"] = [begin + 8, end + 8]
    return join(header, body + bytes(8))


def _past_end(data: bytes) -> bytes:
    header, body = split(data)
    begin, end = header[last_tensor(header)]["data_offsets"]
    header[last_tensor(header)]["data_offsets"] = [begin, end + 4096]
    return join(header, body)


def _aliased_layers(folder: Path, _: Path) -> None:
    # the "26 MB file is a 20 000-layer model" trick on a small scale: extra layers whose
    # tensors all point at layer 0's bytes; no config.json, so the shapes give the config
    header, body = split((folder / WEIGHTS).read_bytes())
    for name in [k for k in header if k.startswith("model.layers.0.")]:
        for layer in (2, 3):
            header[name.replace(".0.", f".{layer}.", 1)] = dict(header[name])
    (folder / WEIGHTS).write_bytes(join(header, body))
    (folder / "config.json").unlink()


def _far_layer_no_config(folder: Path, _: Path) -> None:
    # without config.json the layer count comes from the names: layer 1 renamed to 99 999
    header, body = split((folder / WEIGHTS).read_bytes())
    header = {k.replace("model.layers.1.", "model.layers.99999."): v for k, v in header.items()}
    (folder / WEIGHTS).write_bytes(join(header, body))
    (folder / "config.json").unlink()


def _grown_shape(data: bytes) -> bytes:
    header, body = split(data)
    header[last_tensor(header)]["shape"][0] += 1  # more elements than its bytes hold
    return join(header, body)


def _unknown_dtype(data: bytes) -> bytes:
    header, body = split(data)
    header[last_tensor(header)]["dtype"] = "Q4"
    return join(header, body)


def _deep_header(data: bytes) -> bytes:
    return join(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"")


def _not_utf8(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    raw = data[8 : 8 + n].replace(b'"model.norm.weight"', b'"model.norm.weigh\xff"')
    return data[:8] + raw + data[8 + n :]


def _symlink(folder: Path, name: str, target: str | Path) -> None:
    (folder / name).symlink_to(target)


def _outside_copy(around: Path) -> Path:
    """A valid copy of the weights outside the checkpoint folder (a target that must not be
    read)."""
    other = around / "other"
    other.mkdir(exist_ok=True)
    return Path(shutil.copy(around / "ckpt" / WEIGHTS, other / WEIGHTS))


def _weights_link_outside(folder: Path, around: Path) -> None:
    target = _outside_copy(around)
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to(target)


def _index_entry(shard: str) -> Callable[[Path, Path], None]:
    def damage(folder: Path, around: Path) -> None:
        _outside_copy(around)
        write_index(folder, {"model.norm.weight": shard})

    return damage


def _index_link_outside(folder: Path, around: Path) -> None:
    _symlink(folder, "linked.safetensors", _outside_copy(around))
    (folder / "linked.safetensors").rename(folder / "sub.bin")  # not found by the glob
    write_index(folder, {"model.norm.weight": "sub.bin"})


def _config_link_outside(folder: Path, around: Path) -> None:
    (around / "other").mkdir(exist_ok=True)
    target = Path(shutil.copy(folder / "config.json", around / "other" / "config.json"))
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(target)


def _symlink_loop(folder: Path, _: Path) -> None:
    _symlink(folder, "a.safetensors", "b.safetensors")
    _symlink(folder, "b.safetensors", "a.safetensors")


def _config_folder(folder: Path, _: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def _moe_dense_layer_7(folder: Path, _: Path) -> None:
    edit_config(folder, model_type="qwen3_moe", num_experts=2, moe_intermediate_size=8)
    edit_config(folder, mlp_only_layers=[7])


def _config(**fields: object) -> Callable[[Path, Path], None]:
    return lambda folder, _: edit_config(folder, **fields)


def _config_text(text: bytes) -> Callable[[Path, Path], None]:
    return lambda folder, _: (folder / "config.json").write_bytes(text)


def _rope(**params: object) -> dict:
    return {"rope_type": "default", "rope_theta": 1e6, **params}


def _legacy(**fields: object) -> dict:
    return {"rope_parameters": ..., **fields}


CASES: dict[str, Case] = {
    # -- safetensors files: the library validates, the message names the file
    "overlapping-offsets": Case(
        lambda f, _: edit_weights(f, _overlap), (WEIGHTS, "truncated or corrupt", "invalid offset")
    ),
    "aliased-layers-no-config": Case(_aliased_layers, (WEIGHTS, "invalid offset")),
    "gapped-offsets": Case(lambda f, _: edit_weights(f, _gap), (WEIGHTS, "invalid offset")),
    "offsets-past-end": Case(lambda f, _: edit_weights(f, _past_end), (WEIGHTS, "corrupt")),
    "shape-larger-than-bytes": Case(
        lambda f, _: edit_weights(f, _grown_shape), (WEIGHTS, "invalid shape")
    ),
    "unknown-dtype": Case(lambda f, _: edit_weights(f, _unknown_dtype), (WEIGHTS, "Q4")),
    "inferred-layer-99999": Case(
        _far_layer_no_config, ("model.layers.99999.", "names layer 99999", "MAX_LAYERS")
    ),
    "truncated": Case(lambda f, _: edit_weights(f, lambda d: d[:-100]), (WEIGHTS, "corrupt")),
    "header-length-past-end": Case(
        lambda f, _: edit_weights(f, lambda d: len(d).to_bytes(8, "little") + d[8:]),
        (WEIGHTS, "corrupt"),
    ),
    "header-length-huge": Case(
        lambda f, _: edit_weights(f, lambda d: (1 << 62).to_bytes(8, "little") + d[8:]),
        (WEIGHTS, "header too large"),
    ),
    "header-nested-200000-deep": Case(
        lambda f, _: edit_weights(f, _deep_header), (WEIGHTS, "recursion limit")
    ),
    "header-not-utf8": Case(lambda f, _: edit_weights(f, _not_utf8), (WEIGHTS, "UTF-8")),
    "random-bytes": Case(
        lambda f, _: edit_weights(f, lambda d: bytes(range(256)) * 16), (WEIGHTS, "corrupt")
    ),
    "empty-file": Case(lambda f, _: edit_weights(f, lambda d: b""), (WEIGHTS, "corrupt")),
    "folder-named-safetensors": Case(
        lambda f, _: (f / "extra.safetensors").mkdir(), ("extra.safetensors", "is a folder")
    ),
    "fifo-named-safetensors": Case(
        lambda f, _: os.mkfifo(f / "pipe.safetensors"),
        ("pipe.safetensors", "not a regular file"),
    ),
    "symlink-loop": Case(_symlink_loop, ("a.safetensors", "symlink loop")),
    "dangling-symlink": Case(
        lambda f, _: _symlink(f, "gone.safetensors", "nowhere.safetensors"),
        ("gone.safetensors", "dangling symlink"),
    ),
    "weights-symlink-outside": Case(_weights_link_outside, (WEIGHTS, "outside the checkpoint")),
    "config-symlink-outside": Case(_config_link_outside, ("config.json", "outside")),
    # -- the shard index: names must be plain relative paths inside the folder
    "index-dotdot": Case(
        _index_entry("../../other/model.safetensors"),
        (INDEX, "'../../other/model.safetensors'", "model.norm.weight", "'..'"),
    ),
    "index-dotdot-to-a-real-file": Case(
        _index_entry("../other/model.safetensors"), (INDEX, "'../other/model.safetensors'", "'..'")
    ),
    "index-absolute": Case(
        _index_entry("/etc/passwd"), (INDEX, "'/etc/passwd'", "model.norm.weight", "absolute")
    ),
    "index-nul": Case(_index_entry("model\x00.safetensors"), (INDEX, "NUL")),
    "index-symlink-outside": Case(_index_link_outside, (INDEX, "sub.bin", "outside")),
    "index-missing-shard": Case(
        _index_entry("model-00009.safetensors"), (INDEX, "model-00009.safetensors", "missing")
    ),
    # -- config.json: every field the model reads
    "config-nested-200000-deep": Case(
        _config_text(b"[" * 200_000 + b"]" * 200_000), ("config.json", "nested too deeply")
    ),
    "config-5000-digit-int": Case(
        _config_text(b'{"model_type": "qwen3", "hidden_size": ' + b"9" * 5000 + b"}"),
        ("config.json", "invalid JSON"),
    ),
    "config-not-utf8": Case(_config_text(b'{"model_type": "qwen3\xff"}'), ("config.json", "UTF-8")),
    "config-is-a-folder": Case(_config_folder, ("config.json", "is a folder")),
    "rms_norm_eps-nan": Case(_config(rms_norm_eps=math.nan), ("'rms_norm_eps'", "nan")),
    "rms_norm_eps-negative": Case(_config(rms_norm_eps=-1e-6), ("'rms_norm_eps'", "positive")),
    "rms_norm_eps-zero": Case(_config(rms_norm_eps=0), ("'rms_norm_eps'", "positive")),
    "rms_norm_eps-string": Case(_config(rms_norm_eps="tiny"), ("'rms_norm_eps'", "'tiny'")),
    "rope_type-unknown": Case(
        _config(rope_parameters=_rope(rope_type="bogus")),
        ("'rope_parameters.rope_type'", "'bogus'", "yarn"),
    ),
    "rope_scaling-type-unknown": Case(
        _config(**_legacy(rope_theta=1e6, rope_scaling={"type": "bogus", "factor": 2.0})),
        ("'rope_scaling.type'", "'bogus'"),
    ),
    "rope_theta-string": Case(
        _config(rope_parameters=_rope(rope_theta="1e6")), ("'rope_parameters.rope_theta'", "'1e6'")
    ),
    "rope_theta-negative": Case(
        _config(rope_parameters=_rope(rope_theta=-1e6)), ("'rope_parameters.rope_theta'", "-1")
    ),
    "rope_theta-zero": Case(
        _config(rope_parameters=_rope(rope_theta=0)), ("'rope_parameters.rope_theta'",)
    ),
    "rope_theta-nan": Case(
        _config(rope_parameters=_rope(rope_theta=math.nan)), ("'rope_parameters.rope_theta'", "nan")
    ),
    "rope_theta-inf": Case(
        _config(rope_parameters=_rope(rope_theta=math.inf)), ("'rope_parameters.rope_theta'", "inf")
    ),
    "legacy-rope_theta-negative": Case(
        _config(**_legacy(rope_theta=-10000.0)), ("'rope_theta'", "-10000")
    ),
    "legacy-rope_theta-string": Case(_config(**_legacy(rope_theta="big")), ("'rope_theta'",)),
    "legacy-rope_scaling-factor-negative": Case(
        _config(**_legacy(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": -2})),
        ("'rope_scaling.factor'", "-2"),
    ),
    "rope-factor-nan": Case(
        _config(rope_parameters=_rope(rope_type="dynamic", factor=math.nan)),
        ("'rope_parameters.factor'", "nan"),
    ),
    "rope-factor-zero": Case(
        _config(rope_parameters=_rope(rope_type="linear", factor=0)), ("'rope_parameters.factor'",)
    ),
    "rope_scaling-not-an-object": Case(
        _config(**_legacy(rope_scaling="yarn")), ("'rope_scaling'", "object")
    ),
    "yarn-beta_fast-zero": Case(
        _config(rope_parameters=_rope(rope_type="yarn", factor=4.0, beta_fast=0)),
        ("'rope_parameters.beta_fast'",),
    ),
    "partial_rotary_factor": Case(
        _config(rope_parameters=_rope(partial_rotary_factor=0.5)), ("'partial_rotary_factor'",)
    ),
    "hidden_act-os.system": Case(_config(hidden_act="os.system"), ("'hidden_act'", "os.system")),
    # the capture's own causal mask would ignore the window: a different model, refused
    "sliding-window-used": Case(
        _config(
            use_sliding_window=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        ("'use_sliding_window'", "window 8"),
    ),
    "tie_word_embeddings-string": Case(
        _config(tie_word_embeddings="yes"), ("'tie_word_embeddings'", "'yes'")
    ),
    "attention_bias-int": Case(_config(attention_bias=1), ("'attention_bias'", "true or false")),
    "dtype-not-a-dtype": Case(_config(dtype="save"), ("'dtype'", "'save'")),
    "key-shadows-a-method": Case(_config(to_dict="x"), ("'to_dict'", "method")),
    "num_labels-huge": Case(_config(num_labels=10**9), ("'num_labels'", "MAX_LABELS")),
    "quantization_config": Case(
        _config(quantization_config={"quant_method": "awq"}), ("'quantization_config'",)
    ),
    "max_position_embeddings-negative": Case(
        _config(max_position_embeddings=-1), ("'max_position_embeddings'", "-1")
    ),
    "max_position_embeddings-float": Case(
        _config(max_position_embeddings=4096.5), ("'max_position_embeddings'", "4096.5")
    ),
    "sliding_window-negative": Case(
        _config(use_sliding_window=True, sliding_window=-4), ("'sliding_window'",)
    ),
    "mlp_only_layers-out-of-range": Case(_moe_dense_layer_7, ("'mlp_only_layers'", "7")),
    # -- bounds (models/limits.py): the field, its value and the bound, before any allocation
    "layers-20000": Case(
        _config(num_hidden_layers=20_000), ("'num_hidden_layers'", "20000", "512", "MAX_LAYERS")
    ),
    "layers-100000": Case(_config(num_hidden_layers=100_000), ("'num_hidden_layers'", "100000")),
    "hidden-huge": Case(_config(hidden_size=10**6), ("'hidden_size'", "MAX_HIDDEN")),
    "intermediate-huge": Case(
        _config(intermediate_size=10**7), ("'intermediate_size'", "MAX_INTERMEDIATE")
    ),
    "vocab-huge": Case(_config(vocab_size=10**9), ("'vocab_size'", "MAX_VOCAB")),
    "heads-huge": Case(
        _config(num_attention_heads=2**20, num_key_value_heads=2**20), ("'num_attention_heads'",)
    ),
    "head_dim-huge": Case(_config(head_dim=10**5), ("'head_dim'", "MAX_HEAD_DIM")),
    "positions-huge": Case(
        _config(max_position_embeddings=10**12), ("'max_position_embeddings'", "MAX_POSITIONS")
    ),
    "int-beyond-float": Case(_config(vocab_size=10**400), ("'vocab_size'", "MAX_VOCAB")),
    "parameters-huge": Case(
        _config(
            num_hidden_layers=512, hidden_size=65536, intermediate_size=262144, layer_types=...
        ),
        ("config.json", "parameters", "MAX_PARAMETERS"),
    ),
    "layers-not-in-tensors": Case(
        _config(num_hidden_layers=100, layer_types=...),
        ("num_hidden_layers is 100", "layers 0..1 only", "model.layers.2."),
    ),
    "layers-at-bound-not-in-tensors": Case(
        _config(num_hidden_layers=limits.MAX_LAYERS, layer_types=...), ("num_hidden_layers is 512",)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused(name: str, base: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    case = CASES[name]
    folder = tmp_path / "ckpt"
    shutil.copytree(base, folder, symlinks=True)
    case.damage(folder, tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path.parent / f"{tmp_path.name}-out.mlpackage"
    argv = {"check": ["check", str(folder)], "inspect": ["inspect", str(folder)]}
    argv["convert"] = ["convert", str(folder), "-o", str(out)]
    for command in case.commands:
        code, _, err = cli(*argv[command])
        assert code == 2, (command, err)
        one_error_line(err, case.needles)
        assert snapshot(tmp_path) == before, command
    assert not out.exists()
    assert capfd.readouterr().err == ""  # nothing else reached stderr (library chatter, logs)


# ---------------------------------------------------------------------------------------------
# What must keep working, and the API the CLI builds on


def _hf_snapshot(around: Path, base: Path) -> Path:
    """The huggingface_hub cache layout: snapshot files are symlinks to ../../blobs/<hash>."""
    repo = around / "models--Qwen--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("config.json", WEIGHTS):
        digest = hashlib.sha256((base / name).read_bytes()).hexdigest()
        shutil.copy(base / name, repo / "blobs" / digest)
        (snap / name).symlink_to(Path("..", "..", "blobs", digest))
    return snap


def test_hf_cache_snapshot_loads_and_is_confined_to_its_repo(base: Path, tmp_path: Path) -> None:
    snap = _hf_snapshot(tmp_path, base)
    before = snapshot(tmp_path)
    code, out, err = cli("inspect", snap, "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["_tensors"] > 0
    plan = preflight(snap)
    assert plan.root == (tmp_path / "models--Qwen--tiny").resolve()
    assert set(plan.protected) == {snap.resolve(), plan.root}

    # a snapshot file pointing out of the repository is refused like any other
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(base / WEIGHTS, tmp_path / "elsewhere" / WEIGHTS)
    (snap / WEIGHTS).unlink()
    (snap / WEIGHTS).symlink_to(tmp_path / "elsewhere" / WEIGHTS)
    before = snapshot(tmp_path)
    code, _, err = cli("check", snap, "--meta")
    assert code == 2
    one_error_line(err, (WEIGHTS, "outside the checkpoint folder"))
    assert snapshot(tmp_path) == before


def test_preflight_then_load_model(base: Path) -> None:
    plan = preflight(base, dtype=torch.float16)
    assert plan.origin == "config.json" and plan.folder == base.resolve()
    assert plan.tensors is not None and plan.stored_bytes == 2 * plan.parameters
    assert plan.weight_bytes == plan.bytes_at(torch.float16) == plan.bytes_at(torch.float32) // 2
    loaded = load_model(plan, meta=True)  # the plan's dtype, no dtype argument
    assert loaded.plan is plan and loaded.dtype == torch.float16
    assert sum(p.numel() for p in loaded.model.parameters()) == plan.parameters
    assert load_model(plan, dtype=torch.float32, meta=True).dtype == torch.float32
    preset = preflight("preset:qwen3-moe-tiny")
    assert preset.folder is None and preset.protected == () and preset.random_weights
    assert preset.dtype == torch.bfloat16 and preset.tensors is None


def test_load_model_reads_each_header_once(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anefx.models import checkpoint_files

    reads = []
    original = checkpoint_files.read_safetensors_header
    monkeypatch.setattr(
        checkpoint_files,
        "read_safetensors_header",
        lambda *a, **k: reads.append(a) or original(*a, **k),
    )
    plan = preflight(base)
    load_model(plan, meta=True)
    assert len(reads) == 1


# ---------------------------------------------------------------------------------------------
# Random mutations: whatever they give, a clean exit and an untouched checkpoint

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 10**18, 2**63, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "type", "rope_theta", "factor"]), st.integers()),
)


def _check_clean(around: Path, argv: list[str]) -> int:
    """Run ARGV; a clean exit (an error: one line), nothing under AROUND touched."""
    before = snapshot(around)
    code, _, err = cli(*argv)
    event(f"{argv[0]}: exit {code}")  # shown by --hypothesis-show-statistics
    assert code in (0, 1, 2), err
    if code == 2:
        one_error_line(err, ())
    assert snapshot(around) == before
    return code


@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(
                sorted(get_preset("qwen3-tiny")) + ["rope_theta", "rope_scaling", "num_labels"]
            ),
            st.one_of(st.just(...), _VALUES),
        ),
        min_size=1,
        max_size=3,
    ),
    rope=st.none()
    | st.dictionaries(st.sampled_from(["rope_theta", "factor", "rope_type"]), _VALUES),
)
def test_config_mutations(base: Path, tmp_path_factory, edits: list, rope: dict | None) -> None:
    around = tmp_path_factory.mktemp("cfg")
    folder = around / "ckpt"
    shutil.copytree(base, folder)
    edit_config(folder, **dict(edits))
    if rope is not None:
        edit_config(folder, rope_parameters={"rope_type": "default", **rope})
    if _check_clean(around, ["inspect", str(folder)]) == 0:
        # accepted: the model must also capture and lower (structure only: fast)
        _check_clean(around, ["check", str(folder), "--meta", "--seq", "4"])


def _mutate_header(data: bytes, kind: str, draw: st.DataObject) -> bytes:
    header, body = split(data)
    name = draw.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if kind == "offsets":
        header[name]["data_offsets"] = draw.draw(st.lists(_VALUES, min_size=0, max_size=3))
    elif kind == "offset-shift":
        shift = draw.draw(st.integers(min_value=-64, max_value=64))
        header[name]["data_offsets"] = [o + shift for o in header[name]["data_offsets"]]
    elif kind == "dtype":
        header[name]["dtype"] = draw.draw(st.sampled_from(["F32", "I32", "F64", "BOOL", "X"]))
    elif kind == "shape":
        header[name]["shape"] = draw.draw(st.lists(_VALUES, max_size=3))
    elif kind == "length":
        return (
            draw.draw(st.integers(min_value=0, max_value=2**64 - 1)).to_bytes(8, "little")
            + (data[8:])
        )
    elif kind == "bytes":
        at = draw.draw(st.integers(min_value=0, max_value=len(data) - 1))
        junk = draw.draw(st.binary(min_size=1, max_size=16))
        return data[:at] + junk + data[at + len(junk) :]
    elif kind == "cut":
        return data[: draw.draw(st.integers(min_value=0, max_value=len(data)))]
    return join(header, body)


@given(
    kind=st.sampled_from(
        ["offsets", "offset-shift", "dtype", "shape", "length", "bytes", "cut", "none"]
    ),
    data=st.data(),
)
def test_header_mutations(base: Path, tmp_path_factory, kind: str, data: st.DataObject) -> None:
    around = tmp_path_factory.mktemp("hdr")
    folder = around / "ckpt"
    shutil.copytree(base, folder)
    edit_weights(folder, lambda raw: _mutate_header(raw, kind, data))
    if data.draw(st.booleans(), label="drop config.json"):
        (folder / "config.json").unlink()  # the config inferred from the mutated shapes
    _check_clean(around, ["inspect", str(folder)])
