"""What anefx writes, and how it recognises it: the two artifact kinds and their digests.

An artifact is either

* a **package** ``X.mlpackage``: one Core ML package; anefx's report is an item of the package
  itself (``Data/anefx/report.json``, author "anefx" in the package's ``Manifest.json``), so the
  package and its report are one thing, written and replaced together. The report lists the
  sha256 of every other file of the package (``files``), which ``verify`` and ``generate`` check;
* a **parts folder**: the parts (each a package), ``manifest.json`` (format ``anefx-chunked/3``)
  listing every part with its sha256, and the tokenizer files copied beside them.

The marker that makes a path an anefx artifact is that report item, or that manifest: anything
else at an output path is not anefx's, and is never replaced or written into.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anefx.core.signature import Signature, pack_states
from anefx.errors import AnefxGraphError, AnefxInputError

PACKAGE_SUFFIX = ".mlpackage"
# /2: the report records each function's signature (roles, layouts, vocabulary ranges)
# /3: one packed state per program (issue 15); /2: typed signatures, a state per layer's K and V
PACKAGE_FORMAT = "anefx-package/3"
PACKAGE_FORMATS = ("anefx-package/1", "anefx-package/2", PACKAGE_FORMAT)  # replaceable; /3 read
PACKAGE_MANIFEST = "Manifest.json"  # the Core ML package's own item list
REPORT_AUTHOR = "anefx"
REPORT_NAME = "report.json"
REPORT_ITEM = f"Data/{REPORT_AUTHOR}/{REPORT_NAME}"  # relative to the package

# /2: each part's functions are its signature (roles, layouts, vocabulary ranges, state kinds)
PARTS_FORMAT = "anefx-chunked/3"
PARTS_FORMATS = ("anefx-chunked/1", "anefx-chunked/2", PARTS_FORMAT)  # replaceable; /3 read
MANIFEST = "manifest.json"  # a parts folder's manifest
PROGRESS = ".anefx-progress.json"  # inside a staged parts folder: the parts written so far

STAGING_SUFFIX = ".anefx-staging"
# files a desktop adds to any folder it shows (Finder's view settings): not a user's data, so
# their presence does not make an artifact "hold something anefx did not write"
IGNORED = frozenset({".DS_Store"})
STAGING_MARKER = "anefx-staging.json"

_BLOCK = 1 << 24


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(path: Path) -> str:
    """sha256 over a package's files (relative path and bytes), in a fixed order: a part's
    digest in ``manifest.json``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                h.update(block)
    return h.hexdigest()


def package_files(package: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file of PACKAGE but its anefx report: the ``files``
    the report lists."""
    return {
        str(f.relative_to(package)): file_digest(f)
        for f in sorted(package.rglob("*"))
        if f.is_file() and not f.is_symlink() and str(f.relative_to(package)) != REPORT_ITEM
    }


def package_signature(sig: Signature) -> dict:
    """SIG as the package holds it, for the manifest and the report: every float tensor fp16
    (Core ML's compute dtype, whatever the lowered graph's), integers int32, and the states
    packed into the one state the program holds (``pack_states``), followed by the carried
    states (an input and an output each)."""

    def stored(dtype: str) -> str:
        return "int32" if dtype.startswith(("int", "uint", "bool")) else "float16"

    doc = dataclasses.replace(sig, states=pack_states(sig.states) + sig.carried).to_dict()
    for entry in (*doc["inputs"], *doc["outputs"], *doc["states"]):
        entry["dtype"] = stored(entry["dtype"])
    return doc


def staging_path(output: Path) -> Path:
    """Where OUTPUT is built before it is swapped into place: a hidden folder beside it."""
    return output.with_name(f".{output.name}{STAGING_SUFFIX}")


@dataclass
class Found:
    """What is at an output path: ``kind`` is "absent", "empty" (an empty folder), "package",
    "parts" or "other";
    ``foreign`` names entries inside an artifact that anefx did not write there."""

    path: Path
    kind: str
    detail: str = ""
    foreign: list[str] = field(default_factory=list)


def _read_small_json(path: Path, limit: int = 64 << 20):
    """A JSON document of at most LIMIT bytes, or None (missing, too large, not JSON)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def package_report(package: Path) -> dict | None:
    """The anefx report of PACKAGE if it is an anefx package (the item is listed in the
    package's Manifest.json and holds an anefx report), else None."""
    manifest = _read_small_json(package / PACKAGE_MANIFEST)
    entries = manifest.get("itemInfoEntries") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        return None
    listed = any(
        isinstance(e, dict)
        and e.get("author") == REPORT_AUTHOR
        and e.get("path") == f"{REPORT_AUTHOR}/{REPORT_NAME}"
        for e in entries.values()
    )
    report = _read_small_json(package / REPORT_ITEM) if listed else None
    if not isinstance(report, dict) or report.get("format") not in PACKAGE_FORMATS:
        return None
    return report


# the files of a part as anefx writes it (coremltools' layout of a package, no report item)
PART_FILES = frozenset(
    {
        PACKAGE_MANIFEST,
        "Data/com.apple.CoreML/model.mlmodel",
        "Data/com.apple.CoreML/weights/weight.bin",
    }
)


def _foreign_in_parts(folder: Path, parts: set[str]) -> list[str]:
    """Files inside the listed parts of FOLDER that a part as anefx writes does not hold."""
    out = []
    for name in sorted(parts):
        if "/" in name or name in (".", "..") or os.sep in name:
            continue  # not a part's name: never looked up outside FOLDER
        part = folder / name
        if part.is_dir() and not part.is_symlink():
            out += [
                f"{name}/{f.relative_to(part)}"
                for f in sorted(part.rglob("*"))
                if (f.is_file() or f.is_symlink())
                and str(f.relative_to(part)) not in PART_FILES
                and f.name not in IGNORED
            ]
    return out


def _names(values: object) -> set[str]:
    return {v for v in values if isinstance(v, str)} if isinstance(values, list) else set()


def identify(path: Path) -> Found:
    """What is at PATH, without following a symlink there."""
    if os.path.islink(path):
        return Found(path, "other", f"a symbolic link to {os.readlink(path)}")
    if not path.exists():
        return Found(path, "absent")
    if not path.is_dir():
        return Found(path, "other", "a file")
    report = package_report(path)
    if report is not None:
        known = set(report.get("files") or {}) | {REPORT_ITEM}
        foreign = sorted(
            str(f.relative_to(path))
            for f in path.rglob("*")
            if (f.is_file() or f.is_symlink())
            and str(f.relative_to(path)) not in known
            and f.name not in IGNORED
        )
        return Found(path, "package", "an anefx package", foreign)
    manifest = _read_small_json(path / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") in PARTS_FORMATS:
        known = {MANIFEST, *_names(manifest.get("tokenizer_files"))}
        parts = manifest.get("parts")
        listed = _names(
            [p.get("file") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []
        )
        foreign = sorted(e.name for e in path.iterdir() if e.name not in known | listed | IGNORED)
        foreign += _foreign_in_parts(path, listed)
        return Found(path, "parts", "an anefx parts folder", foreign)
    progress = _read_small_json(path / PROGRESS)
    if isinstance(progress, dict) and isinstance(progress.get("written"), dict):
        # an older anefx converted in place and was interrupted: its parts and its record
        known = {PROGRESS, *_names(list(progress["written"]))}
        foreign = sorted(e.name for e in path.iterdir() if e.name not in known | IGNORED)
        return Found(path, "parts", "an interrupted anefx parts folder", foreign)
    entries = sorted(e.name for e in path.iterdir() if e.name not in IGNORED)
    if not entries:
        return Found(path, "empty", "an empty folder")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return Found(path, "other", f"a folder anefx did not write ({len(entries)} entries: {shown})")


# ---------------------------------------------------------------------------------------------
# Writing an artifact: checked first, staged beside the output, swapped in whole.

# errors that mean the file system took no more bytes (full disk, quota, file-size limit)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _no_follow_flags() -> int:
    return os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def write_new(path: Path, data: bytes) -> None:
    """Create PATH (which must not exist: never through a symlink) holding DATA."""
    fd = os.open(path, _no_follow_flags(), 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_json(path: Path, doc: object) -> None:
    """Replace PATH by DOC as JSON, atomically: a new file beside it, renamed over it (a
    rename replaces a symlink at PATH rather than writing through it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        write_new(tmp, (json.dumps(doc, indent=1, default=str) + "\n").encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_new(src: Path, dst: Path) -> None:
    """Copy the file SRC (read through links: a Hugging Face cache snapshot is links to its
    blobs) to the new file DST (created, never followed)."""
    fd = os.open(dst, _no_follow_flags(), 0o644)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        shutil.copyfileobj(fin, fout, _BLOCK)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np
    RENAME_SWAP); False where the system offers neither."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # a file system without the swap: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def _symlinks(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink())


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder of ROOT to disk, so the swap publishes complete files."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data is flushed anyway
    finally:
        os.close(fd)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class Output:
    """An artifact being written at PATH: everything goes into the staging folder beside it
    (``staging_path``), and :meth:`commit` swaps the finished artifact into place, so PATH is
    at every moment absent, the old artifact, or the new one, complete.

    Use as a context manager: leaving it without :meth:`commit` removes what was staged, except
    that a parts folder keeps its finished parts for ``--resume`` when ``keep_on_failure`` is
    set (a disk that filled up removes everything). coremltools' own temporary files go into
    ``tmp`` inside the staging folder (:meth:`tempdir`), never into the system's.
    """

    def __init__(self, path: Path, kind: str, staging: Path, created: list[Path]):
        self.path, self.kind, self.staging = path, kind, staging
        self.staged = staging / path.name  # the artifact under construction
        self.tmp = staging / "tmp"
        self.created = created  # parent folders this run made, removed again on failure
        self.keep_on_failure = False
        self.committed = False
        self.closed = False  # the first exit cleans up; nested ``with`` blocks share it
        self.notes: list[str] = []

    # -- checks ---------------------------------------------------------------------------------

    def check_space(self, need: int, what: str = "the artifact") -> None:
        """Refuse unless the output's file system has NEED bytes (plus 5%) free."""
        try:
            st = os.statvfs(self.staging)
        except OSError:
            return  # no statvfs here: the writes themselves will tell
        free = st.f_bavail * st.f_frsize
        if need * 1.05 > free:
            raise AnefxInputError(
                f"{self.path}: {what} needs about {need / 1e9:.2f} GB and its file system has "
                f"{free / 1e9:.2f} GB free"
            )

    # -- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def tempdir(self):
        """coremltools' temporary folders and files (tempfile) go into ``tmp`` while inside."""
        self.tmp.mkdir(exist_ok=True)
        saved, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir, os.environ["TMPDIR"] = str(self.tmp), str(self.tmp)
        try:
            yield self.tmp
        finally:
            tempfile.tempdir = saved
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env
            _clear(self.tmp)

    def commit(self) -> None:
        """Publish the staged artifact at PATH (replacing the old one in one swap where the
        system can), then remove the old one and the staging folder."""
        links = _symlinks(self.staged)
        if links:
            raise AnefxInputError(
                f"{self.staging}: a symbolic link {links[0]} appeared in the staged output; "
                "anefx never writes links, so it does not publish this"
            )
        _fsync_tree(self.staged)
        now = identify(self.path)
        if now.kind == "other":  # it was new, empty or ours when checked: something came since
            raise AnefxInputError(
                f"-o {self.path}: {now.detail} appeared there during the conversion; nothing "
                "was replaced"
            )
        if now.kind in ("package", "parts", "empty"):
            if not _exchange(self.staged, self.path):
                previous = self.staging / ".previous"
                os.replace(self.path, previous)
                try:
                    os.replace(self.staged, self.path)
                except BaseException:
                    os.replace(previous, self.path)
                    raise
                os.replace(previous, self.staged)
            # the old artifact is now at self.staged; it goes with the staging folder
        else:
            os.replace(self.staged, self.path)
        _fsync_dir(self.path.parent)
        self.committed = True
        shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self, keep: bool) -> None:
        """Remove what this run staged (all of it, or all but the finished parts)."""
        if keep and self.staged.is_dir():
            _clear(self.tmp)
            if self.tmp.is_dir():
                self.tmp.rmdir()
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if self.committed or self.closed:
            return False
        self.closed = True  # left without a commit (an error, or a caller that stopped early)
        full = isinstance(exc, OSError) and exc.errno in _FULL
        # coremltools' weight writer reports a failed write without an errno
        full = full or (isinstance(exc, RuntimeError) and "FileWriter" in str(exc))
        keep = self.keep_on_failure and not full and self.staged.is_dir()
        self.abort(keep)
        if keep:
            self.notes.append(
                f"the parts finished so far are kept in {self.staging}: run the same command "
                "with --resume to finish, or remove that folder"
            )
        if full:
            raise AnefxInputError(
                f"{self.path}: writing failed, the file system took no more bytes "
                f"({_reason(exc)}); nothing was left behind"
            ) from None
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)}{f': {exc.filename}' if exc.filename else ''}"
    return str(exc)


def _clear(folder: Path) -> None:
    """Empty FOLDER (kept), without following links."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def prepare_output(
    path: str | os.PathLike[str],
    kind: str,
    protect: list[Path] | tuple[Path, ...] = (),
    resume: bool = False,
) -> Output:
    """Check that PATH may receive an artifact of KIND ("package" or "parts") and make its
    staging folder; raise AnefxInputError naming what is in the way.

    PATH may be absent, an empty folder, or an artifact anefx wrote (of the same kind, holding
    nothing anefx did not write, and no link); never a link, and never the same as, inside, or
    around a folder in PROTECT (the checkpoint). RESUME keeps what an interrupted run of the
    same output staged; otherwise a stale staging folder of a killed run is removed.
    """
    path = Path(path)
    if kind == "package" and path.suffix != PACKAGE_SUFFIX:
        raise AnefxInputError(f"-o {path}: a single package must end in {PACKAGE_SUFFIX}")
    if kind == "parts" and path.suffix == PACKAGE_SUFFIX:
        raise AnefxInputError(f"-o {path}: parts are written into a folder, not {PACKAGE_SUFFIX}")
    if not path.name or path.name in (".", ".."):
        raise AnefxInputError(f"-o {path}: name the output itself, not a folder around it")
    parent = _existing_parent(path)
    real = parent.resolve() / path.relative_to(parent) if parent != path else path.resolve()
    for folder in protect:
        folder = Path(folder).resolve()
        if _inside(real, folder) or _inside(folder, real):
            where = "is" if real == folder else "is inside" if _inside(real, folder) else "holds"
            raise AnefxInputError(
                f"-o {path} {where} the checkpoint folder {folder}; anefx never writes there"
            )
    found = identify(path)
    want = {"package": "an anefx package", "parts": "an anefx parts folder"}[kind]
    if found.kind == "other" or found.kind in ("package", "parts") and found.kind != kind:
        raise AnefxInputError(
            f"-o {path}: there is {found.detail} there, not {want}; anefx writes only to a new "
            "path, an empty folder, or an artifact it wrote: choose another -o"
        )
    if found.foreign:
        raise AnefxInputError(
            f"-o {path}: this {found.detail} holds {found.foreign[0]}"
            + (f" (and {len(found.foreign) - 1} more)" if len(found.foreign) > 1 else "")
            + ", which anefx did not write; move it away or choose another -o"
        )
    links = _symlinks(path) if found.kind in ("package", "parts") else []
    if links:
        raise AnefxInputError(
            f"-o {path}: this {found.detail} holds a symbolic link {links[0]}, which anefx never "
            "writes; remove it or choose another -o"
        )
    created = _make_parents(path, parent)
    staging = staging_path(path)
    try:
        reused = _take_staging(staging, path, resume)
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    out = Output(path, kind, staging, created)
    out.keep_on_failure = reused  # a resume that fails keeps what the earlier run finished
    return out


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder at or above PATH's parent; refuse a file in the way."""
    probe = path.parent if str(path.parent) else Path(".")
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            probe = probe.parent
            continue
        except OSError as exc:
            raise AnefxInputError(f"-o {path}: cannot reach {probe} ({exc.strerror})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise AnefxInputError(f"-o {path}: {probe} is a file, not a folder")
        return probe


def _make_parents(path: Path, existing: Path) -> list[Path]:
    """Create PATH's missing parent folders below EXISTING; return them, outermost first."""
    missing = []
    folder = path.parent
    while folder != existing and str(folder) not in ("", "."):
        missing.append(folder)
        folder = folder.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            for made in reversed(created):
                with contextlib.suppress(OSError):
                    made.rmdir()
            raise AnefxInputError(f"-o {path}: cannot create {folder} ({exc.strerror})") from None
        created.append(folder)
    return created


def _take_staging(staging: Path, path: Path, resume: bool) -> bool:
    """Make (or, with RESUME, reuse: True) the staging folder of PATH, refusing one anefx did
    not make or one another running anefx is using."""
    if os.path.lexists(staging):
        marker = _read_small_json(staging / STAGING_MARKER)
        if (
            os.path.islink(staging)
            or not isinstance(marker, dict)
            or marker.get("output") != (path.name)
        ):
            raise AnefxInputError(
                f"-o {path}: {staging} is in the way and anefx did not make it; remove it"
            )
        if _pid_alive(marker.get("pid")):
            raise AnefxInputError(
                f"-o {path}: another anefx (process {marker['pid']}) is writing it now"
            )
        if not resume:
            shutil.rmtree(staging)  # a killed run's leftovers
        else:
            _clear(staging / "tmp")
            write_json(staging / STAGING_MARKER, {**marker, "pid": os.getpid()})
            return True
    try:
        staging.mkdir()
        write_new(
            staging / STAGING_MARKER,
            json.dumps(
                {"format": "anefx-staging/1", "output": path.name, "pid": os.getpid()}
            ).encode(),
        )
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AnefxInputError(
            f"-o {path}: cannot write in {staging.parent} ({exc.strerror})"
        ) from None
    return False


# copied from a checkpoint folder into the artifact (next to the parts, or inside a package), so
# generate and chat run from the artifact alone; transformers 5 keeps the chat template in
# chat_template.jinja, older checkpoints in tokenizer_config.json
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


def tokenizer_files(source: str) -> dict[str, Path]:
    """The tokenizer files of checkpoint folder SOURCE that travel with the artifact (name ->
    the file, confined to the checkpoint like its weights: a link out of it is refused), in
    the order of TOKENIZER_FILES."""
    from anefx.models.checkpoint_files import confined, confinement_root

    folder = Path(source)
    if not folder.is_dir():
        return {}
    root = confinement_root(folder)
    return {
        name: confined(folder, name, str(folder / name), root)
        for name in TOKENIZER_FILES
        if os.path.lexists(folder / name)
    }


def refuse_unless_forced(errors: list[tuple[str, Any]], force: bool, say) -> bool:
    """Both writers' rule: a graph with ANE errors is not emitted unless the caller forces it.

    ERRORS are (where, violation) pairs, WHERE naming the function or the part (" in part
    part_01, function decode"; "" for a single graph). Returns whether the artifact is forced
    (the report says so); without FORCE the first error is named and nothing is written."""
    if errors and not force:
        where, first = errors[0]
        raise AnefxGraphError(
            f"refusing to emit: {len(errors)} ANE error(s) (first: {first.rule} at "
            f"{first.node}{where}); use --force to emit anyway"
        )
    if errors:
        say(f"--force: emitting despite {len(errors)} error(s)")
    return bool(errors)
