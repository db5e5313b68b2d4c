"""Reading a converted artifact: confined, verified, bounded, and never written to.

``anefx verify`` and ``anefx generate`` read what ``anefx convert`` wrote (see
:mod:`anefx.targets.artifact`), and anything else a user may point them at. Everything read here
is treated as hostile until checked:

* **confined**: every path an artifact names (a package item, a part file, a weight file) must
  stay inside the artifact: no absolute path, no ``..``, no symbolic link (anefx writes none);
* **verified**: a package's files are checked against the sha256 its anefx report lists, and a
  parts folder's parts against the sha256 ``manifest.json`` lists, before anything runs; what the
  manifest says about a part (functions, inputs, outputs, states) must be what the part's own
  program declares;
* **bounded**: JSON and spec files have a size bound, shapes are checked against
  :mod:`anefx.models.limits` before anything is allocated, every field is type-checked.

Any failure is an :class:`~anefx.errors.AnefxInputError` naming the file and the field. Nothing
here opens a package through coremltools' ``MLModel`` / ``ModelPackage``, which rewrites the
package's ``Manifest.json`` when it opens it: the spec is parsed with protobuf directly.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from anefx.core.signature import (
    CARRIED_KINDS,
    CARRIED_SUFFIX,
    PACKED_AXIS,
    STATE_KINDS,
    Role,
    Signature,
)
from anefx.errors import AnefxInputError
from anefx.models import limits
from anefx.targets import artifact
from anefx.targets.artifact import (
    MANIFEST,
    PACKAGE_MANIFEST,
    PACKAGE_SUFFIX,
    PARTS_FORMAT,
    PROGRESS,
    REPORT_ITEM,
)

__all__ = [
    "MODEL_INPUTS",
    "PackageLayout",
    "artifact_kind",
    "check_package",
    "check_parts",
    "package_layout",
    "parse_spec",
    "read_bounded",
    "read_json",
    "read_manifest",
    "read_package",
    "read_spec",
    "read_tokenizer_files",
    "validate_manifest",
]

# A package's Manifest.json lists two or three items (a few hundred bytes).
MAX_PACKAGE_MANIFEST_BYTES = 1 << 20
# model.mlmodel holds the program, not the weights (those are in weight.bin): Qwen3-tiny's two
# functions take 0.26 MB, about 65 kB per layer and function; protobuf cannot parse 2 GiB anyway.
MAX_SPEC_BYTES = 1 << 30
# manifest.json holds every part's checker reports too (the same bound as artifact.identify).
MAX_MANIFEST_BYTES = 64 << 20
# an embedding, the decoder chunks (at most one per layer) and the head slices
MAX_PARTS = 4 * limits.MAX_LAYERS
MAX_FUNCTIONS = 16
MAX_RANK = 5
# no single input or output may hold more than every state together
MAX_TENSOR_BYTES = limits.MAX_STATE_BYTES
MODEL_INPUTS = ("input_ids", "position_ids", "causal_mask")
# a tokenizer file an artifact carries (Qwen's tokenizer.json is 11 MB)
MAX_TOKENIZER_BYTES = 256 << 20
MAX_TOKENIZER_FILES = 64
# where a single package keeps them: beside its anefx report
TOKENIZER_DIR = str(PurePosixPath(REPORT_ITEM).parent)
DTYPE_BYTES = {"float16": 2, "int32": 4}
_SPEC_AUTHOR = "com.apple.CoreML"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value: object) -> str:
    """VALUE as JSON, cut short: what a message quotes of a bad field."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


# ---------------------------------------------------------------------------------------------
# Files: read through no link, with a size bound


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file PATH (never through a link at PATH), at most LIMIT."""
    # O_NONBLOCK: a FIFO planted under a file's name must not hang the reader
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise AnefxInputError(f"{path}: missing (the {what})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AnefxInputError(
                f"{path}: a symbolic link; anefx writes none and reads none inside an artifact"
            ) from None
        raise AnefxInputError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AnefxInputError(f"{path}: not a file (the {what})")
        if st.st_size > limit:
            raise AnefxInputError(
                f"{path}: {st.st_size} bytes, more than the {limit} bytes a {what} may hold"
            )
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise AnefxInputError(f"{path}: more than the {limit} bytes a {what} may hold")
    return data


def read_json(path: Path, limit: int, what: str) -> object:
    """The JSON document in PATH (at most LIMIT bytes); one clear error for any damage."""
    data = read_bounded(path, limit, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise AnefxInputError(f"{path}: not UTF-8 text (the {what})") from None
    except json.JSONDecodeError as exc:
        raise AnefxInputError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise AnefxInputError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise AnefxInputError(f"{path}: invalid JSON ({exc})") from None


def _inside(root: Path, rel: object, what: str, where: Path) -> Path:
    """ROOT / REL, refusing a REL that could lead out of ROOT: not a relative path, with a
    ``..``, or through a symbolic link."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise AnefxInputError(f"{where}: {what} {_show(rel)} is not a path")
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or ".." in parts:
        raise AnefxInputError(f"{where}: {what} {rel!r} leads outside {root}")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise AnefxInputError(
                f"{where}: {what} {rel!r}: {path} is a symbolic link (to {os.readlink(path)}); "
                "anefx writes none and reads none inside an artifact"
            )
    return path


def _files(root: Path) -> list[str]:
    """The relative paths of the files under ROOT; refuse a link or anything but files and
    folders (anefx writes nothing else)."""
    found = []

    def fail(exc: OSError) -> None:
        raise AnefxInputError(f"{exc.filename}: cannot read ({exc.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise AnefxInputError(
                    f"{path}: a symbolic link (to {os.readlink(path)}); anefx writes none and "
                    "reads none inside an artifact"
                )
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise AnefxInputError(f"{path}: not a file nor a folder; anefx wrote no such thing")
            if stat.S_ISREG(mode):
                found.append(str(path.relative_to(root)))
    return sorted(found)


def _digest(fn, path: Path) -> str:
    try:
        return fn(path)
    except OSError as exc:
        raise AnefxInputError(f"{exc.filename or path}: cannot read ({exc.strerror})") from None


# ---------------------------------------------------------------------------------------------
# A Core ML package: its Manifest.json, its program spec, its weights folder


@dataclass(frozen=True)
class PackageLayout:
    """Where a package's program spec and weights are (both checked to be inside it)."""

    path: Path
    spec_file: Path
    weights_dir: Path | None


def package_layout(path: str | Path) -> PackageLayout:
    """Find the root model item and the weights folder of the package at PATH from its
    Manifest.json, confined to the package."""
    path = Path(path)
    if not path.is_dir():
        raise AnefxInputError(f"{path}: no such package (a .mlpackage folder)")
    where = path / PACKAGE_MANIFEST
    if not os.path.lexists(where):
        raise AnefxInputError(f"{path}: not a Core ML package (no {PACKAGE_MANIFEST} in it)")
    doc = read_json(where, MAX_PACKAGE_MANIFEST_BYTES, "package manifest")
    if not isinstance(doc, dict):
        raise AnefxInputError(f"{where}: must be a JSON object, got {_show(doc)}")
    entries = doc.get("itemInfoEntries")
    if not isinstance(entries, dict) or not entries:
        raise AnefxInputError(
            f"{where}: field 'itemInfoEntries' must be a non-empty object, got {_show(entries)}"
        )
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("path", "name", "author")
        ):
            raise AnefxInputError(
                f"{where}: field 'itemInfoEntries.{key}' must be an object with a string path, "
                f"name and author, got {_show(entry)}"
            )
    root = doc.get("rootModelIdentifier")
    if not isinstance(root, str) or root not in entries:
        raise AnefxInputError(
            f"{where}: field 'rootModelIdentifier' {_show(root)} names no item of itemInfoEntries"
        )
    data = path / "Data"  # the items' paths are relative to it
    if data.is_symlink():
        raise AnefxInputError(
            f"{data}: a symbolic link (to {os.readlink(data)}); anefx writes none and reads none "
            "inside an artifact"
        )
    spec_file = _inside(data, entries[root]["path"], "the root model item", where)
    if not spec_file.is_file():
        raise AnefxInputError(
            f"{where}: the root model item {entries[root]['path']!r} is not a file in the package"
        )
    weights_dir = None
    for entry in entries.values():
        if entry["name"] == "weights" and entry["author"] == _SPEC_AUTHOR:
            folder = _inside(data, entry["path"], "the weights item", where)
            weights_dir = folder if folder.is_dir() else None
    return PackageLayout(path, spec_file, weights_dir)


def _model_pb2():
    os.environ.setdefault("TQDM_DISABLE", "1")
    with warnings.catch_warnings():  # coremltools warns about the torch version on import
        warnings.simplefilter("ignore")
        from coremltools.proto import Model_pb2

    return Model_pb2


def parse_spec(spec_file: Path):
    """The Core ML spec protobuf in SPEC_FILE (at most MAX_SPEC_BYTES)."""
    data = read_bounded(spec_file, MAX_SPEC_BYTES, "model spec")
    spec = _model_pb2().Model()
    try:
        spec.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, or a RuntimeError from its C++ parser
        raise AnefxInputError(
            f"{spec_file}: not a readable Core ML model spec (damaged or truncated)"
        ) from None
    if spec.WhichOneof("Type") is None:
        raise AnefxInputError(f"{spec_file}: holds no Core ML model (empty or not a model spec)")
    return spec


def read_package(path: str | Path) -> tuple[object, PackageLayout]:
    """(spec protobuf, layout) of the package at PATH, read without modifying it."""
    layout = package_layout(path)
    return parse_spec(layout.spec_file), layout


def read_spec(path: str | Path):
    """The spec protobuf of the package at PATH, read without modifying it."""
    return read_package(path)[0]


# ---------------------------------------------------------------------------------------------
# What is at a path, and the digests


def _interrupted(path: Path, where: Path) -> AnefxInputError:
    return AnefxInputError(
        f"{path}: an interrupted conversion (no finished artifact yet, its work is in {where}); "
        "run the same anefx convert with --resume to finish it"
    )


def artifact_kind(path: str | Path) -> str:
    """ "parts" or "package": what is at PATH, if it is a finished artifact; an interrupted
    conversion or anything else is refused."""
    path = Path(path)
    staging = artifact.staging_path(path)
    if not path.exists():
        if os.path.lexists(staging):
            raise _interrupted(path, staging)
        raise AnefxInputError(
            f"{path}: no such artifact (a .mlpackage, or a folder with {MANIFEST}, that anefx "
            "convert wrote)"
        )
    if not path.is_dir():
        raise AnefxInputError(f"{path}: a file, not an artifact (a .mlpackage or a folder)")
    if os.path.lexists(path / MANIFEST):
        return "parts"
    if os.path.lexists(path / PROGRESS):  # an older anefx converted in place
        raise _interrupted(path, path)
    if os.path.lexists(path / PACKAGE_MANIFEST) or path.suffix == PACKAGE_SUFFIX:
        return "package"
    raise AnefxInputError(
        f"{path}: not an anefx artifact (no {MANIFEST}, not a Core ML package); give the "
        ".mlpackage or the folder anefx convert wrote"
    )


def check_package(path: str | Path) -> dict:
    """The anefx report of the package at PATH, after checking that the package holds exactly
    the files the report lists, each with its sha256."""
    path = Path(path)
    if not (path / PACKAGE_MANIFEST).is_file():
        raise AnefxInputError(f"{path}: not a Core ML package (no {PACKAGE_MANIFEST} in it)")
    present = [f for f in _files(path) if f != REPORT_ITEM]  # refuses links first
    report = artifact.package_report(path)
    if report is None:
        raise AnefxInputError(
            f"{path}: not written by anefx (no anefx report {REPORT_ITEM} listed in its "
            f"{PACKAGE_MANIFEST}); convert it again with anefx convert"
        )
    listed = report.get("files")
    if not isinstance(listed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in listed.items()
    ):
        raise AnefxInputError(
            f"{path / REPORT_ITEM}: field 'files' must map each file of the package to its "
            f"sha256, got {_show(listed)}"
        )
    for rel in sorted(set(listed) | set(present)):
        if rel not in present:
            raise AnefxInputError(
                f"{path}: {rel} is missing (its anefx report lists it); convert again"
            )
        if rel not in listed:
            raise AnefxInputError(
                f"{path}: {rel} is not listed in its anefx report: anefx did not write it there"
            )
        if _digest(artifact.file_digest, path / rel) != listed[rel]:
            raise AnefxInputError(
                f"{path}: {rel} does not match the sha256 in its anefx report (changed or "
                "damaged after conversion); convert again"
            )
    return report


def check_parts(folder: str | Path, manifest: dict) -> None:
    """Check every part of a validated MANIFEST against the sha256 it records."""
    folder = Path(folder)
    for part in manifest["parts"]:
        path = folder / part["file"]
        files = _files(path)  # refuses links first: the digest would read through them
        if _digest(artifact.tree_digest, path) != part["sha256"]:
            raise AnefxInputError(
                f"{path}: does not match the sha256 {MANIFEST} records for it: one of its files "
                f"({', '.join(files)}) changed or was damaged after conversion; convert again"
            )


# ---------------------------------------------------------------------------------------------
# manifest.json of a parts folder


class _Fields:
    """Type checks of a JSON document's fields, each failure naming the file and the field."""

    def __init__(self, where: Path):
        self.where = where

    def bad(self, field: str, msg: str) -> AnefxInputError:
        return AnefxInputError(f"{self.where}: field '{field}' {msg}")

    def get(self, obj: dict, key: str, field: str) -> object:
        if key not in obj:
            raise self.bad(field, "is missing")
        return obj[key]

    def obj(self, obj: dict, key: str, field: str) -> dict:
        value = self.get(obj, key, field)
        if not isinstance(value, dict):
            raise self.bad(field, f"must be an object, got {_show(value)}")
        return value

    def seq(self, obj: dict, key: str, field: str, most: int, least: int = 0) -> list:
        value = self.get(obj, key, field)
        if not isinstance(value, list):
            raise self.bad(field, f"must be a list, got {_show(value)}")
        if not least <= len(value) <= most:
            raise self.bad(field, f"must hold {least} to {most} entries, got {len(value)}")
        return value

    def text(self, value: object, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.bad(field, f"must be a non-empty string, got {_show(value)}")
        return value

    def integer(self, value: object, field: str, lo: int, hi: int) -> int:
        # bool is an int to Python, not to JSON
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(field, f"must be an integer, got {_show(value)}")
        if not lo <= value <= hi:
            raise self.bad(field, f"must be between {lo} and {hi}, got {value}")
        return value

    def shape(self, value: object, field: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_RANK:
            raise self.bad(field, f"must be a list of 1 to {MAX_RANK} sizes, got {_show(value)}")
        for i, d in enumerate(value):
            if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d < 2**31:
                raise self.bad(
                    field, f"must hold positive integer sizes, got {_show(value)} (entry {i})"
                )
        return tuple(value)

    def tensor(self, value: object, field: str) -> tuple[str, tuple[int, ...], str]:
        """(name, shape, dtype) of an input, output or state description, size-bounded."""
        if not isinstance(value, dict):
            raise self.bad(field, f"must be an object, got {_show(value)}")
        name = self.text(self.get(value, "name", f"{field}.name"), f"{field}.name")
        shape = self.shape(self.get(value, "shape", f"{field}.shape"), f"{field}.shape")
        dtype = self.get(value, "dtype", f"{field}.dtype")
        if dtype not in DTYPE_BYTES:
            raise self.bad(
                f"{field}.dtype", f"must be one of {sorted(DTYPE_BYTES)}, got {_show(dtype)}"
            )
        size = DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=object))
        if size > MAX_TENSOR_BYTES:
            raise self.bad(
                f"{field}.shape",
                f"{list(shape)} holds {_gb(size)}, above the {_gb(MAX_TENSOR_BYTES)} anefx reads "
                "(MAX_STATE_BYTES, models/limits.py)",
            )
        return name, shape, dtype

    def axes(self, value: dict, field: str, rank: int) -> None:
        axes = self.get(value, "axes", f"{field}.axes")
        if (
            not isinstance(axes, list)
            or len(axes) != rank
            or not all(isinstance(a, str) and 0 < len(a) <= 8 for a in axes)
        ):
            raise self.bad(
                f"{field}.axes",
                f"must name each of the {rank} axes of its shape, got {_show(axes)}",
            )

    def signature(self, io: dict, field: str, layers: int) -> Signature:
        """IO, whose names, shapes and dtypes are checked already (inputs, outputs, states),
        as a Signature: roles, axes, vocabulary ranges and state kinds checked here."""
        roles = sorted(str(r) for r in Role)
        for group in ("inputs", "outputs"):
            for j, t in enumerate(io[group]):
                r = f"{field}.{group}[{j}]"
                role = self.get(t, "role", f"{r}.role")
                if role not in roles:
                    raise self.bad(f"{r}.role", f"must be one of {roles}, got {_show(role)}")
                self.axes(t, r, len(t["shape"]))
                vocab = t.get("vocab")
                if vocab is not None and not (
                    isinstance(vocab, list)
                    and len(vocab) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in vocab)
                    and 0 <= vocab[0] < vocab[1] <= limits.MAX_VOCAB
                ):
                    raise self.bad(f"{r}.vocab", f"must be [start, end) ids, got {_show(vocab)}")
                if not isinstance(t.get("description", ""), str):
                    raise self.bad(f"{r}.description", "must be a string")
        for j, st in enumerate(io["states"]):
            r = f"{field}.states[{j}]"
            kind = self.get(st, "kind", f"{r}.kind")
            if kind not in STATE_KINDS:
                raise self.bad(f"{r}.kind", f"must be one of {STATE_KINDS}, got {_show(kind)}")
            carried = st.get("carried", False)
            if not isinstance(carried, bool) or carried != (kind in CARRIED_KINDS):
                raise self.bad(
                    f"{r}.carried",
                    f"a {kind} state is {'' if kind in CARRIED_KINDS else 'not '}carried "
                    f"(an input and an output), got {_show(carried)}",
                )
            rows = self.seq(st, "layers", f"{r}.layers", 2 * layers, 1)
            for k, layer in enumerate(rows):
                self.integer(layer, f"{r}.layers[{k}]", 0, layers - 1)
            self.axes(st, r, len(st["shape"]))
            if carried and len(rows) != 1:
                raise self.bad(f"{r}.layers", f"a carried state is one layer's, got {_show(rows)}")
            if not carried and "T" not in st["axes"]:
                raise self.bad(f"{r}.axes", f"{_show(st['axes'])} has no context axis 'T'")
            if kind == "kv" and (st["axes"][0] != PACKED_AXIS or st["shape"][0] != len(rows)):
                raise self.bad(
                    f"{r}.layers",
                    f"a packed state holds one row per entry of 'layers' along its leading axis "
                    f"'{PACKED_AXIS}': {len(rows)} entries, shape {_show(st['shape'])}",
                )
        return Signature.from_dict(io)


def _plain_name(f: _Fields, value: object, field: str) -> str:
    """A file name directly inside the folder: no path, no '..', nothing hidden."""
    name = f.text(value, field)
    if "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise f.bad(field, f"{name!r} must be a plain file name inside the folder")
    return name


def _tokenizer_fields(f: _Fields, doc: dict) -> list[str]:
    """``tokenizer_files`` (plain names, each once) and, when present, ``tokenizer_sha256``
    (the digest of each of them, no other)."""
    names = f.seq(doc, "tokenizer_files", "tokenizer_files", MAX_TOKENIZER_FILES)
    for i, name in enumerate(names):
        _plain_name(f, name, f"tokenizer_files[{i}]")
    if len(set(names)) != len(names):
        raise f.bad("tokenizer_files", f"lists a file twice: {_show(names)}")
    if "tokenizer_sha256" in doc:
        digests = f.obj(doc, "tokenizer_sha256", "tokenizer_sha256")
        if set(digests) != set(names):
            raise f.bad(
                "tokenizer_sha256",
                f"names files {_show(sorted(digests))}, 'tokenizer_files' lists {_show(names)}",
            )
        for name, sha in digests.items():
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise f.bad(
                    f"tokenizer_sha256.{name}", f"must be 64 lowercase hex digits, got {_show(sha)}"
                )
    return names


def read_tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The tokenizer files the artifact at PATH carries, name -> bytes: beside the parts of a
    parts folder (``tokenizer_files`` and ``tokenizer_sha256`` of its manifest), or in a
    package next to its anefx report (listed in the report's ``tokenizer_files``, their
    digests in its ``files``). Each is read through no link, bounded, and checked against its
    recorded sha256 before it is returned: the bytes checked are the bytes used."""
    import hashlib

    path = Path(path)
    if artifact_kind(path) == "parts":
        manifest = read_manifest(path)
        names, where = manifest["tokenizer_files"], path / MANIFEST
        digests = manifest.get("tokenizer_sha256")
        if names and digests is None:
            raise AnefxInputError(
                f"{where}: lists tokenizer files but records no sha256 for them (no field "
                "'tokenizer_sha256': an older anefx wrote it); convert again"
            )
        files = {name: (path / name, digests[name]) for name in names}
    else:
        report = artifact.package_report(path)
        if report is None:
            raise AnefxInputError(
                f"{path}: not written by anefx (no anefx report {REPORT_ITEM} listed in its "
                f"{PACKAGE_MANIFEST}); convert it again with anefx convert"
            )
        where = path / REPORT_ITEM
        f = _Fields(where)
        names = _tokenizer_fields(f, {"tokenizer_files": report.get("tokenizer_files", [])})
        listed = report.get("files")
        listed = listed if isinstance(listed, dict) else {}
        files = {}
        for name in names:
            rel = f"{TOKENIZER_DIR}/{name}"
            if not isinstance(listed.get(rel), str):
                raise f.bad("files", f"lists no sha256 for the tokenizer file {rel}")
            files[name] = (_inside(path, rel, "a tokenizer file", where), listed[rel])
    out = {}
    for name, (file, digest) in files.items():
        data = read_bounded(file, MAX_TOKENIZER_BYTES, "tokenizer file")
        if hashlib.sha256(data).hexdigest() != digest:
            raise AnefxInputError(
                f"{file}: not a readable tokenizer file: it does not match the sha256 "
                f"{where.name} records for it (changed or damaged after conversion); convert again"
            )
        out[name] = data
    return out


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a parts folder, validated (:func:`validate_manifest`)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not os.path.lexists(path):
        if os.path.lexists(folder / PROGRESS):
            raise _interrupted(folder, folder)
        staging = artifact.staging_path(folder)
        if os.path.lexists(staging):
            raise _interrupted(folder, staging)
    doc = read_json(path, MAX_MANIFEST_BYTES, "parts manifest")
    validate_manifest(doc, folder)
    return doc


def validate_manifest(doc: object, folder: Path) -> None:
    """Raise AnefxInputError naming the first field or file of DOC that is wrong: a type, a
    bound, a part file outside FOLDER or missing, a part input no model input or earlier part
    gives, a layer missing or repeated, a context the states disagree with."""
    folder = Path(folder)
    if not isinstance(doc, dict):
        raise AnefxInputError(f"{folder / MANIFEST}: must be a JSON object, got {_show(doc)}")
    check = _ManifestCheck(folder, doc)
    for i, part in enumerate(check.parts):
        check.part(i, part)
    check.totals()


class _ManifestCheck:
    """validate_manifest's walk: the top-level fields first, then part by part (each part's
    inputs against the model inputs and the earlier parts' outputs), then the totals."""

    def __init__(self, folder: Path, doc: dict):
        self.folder = folder
        self.f = f = _Fields(folder / MANIFEST)
        if doc.get("format") != PARTS_FORMAT:
            older = doc.get("format") in artifact.PARTS_FORMATS
            raise f.bad(
                "format",
                f"is {_show(doc.get('format'))}, expected {PARTS_FORMAT!r}"
                + ("; an older anefx wrote it: convert it again" if older else ""),
            )
        model = f.obj(doc, "model", "model")
        bounds = {
            "num_hidden_layers": limits.MAX_LAYERS,
            "vocab_size": limits.MAX_VOCAB,
            "hidden_size": limits.MAX_HIDDEN,
        }
        for key, most in bounds.items():
            f.integer(f.get(model, key, f"model.{key}"), f"model.{key}", 1, most)
        self.layers_n = model["num_hidden_layers"]
        self.fns = fns = f.seq(doc, "functions", "functions", MAX_FUNCTIONS, 1)
        for i, fn in enumerate(fns):
            f.text(fn, f"functions[{i}]")
        if len(set(fns)) != len(fns):
            raise f.bad("functions", f"lists a function twice: {_show(fns)}")
        default = f.get(doc, "default_function", "default_function")
        if default not in fns:
            raise f.bad("default_function", f"{_show(default)} is not one of 'functions' {fns}")
        self.context = f.get(doc, "context", "context")
        if self.context is not None:
            f.integer(self.context, "context", 1, limits.MAX_POSITIONS)
        self.seq_len = f.obj(doc, "seq_len", "seq_len")
        if set(self.seq_len) != set(fns):
            raise f.bad(
                "seq_len", f"names functions {sorted(self.seq_len)}, 'functions' lists {fns}"
            )
        for fn in fns:
            f.integer(self.seq_len[fn], f"seq_len.{fn}", 1, 2**31 - 1)
        _tokenizer_fields(f, doc)
        self.parts = f.seq(doc, "parts", "parts", MAX_PARTS, 1)
        self.files: set[str] = set()
        self.layers: list[int] = []
        self.produced: list[dict[str, dict[str, tuple]]] = []  # per part: fn -> output -> shape
        self.model_inputs: dict[str, dict[str, tuple]] = {fn: {} for fn in fns}
        self.states: dict[str, dict[str, tuple]] = {fn: {} for fn in fns}
        self.carried: dict[str, dict[str, tuple]] = {fn: {} for fn in fns}  # inputs/outputs
        self.state_bytes = dict.fromkeys(fns, 0)

    def part(self, i: int, part: object) -> None:
        f, p = self.f, f"parts[{i}]"
        if not isinstance(part, dict):
            raise f.bad(p, f"must be an object, got {_show(part)}")
        name = _plain_name(f, f.get(part, "file", f"{p}.file"), f"{p}.file")
        if not name.endswith(PACKAGE_SUFFIX):
            raise f.bad(f"{p}.file", f"{name!r} must name a {PACKAGE_SUFFIX} package")
        if name in self.files:
            raise f.bad(f"{p}.file", f"{name!r} names a part listed before")
        self.files.add(name)
        path = self.folder / name
        if path.is_symlink():
            raise f.bad(
                f"{p}.file",
                f"{name!r} is a symbolic link (to {os.readlink(path)}); anefx writes none and "
                "reads none inside an artifact",
            )
        if not path.is_dir():
            raise f.bad(f"{p}.file", f"{name!r} is not in the folder")
        sha = f.get(part, "sha256", f"{p}.sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise f.bad(f"{p}.sha256", f"must be 64 lowercase hex digits, got {_show(sha)}")
        for j, layer in enumerate(f.seq(part, "layers", f"{p}.layers", limits.MAX_LAYERS)):
            self.layers.append(f.integer(layer, f"{p}.layers[{j}]", 0, self.layers_n - 1))
        by_fn = f.obj(part, "functions", f"{p}.functions")
        if set(by_fn) != set(self.fns):
            raise f.bad(
                f"{p}.functions", f"names functions {sorted(by_fn)}, 'functions' lists {self.fns}"
            )
        outs, states = {}, {}
        for fn in self.fns:
            q = f"{p}.functions.{fn}"
            io = f.obj(by_fn, fn, q)
            self.inputs(i, fn, q, io)
            outs[fn] = self.outputs(q, io)
            states[fn] = self.kv_states(fn, q, io)
            f.signature(io, q, self.layers_n)
        for fn in self.fns[1:]:  # every function of a part reads and writes the same KV cache
            if states[fn] != states[self.fns[0]]:
                raise f.bad(
                    f"{p}.functions.{fn}.states",
                    f"differs from that of {self.fns[0]}: the functions of a part share one KV "
                    "cache",
                )
        self.produced.append(outs)

    def inputs(self, i: int, fn: str, q: str, io: dict) -> None:
        """Part I's inputs of FN: each from a model input or from an earlier part's output,
        with the shape it is given as."""
        f = self.f
        seen: set[str] = set()
        for j, inp in enumerate(f.seq(io, "inputs", f"{q}.inputs", 64)):
            r = f"{q}.inputs[{j}]"
            name, shape, _ = f.tensor(inp, r)
            if name in seen:
                raise f.bad(f"{r}.name", f"{name!r} names an input listed before")
            seen.add(name)
            src = f.obj(inp, "from", f"{r}.from")
            if set(src) == {"model"}:
                given = src["model"]
                if given not in MODEL_INPUTS:
                    raise f.bad(f"{r}.from.model", f"{_show(given)} is not a model input")
                known = self.model_inputs[fn].setdefault(given, shape)
                if known != shape:
                    raise f.bad(
                        f"{r}.shape", f"{list(shape)}, another part reads {given} as {list(known)}"
                    )
            elif set(src) == {"part", "output"}:
                k, out = src["part"], src["output"]
                if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < i:
                    raise f.bad(f"{r}.from.part", f"is {_show(k)}: no earlier part gives it")
                given_shape = self.produced[k][fn].get(out) if isinstance(out, str) else None
                if given_shape is None:
                    raise f.bad(f"{r}.from.output", f"{_show(out)}: part {k} gives no such output")
                if given_shape != shape:
                    raise f.bad(
                        f"{r}.shape",
                        f"{list(shape)}, but part {k} gives {out} as {list(given_shape)}",
                    )
            else:
                raise f.bad(
                    f"{r}.from",
                    'must be {"model": NAME} or {"part": I, "output": NAME}, got ' + _show(src),
                )

    def outputs(self, q: str, io: dict) -> dict[str, tuple]:
        outs: dict[str, tuple] = {}
        for j, out in enumerate(self.f.seq(io, "outputs", f"{q}.outputs", 4096, 1)):
            name, shape, _ = self.f.tensor(out, f"{q}.outputs[{j}]")
            if name in outs:
                raise self.f.bad(
                    f"{q}.outputs[{j}].name", f"{name!r} names an output listed before"
                )
            outs[name] = shape
        return outs

    def kv_states(self, fn: str, q: str, io: dict) -> list[tuple]:
        """The states of FN in this part: fp16 rank-4 KV caches, every state of the artifact
        named once and all of them together within MAX_STATE_BYTES."""
        f, mine = self.f, []
        for j, st in enumerate(f.seq(io, "states", f"{q}.states", 2 * limits.MAX_LAYERS)):
            r = f"{q}.states[{j}]"
            name, shape, dtype = f.tensor(st, r)
            carried = st.get("carried") is True  # a conv window or delta-rule state (I/O)
            if dtype != "float16" or (len(shape) != 4 and not carried):
                raise f.bad(
                    r,
                    "must be a float16 KV cache (rows, kv_heads, head_dim, context), got "
                    + _show(st),
                )
            if name in self.states[fn] or name in self.carried[fn]:
                raise f.bad(f"{r}.name", f"{name!r} names a state listed before")
            (self.carried if carried else self.states)[fn][name] = shape
            mine.append((name, shape))
            self.state_bytes[fn] += 2 * int(np.prod(shape, dtype=object))
            if self.state_bytes[fn] > limits.MAX_STATE_BYTES:
                raise f.bad(
                    f"{r}.shape",
                    f"{list(shape)}: the states of {fn} would hold {_gb(self.state_bytes[fn])}, "
                    f"above the {_gb(limits.MAX_STATE_BYTES)} anefx allocates "
                    "(MAX_STATE_BYTES, models/limits.py)",
                )
        return mine

    def totals(self) -> None:
        """Every layer once; per function, input_ids read as (1, seq_len) and every state
        holding the manifest's context."""
        f, n = self.f, self.layers_n
        if sorted(self.layers) != list(range(n)):
            raise f.bad("parts", f"holds layers {self.layers}, expected each of 0..{n - 1} once")
        for fn in self.fns:
            ids = self.model_inputs[fn].get("input_ids")
            if ids is None:
                raise f.bad("parts", f"no part reads input_ids in function {fn}")
            if len(ids) != 2 or ids[0] != 1 or ids[1] != self.seq_len[fn]:
                raise f.bad(
                    "seq_len",
                    f"{fn}: {self.seq_len[fn]}, but the parts read input_ids as {list(ids)}",
                )
            for name, shape in self.states[fn].items():
                # the cache's context axis is its last, (1 or rows, kv_heads, head_dim, T)
                if self.context is None or shape[-1] != self.context:
                    raise f.bad(
                        "context",
                        f"is {_show(self.context)}, but state {name} of {fn} holds "
                        f"{shape[-1]} positions (shape {list(shape)})",
                    )
        if self.context is not None and not any(self.states.values()):
            raise f.bad("context", f"is {self.context}, but no part holds a KV cache state")


# ---------------------------------------------------------------------------------------------
# Running a parts folder


def check_part_program(where: Path, part: dict, program, fns: list[str]) -> None:
    """What the manifest says about PART must be what its program declares."""
    name = part["file"]
    if set(program.functions) != set(fns):
        raise AnefxInputError(
            f"{where}: part {name} holds functions {sorted(program.functions)}, the manifest "
            f"lists {fns}"
        )
    for fn in fns:
        _agree_function(
            where,
            f"part {name}",
            fn,
            part["functions"][fn],
            program.functions[fn],
            "part",
            "the manifest",
        )


def _agree_function(
    where: Path, what: str, fn: str, io: dict, declared, owner: str, record: str
) -> None:
    """IO (a recorded signature) must list exactly what function FN of WHAT's program declares
    (WHERE: the file that records it, RECORD naming it in a message; OWNER: "part" or
    "package")."""
    # a carried state is an input under its name and an output under carried_output's
    held = [t for t in io["states"] if not t.get("carried")]
    carried = [t for t in io["states"] if t.get("carried")]
    returned = [{**t, "name": f"{t['name']}{CARRIED_SUFFIX}"} for t in carried]
    for kind, listed, actual in (
        ("input", [*io["inputs"], *carried], declared.inputs),
        ("output", [*io["outputs"], *returned], declared.outputs),
        ("state", held, declared.states),
    ):
        want = {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in listed}
        got = {t.name: (tuple(t.shape), t.dtype.name) for t in actual}
        for tname in want:
            if tname not in got:
                raise AnefxInputError(
                    f"{where}: {what}, function {fn}: {kind} {tname!r} is not in the {owner}'s "
                    f"program (its {kind}s: {', '.join(sorted(got)) or 'none'})"
                )
            if want[tname] != got[tname]:
                raise AnefxInputError(
                    f"{where}: {what}, function {fn}: {kind} {tname!r} is "
                    f"{got[tname][1]}{list(got[tname][0])} in the {owner}'s program, {record} "
                    f"says {want[tname][1]}{list(want[tname][0])}"
                )
        extra = sorted(set(got) - set(want))
        if extra:
            raise AnefxInputError(
                f"{where}: {what}, function {fn}: the {owner}'s program has {kind} "
                f"{extra[0]!r}, which {record} does not list"
            )


def package_signatures(path: str | Path, report: dict, program) -> dict[str, Signature]:
    """The signature of each function of the package at PATH as its anefx REPORT records it,
    checked field by field and against what PROGRAM (the package's, loaded) declares."""
    path = Path(path)
    where = path / REPORT_ITEM
    f = _Fields(where)
    if report.get("format") != artifact.PACKAGE_FORMAT:
        raise f.bad(
            "format",
            f"is {_show(report.get('format'))}, expected {artifact.PACKAGE_FORMAT!r}; an older "
            "anefx wrote it: convert it again",
        )
    sigs = f.obj(report, "signatures", "signatures")
    if set(sigs) != set(program.functions):
        raise f.bad(
            "signatures",
            f"names functions {sorted(sigs)}, the package holds {sorted(program.functions)}",
        )
    out = {}
    for fn in sorted(sigs):
        q = f"signatures.{fn}"
        io = f.obj(sigs, fn, q)
        for group, most in (("inputs", 64), ("outputs", 4096), ("states", 2 * limits.MAX_LAYERS)):
            for j, t in enumerate(f.seq(io, group, f"{q}.{group}", most)):
                f.tensor(t, f"{q}.{group}[{j}]")
        out[fn] = f.signature(io, q, limits.MAX_LAYERS)
        _agree_function(
            where, "the package", fn, io, program.functions[fn], "package", "its report"
        )
    return out
