"""Hub ids (ORG/NAME[@REVISION]) as MODEL: resolved in a local Hugging Face cache, offline.

The cache is laid out by huggingface_hub's own helpers (the ones its downloads use: blob names,
snapshot pointers, refs, the file listing), its scanner must read it without a warning, and it
is left byte for byte as it was. Every socket is blocked and every attempt recorded: only
--download may try the network.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from _cli import cli, one_line, snapshot
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    _get_pointer_path,
    repo_folder_name,
)
from huggingface_hub.utils.sha import git_hash

from anefx.errors import AnefxInputError
from anefx.models.hub import hub_cache_dir, is_hub_id, resolve_model
from anefx.models.inspection import inspect_model
from anefx.models.load import load_model, preflight
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.reader import read_manifest

REPO, TAG = "Qwen/Tiny", "v1.0"
CONTEXT, BATCH = "32", "4"


# ---------------------------------------------------------------------------------------------
# The cache, as huggingface_hub writes it


def lay_out(
    cache: Path,
    repo_id: str,
    source: Path,
    names: list[str] | None = None,
    listed: list[str] | None = None,
) -> Path:
    """Put SOURCE's files NAMES (default: all) into CACHE as huggingface_hub's downloads do:
    each file a blob named by its etag (sha256 for LFS weights, git sha1 otherwise), a relative
    link to it in snapshots/<commit>/, refs/main and refs/TAG holding the commit; LISTED: the
    file listing of the commit a download keeps (trees/<commit>.json). The snapshot folder."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    every = sorted(p.name for p in source.iterdir())
    commit = git_hash("\n".join(every).encode())  # 40 hex digits, as a commit hash is
    etags = {}
    for name in every:
        data = (source / name).read_bytes()
        lfs = name.endswith(".safetensors")
        etags[name] = (hashlib.sha256(data).hexdigest() if lfs else git_hash(data), len(data))
        if names is not None and name not in names:
            continue
        blob = storage / "blobs" / etags[name][0]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = _get_pointer_path(str(storage), commit, name)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_symlink(str(blob), pointer, new_blob=True)
    for ref in ("main", TAG):
        _cache_commit_hash_for_specific_revision(str(storage), ref, commit)
    if listed is not None:
        entries = {
            n: TreeCacheEntry(size=etags[n][1], blob_id=etags[n][0].ljust(40, "0")[:40])
            for n in listed
        }
        write_tree_cache(str(storage), commit, entries)
    return storage / "snapshots" / commit


def tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "ckpt"
    write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float16)
    tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "sharded"
    return write_random_checkpoint(folder, get_preset("qwen3-tiny"), torch.float16, shards=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    """A cache holding REPO complete (main and TAG)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    lay_out(cache, REPO, ckpt)
    return cache


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, cache: Path, tmp_path: Path) -> list:
    """The cache in the environment, HF_HUB_OFFLINE=1, and no socket can connect: every
    attempt is recorded, and a test ends with none unless it expects some (and clears them)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(errno.ENETUNREACH, "network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], "a network connection was attempted"


def resolved_line(err: str, spec: str, folder: Path) -> None:
    assert f"resolved {spec} to {folder}" in err.splitlines(), err


# ---------------------------------------------------------------------------------------------
# Ids, resolution and the library API


def test_what_is_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ckpt: Path) -> None:
    for spec in (REPO, f"{REPO}@main", f"{REPO}@{TAG}", f"{REPO}@{'a' * 40}", "o/n@refs/pr/1"):
        assert is_hub_id(spec), spec
    for spec in ("Tiny", "preset:qwen3-tiny", "a/b/c", "../x", "/abs/x", "org/", "/name"):
        assert not is_hub_id(spec), spec
    for spec in ("org//x", "org/name@", "org/na me", "org/x@a..b", "org/x@../y", "org/x--y"):
        assert not is_hub_id(spec), spec
    # a local folder of that name wins, through the library and the command line
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ckpt, tmp_path / REPO)
    assert not is_hub_id(REPO) and resolve_model(REPO) == REPO
    code, out, err = cli("inspect", REPO, "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["_source"] == REPO and "resolved" not in err


def test_resolve_offline_and_the_library_takes_ids(cache: Path, ckpt: Path) -> None:
    storage = cache / "models--Qwen--Tiny"
    commit = (storage / "refs" / "main").read_text()
    snap = storage / "snapshots" / commit
    # huggingface_hub read its cache folder when imported; anefx reads the environment now
    assert constants.HF_HUB_CACHE != str(cache) and hub_cache_dir() == cache
    for rev in ("", "@main", f"@{TAG}", f"@{commit}"):
        assert resolve_model(REPO + rev) == str(snap)
    assert resolve_model(str(ckpt)) == str(ckpt)
    assert resolve_model("preset:qwen3-tiny") == "preset:qwen3-tiny"
    assert resolve_model(str(ckpt / "missing")) == str(ckpt / "missing")  # a path, refused later

    plan = preflight(f"{REPO}@{TAG}")
    assert plan.source == str(snap) and plan.root == storage.resolve()
    assert set(plan.protected) == {snap.resolve(), storage.resolve()}  # convert never writes there
    assert inspect_model(REPO)["_source"] == str(snap)
    loaded = load_model(REPO, meta=True)
    assert loaded.source == str(snap) and not loaded.random_weights

    info = scan_cache_dir(cache)  # the layout is the library's: read without a warning
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.nb_files == len(list(ckpt.iterdir()))
    assert [sorted(r.refs) for r in repo.revisions] == [["main", TAG]]


def test_no_network_whatever_the_environment(
    monkeypatch: pytest.MonkeyPatch, offline: list
) -> None:
    # neither HF_HUB_OFFLINE in the environment nor huggingface_hub's switch: local_files_only
    # alone keeps an uncached id off the network
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(AnefxInputError, match="--download"):
        resolve_model("Qwen/Uncached")
    # offline first: a cached id needs no network, even when a download is allowed
    snap = resolve_model(REPO)
    assert resolve_model(REPO, download=True) == snap and Path(snap).parent.name == "snapshots"
    assert offline == []
    # --download is what lets it try (and here fail, in one line)
    code, _, err = cli("inspect", "Qwen/Uncached", "--download")
    assert code == 2
    one_line(err, "Qwen/Uncached", "fetching it from the hub failed")
    assert offline, "--download did not try the network"
    offline.clear()


# ---------------------------------------------------------------------------------------------
# Every command that takes a MODEL takes an id


def test_commands_accept_hub_ids(cache: Path, tmp_path: Path) -> None:
    storage = cache / "models--Qwen--Tiny"
    snap = storage / "snapshots" / (storage / "refs" / "main").read_text()
    tagged = f"{REPO}@{TAG}"
    before = snapshot(cache)

    code, out, err = cli("inspect", tagged, "--json")
    assert code == 0, err
    resolved_line(err, tagged, snap)
    assert json.loads(out.splitlines()[-1])["_source"] == str(snap)

    code, out, err = cli("check", REPO, "--seq", "8", "--json")
    assert code == 0, err
    resolved_line(err, REPO, snap)
    assert json.loads(out)["errors"] == 0

    parts = tmp_path / "parts"
    code, _, err = cli("convert", REPO, "-o", parts, "--context", CONTEXT, "--batch", BATCH)
    assert code == 0, err
    resolved_line(err, REPO, snap)
    manifest = read_manifest(parts)
    assert manifest["model"]["source"] == str(snap.resolve())
    assert manifest["tokenizer_files"] == ["tokenizer.json"]  # found in the snapshot

    package = tmp_path / "tiny.mlpackage"
    code, _, err = cli("convert", tagged, "-o", package, "--seq", "8")
    assert code == 0, err
    resolved_line(err, tagged, snap)
    assert (package / "Manifest.json").is_file()

    run = ("--max-new-tokens", "3", "--context", CONTEXT, "--batch", BATCH)
    code, out, err = cli("generate", REPO, "--ids", "5,6,7", *run)
    assert code == 0, err
    resolved_line(err, REPO, snap)
    assert len(out.splitlines()[-1].split()) == 3  # the ids, after their text
    code, out, err = cli("generate", tagged, "--prompt", "w5 w6 w7", *run)
    assert code == 0, err  # the tokenizer.json of the snapshot
    resolved_line(err, tagged, snap)
    assert out.split() and all(w.startswith("w") for w in out.replace("w", " w").split())

    # a converted artifact is a path, left as it is
    code, out, err = cli("generate", parts, "--ids", "5,6,7", "--max-new-tokens", "2")
    assert code == 0, err
    assert "resolved" not in err

    code, out, err = cli("verify", parts, tagged, "--ids", "5,6,7", "--steps", "2", "--json")
    assert code == 0, err
    resolved_line(err, tagged, snap)
    assert json.loads(out.splitlines()[-1])["model"] == str(snap)

    assert snapshot(cache) == before


# ---------------------------------------------------------------------------------------------
# Ids that do not resolve: exit 2, one line


@pytest.mark.parametrize(
    "argv",
    [
        ("inspect",),
        ("check", "--meta"),
        ("diff",),
        ("convert", "-o", "{out}"),
        ("generate", "--ids", "1,2"),
        ("verify", "{out}"),
    ],
    ids=lambda a: a[0],
)
def test_uncached_ids_fail_in_one_line(argv: tuple, cache: Path, tmp_path: Path) -> None:
    before = snapshot(cache)
    out = tmp_path / "out"
    command, *rest = (str(a).format(out=out) for a in argv)
    for spec, revision in (("Qwen/Uncached", "revision main"), (f"{REPO}@v9", f"{REPO}@v9")):
        # verify takes the artifact first, then the model
        args = [command, out, spec] if command == "verify" else [command, spec, *rest]
        code, _, err = cli(*args)
        assert code == 2, err
        one_line(err, spec, revision, f"not in the Hugging Face cache {cache}", "--download")
    assert not out.exists() and snapshot(cache) == before


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("a/b/c", "exactly one '/'"),
        ("../x", "'../x'"),
        ("org//x", "exactly one '/'"),
        ("org/", "must both be non-empty"),
        ("org/x@", "nothing after '@'"),
        ("org/x@a..b", "not a branch, tag or commit name"),
    ],
)
def test_malformed_ids_fail_in_one_line(spec: str, why: str, tmp_path: Path) -> None:
    for argv in (("inspect", spec), ("convert", spec, "-o", tmp_path / "out")):
        code, _, err = cli(*argv)
        assert code == 2, err
        one_line(err, f"{spec}: no such local path, and not a hub id", why)
    assert not (tmp_path / "out").exists()


def test_partly_cached_snapshots(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ckpt: Path,
    sharded: Path,
    offline: list,
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    shard2 = "model-00002-of-00002.safetensors"
    # a shard the index names was never fetched
    lay_out(cache, "Qwen/Sharded", sharded, [n for n in os.listdir(sharded) if n != shard2])
    # only config.json: what transformers' AutoConfig leaves behind
    lay_out(cache, "Qwen/ConfigOnly", ckpt, ["config.json"])
    # the file listing huggingface_hub kept names tokenizer.json, which is missing
    lay_out(
        cache, "Qwen/Listed", ckpt, ["config.json", "model.safetensors"], sorted(os.listdir(ckpt))
    )
    # a blob deleted under its link
    snap = lay_out(cache, "Qwen/NoBlob", ckpt)
    os.unlink(os.path.realpath(snap / "model.safetensors"))
    before = snapshot(cache)
    assert scan_cache_dir(cache).repos  # still a cache the library reads

    for repo, missing in (
        ("Qwen/Sharded", shard2),
        ("Qwen/ConfigOnly", "the weights (*.safetensors)"),
        ("Qwen/Listed", "tokenizer.json"),
        ("Qwen/NoBlob", "model.safetensors"),
    ):
        for argv in (("inspect", repo), ("convert", repo, "-o", tmp_path / "out")):
            code, _, err = cli(*argv)
            assert code == 2, err
            one_line(err, f"{repo} (revision main)", "incomplete", missing, str(cache))
            assert "--download" in err
    assert not (tmp_path / "out").exists()

    # with --download and no network: the same snapshot, and why it stays incomplete
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code, _, err = cli("inspect", f"Qwen/Sharded@{TAG}", "--download")
    assert code == 2
    one_line(err, f"Qwen/Sharded@{TAG}", shard2, "the hub could not be reached")
    assert offline, "--download did not try the network"
    offline.clear()
    assert snapshot(cache) == before
