"""Hugging Face hub ids as MODEL: `Qwen/Qwen3-0.6B` or `Qwen/Qwen3-0.6B@REVISION` becomes the
folder of its snapshot in the local Hugging Face cache.

The cache is huggingface_hub's (`<cache>/models--ORG--NAME/{blobs,refs,snapshots}`), found and
read by huggingface_hub itself (`snapshot_download`), offline unless the caller allows a
download: anefx never reaches the network on its own. Only the files anefx reads are asked for
(`HUB_FILES`), and a snapshot missing one of them (a weight shard, a file its download listing
names) is refused here, naming the file, not left to fail later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from anefx.errors import AnefxInputError
from anefx.models.checkpoint_files import (
    INDEX_NAME,
    confined,
    confinement_root,
    one_line,
    read_json,
)

__all__ = ["HUB_FILES", "hub_cache_dir", "is_hub_id", "resolve_model"]

# The files of a repository anefx reads: config, weights and index, tokenizer and generation
# settings. Only these are looked for (and, with download=True, fetched).
HUB_FILES = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# fnmatch's "*" crosses "/": without this, "*.safetensors" would also fetch a repository's
# sub-folders (onnx/, original/ ...), which anefx never reads
_TOP_LEVEL_ONLY = ("*/*",)
# a branch, a tag, refs/pr/N or a commit hash (git allows more characters in a name); no "..",
# so a revision cannot name a file outside the repository's refs/ folder
_REVISION = re.compile(r"[A-Za-z0-9_][\w.\-]*(?:/[\w.\-]+)*")
_SHARD = re.compile(r"(?P<stem>.+)-(?P<k>\d+)-of-(?P<n>\d+)\.safetensors")
_MAX_SHARDS = 10_000  # of a "-K-of-N" name: N is read from a file name, bounded
_PRESET_PREFIX = "preset:"  # models.load.PRESET_PREFIX (not imported: that module needs torch)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment now: HF_HUB_CACHE, else
    HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub.

    huggingface_hub reads these once, when it is imported (`constants.HF_HUB_CACHE`); reading
    them on every call, with its precedence, follows a caller (or a test) that sets them later.
    """
    home = os.getenv(
        "HF_HOME",
        os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"),
    )
    home = os.path.expandvars(os.path.expanduser(home))
    cache = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _is_local(text: str) -> bool:
    """A preset or a path that exists (a dangling link too: it is the user's path, refused as
    such by the checkpoint checks)."""
    return text.startswith(_PRESET_PREFIX) or os.path.lexists(text)


def _split(text: str) -> tuple[str, str | None]:
    """ORG/NAME and the revision after '@' (None without '@'); a repository id holds no '@'."""
    repo_id, at, revision = text.partition("@")
    return repo_id, (revision if at else None)


def _id_problem(text: str) -> str | None:
    """Why TEXT is not of the form ORG/NAME[@REVISION], or None when it is."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, revision = _split(text)
    parts = repo_id.split("/")
    if len(parts) != 2:
        return f"a hub id has exactly one '/' (ORG/NAME), this one has {len(parts) - 1}"
    if not all(parts):
        return "ORG and NAME must both be non-empty"
    try:
        validate_repo_id(repo_id)  # the hub's own rules for the characters of ORG and NAME
    except HFValidationError as exc:
        return one_line(exc)
    if revision is not None:
        if not revision:
            return "nothing after '@' (give a branch, a tag or a commit hash)"
        if len(revision) > 255 or ".." in revision or not _REVISION.fullmatch(revision):
            return f"'{revision}' is not a branch, tag or commit name"
    return None


def is_hub_id(spec: str | os.PathLike[str]) -> bool:
    """Whether SPEC names a model on the Hugging Face hub: `ORG/NAME` or `ORG/NAME@REVISION`
    (a branch, a tag or a commit hash). `NAME` alone is not one.

    A local path wins: when SPEC names something that exists here (a folder `Qwen/Qwen3-0.6B`
    in the current directory, say), it is that path, not a hub id; so is `preset:NAME`."""
    text = os.fspath(spec)
    return not _is_local(text) and _id_problem(text) is None


def _meant_as_id(text: str) -> bool:
    """A spec that is no local path but has the shape of an id ('@', or a relative path with a
    '/'): refused as a malformed id, naming what is wrong, rather than as a missing folder."""
    if "\0" in text or os.path.isabs(text) or text.startswith("~"):
        return False
    return "/" in text or "@" in text


def resolve_model(spec: str | os.PathLike[str], download: bool = False) -> str:
    """SPEC as anefx loads it: a preset or a path unchanged, a hub id (`is_hub_id`) its snapshot
    folder in the local Hugging Face cache (`hub_cache_dir()`).

    The snapshot is looked up by huggingface_hub offline (`local_files_only=True`), restricted
    to `HUB_FILES`; a branch or tag is resolved through the cache's refs. Only when it is not
    there, or misses a file anefx reads, and DOWNLOAD allows it, are those files fetched from
    the hub. Raise AnefxInputError (one line naming the id, the revision and the cache) for a
    malformed id, an uncached or incomplete snapshot, or a failed download.
    """
    text = os.fspath(spec)
    if _is_local(text):
        return text
    problem = _id_problem(text)
    if problem is not None:
        if _meant_as_id(text):
            raise AnefxInputError(
                f"{text}: no such local path, and not a hub id ORG/NAME or ORG/NAME@REVISION: "
                f"{problem}"
            )
        return text  # a path that does not exist: the checkpoint checks say so

    from huggingface_hub.constants import DEFAULT_REVISION

    repo_id, revision = _split(text)
    revision = revision or DEFAULT_REVISION
    cache = hub_cache_dir()
    where = text if "@" in text else f"{text} (revision {revision})"  # the id, as given
    folder, missing = _cached_snapshot(repo_id, revision, cache, where)
    if folder is not None and not missing:
        return folder
    if not download:
        if folder is None:
            raise AnefxInputError(
                f"{where}: no such local path, and not in the Hugging Face cache {cache}; "
                "anefx uses no network unless allowed: --download fetches it from the hub"
            )
        raise AnefxInputError(
            f"{where}: the cached snapshot {folder} is incomplete: {_names(missing)} missing "
            f"(cache {cache}); --download fetches the rest from the hub"
        )
    folder = _download(repo_id, revision, cache, where)
    missing = _missing(repo_id, Path(folder), cache)
    if missing:
        # snapshot_download falls back to the cache, silently, when the hub cannot be reached;
        # a file listing of the commit is what it keeps when the hub answered
        if _listing(repo_id, Path(folder), cache) is None:
            from huggingface_hub.constants import is_offline_mode

            offline = " (HF_HUB_OFFLINE is set)" if is_offline_mode() else ""
            raise AnefxInputError(
                f"{where}: the cached snapshot {folder} is incomplete: {_names(missing)} "
                f"missing, and the hub could not be reached{offline} to fetch it (cache {cache})"
            )
        raise AnefxInputError(
            f"{where}: {_names(missing)} missing from {folder} after the download: the "
            "repository does not hold a complete checkpoint"
        )
    return folder


def _names(missing: list[str]) -> str:
    shown = ", ".join(missing[:3])
    return shown + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")


def _cached_snapshot(
    repo_id: str, revision: str, cache: Path, where: str
) -> tuple[str | None, list[str]]:
    """The cached snapshot folder of REPO_ID at REVISION (None if not cached) and the files anefx
    reads that it misses. No network: local_files_only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=list(HUB_FILES),
            ignore_patterns=list(_TOP_LEVEL_ONLY),
        )
    except IncompleteSnapshotError as exc:  # its cached file listing names a missing file
        folder = exc.snapshot_path
    except LocalEntryNotFoundError:
        return None, []
    except OSError as exc:  # e.g. an unreadable refs file
        raise AnefxInputError(
            f"{where}: cannot read the Hugging Face cache {cache}: {exc.strerror or exc}"
        ) from None
    _check_inside(folder, repo_id, cache, where)
    return folder, _missing(repo_id, Path(folder), cache)


def _check_inside(folder: str, repo_id: str, cache: Path, where: str) -> None:
    """FOLDER is `<cache>/models--ORG--NAME/snapshots/<commit hash>`: a refs file holding
    anything else (a path, say) must not send anefx elsewhere."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    snapshots = cache.resolve() / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    path = Path(folder)
    if path.parent != snapshots or not REGEX_COMMIT_HASH.fullmatch(path.name):
        raise AnefxInputError(
            f"{where}: the cache's refs name {path.name!r}, not a commit hash in {snapshots}"
        )


def _listing(repo_id: str, folder: Path, cache: Path) -> list[str] | None:
    """The files of snapshot FOLDER's commit as huggingface_hub listed them when it downloaded
    it (kept in the cache), or None when it kept no listing."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [
            f.path for f in get_cached_repo_tree(repo_id, revision=folder.name, cache_dir=cache)
        ]
    except CachedRepoTreeNotFoundError:
        return None


def _missing(repo_id: str, folder: Path, cache: Path) -> list[str]:
    """The files anefx reads that snapshot FOLDER lacks, or whose blob is gone: those the cached
    file listing of its commit names, when huggingface_hub kept one, and in any case the
    weights: every shard the index names, every `-K-of-N` sibling of a shard, at least one
    `*.safetensors`."""
    from huggingface_hub.utils import filter_repo_objects

    def wanted(names: list[str]) -> list[str]:
        return list(
            filter_repo_objects(
                names, allow_patterns=list(HUB_FILES), ignore_patterns=list(_TOP_LEVEL_ONLY)
            )
        )

    folder = Path(folder)
    listed = wanted(_listing(repo_id, folder, cache) or [])  # none: an older huggingface_hub's
    present = wanted(sorted(p.name for p in folder.iterdir()))
    expected = dict.fromkeys([*listed, *present])  # a dangling link among them: blob gone
    if (folder / INDEX_NAME).exists():  # dangling: listed as missing below
        real = confined(folder, INDEX_NAME, str(folder / INDEX_NAME), confinement_root(folder))
        index = read_json(real, folder / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if isinstance(weight_map, dict):
            # a name that is no plain file name is refused by the checkpoint checks, later
            shards = {s for s in weight_map.values() if isinstance(s, str) and "/" not in s}
            expected.update(dict.fromkeys(sorted(shards)))
    else:
        for name in present:
            m = _SHARD.fullmatch(name)
            if m:  # model-00001-of-00004.safetensors: the other three belong with it
                width, n = len(m["k"]), min(int(m["n"]), _MAX_SHARDS)
                expected.update(
                    (f"{m['stem']}-{k:0{width}d}-of-{m['n']}.safetensors", None)
                    for k in range(1, n + 1)
                )
    missing = [name for name in expected if not (folder / name).exists()]
    if not any(name.endswith(".safetensors") for name in expected):
        missing.append("the weights (*.safetensors)")  # e.g. only config.json was fetched
    return missing


def _download(repo_id: str, revision: str, cache: Path, where: str) -> str:
    """Fetch the files anefx reads of REPO_ID at REVISION into the cache; its snapshot folder."""
    import httpx2
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=list(HUB_FILES),
            ignore_patterns=list(_TOP_LEVEL_ONLY),
        )
    except (httpx2.HTTPError, OSError, ValueError) as exc:
        # the hub's answer (no such repository or revision, gated, offline, no network) or
        # the disk's; huggingface_hub's messages run over several lines
        why = one_line(str(exc).split("\n", 1)[0]) or type(exc).__name__
        raise AnefxInputError(
            f"{where}: not in the Hugging Face cache {cache}, and fetching it from the hub "
            f"failed: {why[:300]}"
        ) from None
    _check_inside(folder, repo_id, cache, where)
    return folder
