"""The files of a checkpoint folder: locating them, confining them to the folder, validating them.

Every file anefx opens in a checkpoint goes through `confined`: a plain relative name that
resolves to a regular file inside the folder (or, for a Hugging Face cache snapshot, inside its
repository, where the snapshot's symlinks point). Every safetensors file is validated by the
safetensors library itself before anything else reads it; only the absolute data offsets, which
the library does not expose, are parsed here, from a header it has already accepted.
Nothing here writes: a malformed or hostile file ends in one AnefxInputError naming it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import safe_open

from anefx.errors import AnefxInputError
from anefx.models.limits import MAX_JSON_BYTES, MAX_TENSORS

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype tag -> bytes per element (of the whole-byte types a checkpoint may hold)
ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where it lies and what the header says about it."""

    file: Path  # the file as the checkpoint names it (for messages)
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0  # bytes of the data as stored
    real: Path | None = field(default=None, compare=False)  # the resolved file, opened to read
    # its name in the file, when the model knows it by another (a nested layout's text tensor,
    # `model.language_model.*` as `model.*`); None: the same name
    stored: str | None = field(default=None, compare=False)

    @property
    def path(self) -> Path:
        """The file to open: the resolved one, so a symlink swapped after the check is not
        followed again."""
        return self.real or self.file

    def name_in_file(self, name: str) -> str:
        """The name to read this tensor by, NAME being the model's name for it."""
        return self.stored or name


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def input_error(message: str) -> AnefxInputError:
    """An AnefxInputError with MESSAGE on one line (the CLI prints it as is)."""
    return AnefxInputError(one_line(message))


def _exists(path: Path) -> bool:
    """Whether PATH is there at all: a dangling symlink counts (it must be refused, not
    skipped as absent)."""
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _listing(folder: Path, pattern: str) -> list[Path]:
    try:
        return sorted(folder.glob(pattern))
    except OSError as exc:
        raise input_error(f"{folder}: cannot list the folder ({exc.strerror})") from None


def check_folder(folder: Path) -> None:
    """Raise AnefxInputError unless `folder` is a folder with config.json or safetensors."""
    if "\0" in str(folder):
        raise input_error(f"{folder!r}: a path cannot contain a NUL byte")
    if not _exists(folder):
        raise input_error(f"{folder}: checkpoint folder does not exist")
    if not folder.is_dir():
        raise input_error(f"{folder}: not a folder; expected a checkpoint folder")
    if not _exists(folder / CONFIG_NAME) and not _listing(folder, "*.safetensors"):
        raise input_error(
            f"{folder}: config.json and *.safetensors files missing from checkpoint folder"
        )


def confinement_root(folder: Path) -> Path:
    """The folder a checkpoint's files must resolve into: the folder itself, or for a Hugging
    Face cache snapshot (`<repo>/snapshots/<revision>/`, or a folder inside one, with
    `<repo>/blobs` and `<repo>/refs`, as huggingface_hub lays it out) the repository, whose
    blobs the snapshot's symlinks name."""
    real = Path(os.path.realpath(folder))
    for revision in (real, *real.parents):
        repo = revision.parent.parent
        if revision.parent.name == "snapshots":
            if (repo / "blobs").is_dir() and (repo / "refs").is_dir():
                return repo
    return real


def confined(folder: Path, name: object, what: str, root: Path | None = None) -> Path:
    """The resolved path of checkpoint file NAME in FOLDER, or AnefxInputError "WHAT: why".

    NAME must be a plain relative path (no NUL, not absolute, no '..') naming a regular file
    that, every symlink followed, lies inside ROOT (default `confinement_root(folder)`). The
    lexical checks come first, so a hostile name is refused without touching its target.
    WHAT names the file for the message (its path, or the index entry naming it).
    """

    def refuse(why: str) -> AnefxInputError:
        return input_error(f"{what}: {why}")

    if not isinstance(name, str) or not name:
        raise refuse("is not a file name")
    if "\0" in name:
        raise refuse("contains a NUL byte")
    if os.path.isabs(name) or name.startswith("\\"):
        raise refuse("is an absolute path; a checkpoint names its files relative to its folder")
    if ".." in PurePosixPath(name).parts or ".." in name.split("\\"):
        raise refuse("has a '..' component, which leaves the checkpoint folder")
    path = folder / name
    if not _exists(path):
        raise refuse("is missing")
    try:
        real = Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse("is a symlink loop") from None
        if exc.errno == errno.ENOENT:
            raise refuse(
                f"is a dangling symlink (to {_readlink(path)}, which does not exist)"
            ) from None
        raise refuse(f"cannot be resolved ({exc.strerror})") from None
    root = root or confinement_root(folder)
    if not real.is_relative_to(root):
        raise refuse(
            f"resolves to {real}, outside the checkpoint folder {root}; anefx reads only files "
            "inside it"
        )
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise refuse("is a folder, not a file")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise refuse("is not a regular file (a FIFO, socket or device)")
    return real


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def read_json(path: Path, shown: Path | None = None) -> Any:
    """Parse JSON file PATH (a confined, regular file); errors name SHOWN (default PATH)."""
    shown = shown or path
    try:
        size = os.stat(path).st_size
        if size > MAX_JSON_BYTES:
            raise input_error(
                f"{shown}: {size} bytes, above the bound of {MAX_JSON_BYTES} for a JSON file "
                "(anefx.models.limits.MAX_JSON_BYTES)"
            )
        with open(path, "rb") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise input_error(f"{shown}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise input_error(f"{shown}: not valid UTF-8 text ({exc.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise input_error(
            f"{shown}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise input_error(f"{shown}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise input_error(f"{shown}: invalid JSON: {exc}") from None


def read_safetensors_header(path: Path, shown: Path | None = None) -> dict[str, TensorEntry]:
    """The tensors of safetensors file PATH (confined), validated by the safetensors library.

    The library checks the header length, the JSON (UTF-8, nesting), the dtypes, that each
    tensor's bytes match its shape and that the offsets tile the data exactly (no overlap, no
    gap, nothing past the end). It does not expose the offsets, so the header it accepted is
    parsed here for them, and the two readings are compared. Errors name SHOWN (default PATH).
    """
    shown = shown or path

    def corrupt(detail: str) -> AnefxInputError:
        return input_error(f"{shown}: truncated or corrupt safetensors file ({detail})")

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            names = fh.keys()
            if len(names) > MAX_TENSORS:
                raise input_error(
                    f"{shown}: {len(names)} tensors, above the bound of {MAX_TENSORS} "
                    "(anefx.models.limits.MAX_TENSORS)"
                )
            library = {}
            for n in names:
                piece = fh.get_slice(n)
                library[n] = (piece.get_dtype(), tuple(piece.get_shape()))
    except AnefxInputError:
        raise
    except OSError as exc:
        raise input_error(f"{shown}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # SafetensorError, or whatever else the library raises on bad bytes
        raise corrupt(f"the safetensors library: {exc}") from None

    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            raw = fh.read(header_len)
        header = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise input_error(f"{shown}: cannot read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # the library accepted it: should not happen
        raise corrupt(f"header: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")

    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            offset = 8 + header_len + begin
            entry = TensorEntry(
                shown, info["dtype"], tuple(info["shape"]), offset, end - begin, path
            )
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"malformed header entry for tensor '{name}'") from None
        if library.get(name) != (entry.dtype, entry.shape):
            raise corrupt(f"tensor '{name}' reads differently from the safetensors library")
        entries[name] = entry
    if len(entries) != len(library):
        raise corrupt("the header lists other tensors than the safetensors library reads")
    return entries


def find_index(folder: Path) -> str | None:
    """The name of the checkpoint's shard index, if it has one."""
    if _exists(folder / INDEX_NAME):
        return INDEX_NAME
    candidates = _listing(folder, "*.safetensors.index.json")
    return candidates[0].name if candidates else None


def _add(located: dict[str, TensorEntry], entries: dict[str, TensorEntry], folder: Path) -> None:
    if len(located) + len(entries) > MAX_TENSORS:
        raise input_error(
            f"{folder}: more than {MAX_TENSORS} tensors (anefx.models.limits.MAX_TENSORS)"
        )
    for name, entry in entries.items():
        if name in located:
            warnings.warn(
                f"{entry.file}: tensor '{name}' also in {located[name].file.name}; using the "
                "latter",
                stacklevel=4,
            )
            continue
        located[name] = entry


def locate_tensors(folder: Path, root: Path | None = None) -> dict[str, TensorEntry]:
    """Map every tensor name to its shard: from the index if there is one, else from the
    headers of every `*.safetensors` file. Each file is confined to ROOT (default
    `confinement_root(folder)`) and validated; tensor data is not read."""
    root = root or confinement_root(folder)
    index_name = find_index(folder)
    if index_name is not None:
        index_path = folder / index_name
        index = read_json(confined(folder, index_name, str(index_path), root), index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise input_error(f"{index_path}: field 'weight_map' missing or not a name->file map")
        if len(weight_map) > MAX_TENSORS:
            raise input_error(
                f"{index_path}: {len(weight_map)} tensors, above the bound of {MAX_TENSORS} "
                "(anefx.models.limits.MAX_TENSORS)"
            )
        headers: dict[str, dict[str, TensorEntry]] = {}
        count = 0
        for tensor, shard in weight_map.items():
            if shard in headers:
                continue
            what = f"{index_path}: shard {shard!r} (of tensor {tensor!r})"
            real = confined(folder, shard, what, root)
            headers[shard] = read_safetensors_header(real, folder / shard)
            count += len(headers[shard])
            if count > MAX_TENSORS:
                raise input_error(
                    f"{folder}: more than {MAX_TENSORS} tensors in its shards "
                    "(anefx.models.limits.MAX_TENSORS)"
                )
        located = {}
        for name, shard in weight_map.items():
            entry = headers[shard].get(name)
            if entry is None:
                raise input_error(
                    f"{folder / shard}: tensor '{name}' listed in {index_name} is not in this file"
                )
            located[name] = entry
        return located

    files = _listing(folder, "*.safetensors")
    if not files:
        raise input_error(f"{folder}: no *.safetensors files in checkpoint folder")
    located: dict[str, TensorEntry] = {}
    for path in files:
        real = confined(folder, path.name, str(path), root)
        _add(located, read_safetensors_header(real, path), folder)
    return located
