"""Helpers of the tests that drive the command line with hostile and careless input."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

from anefx.cli import main


def cli(*argv: object, parsing: bool = False) -> tuple[int, str, str]:
    """main(ARGV) in-process: exit code, stdout, stderr. Only with PARSING may main exit
    (argparse's SystemExit, after its one line, for a refused flag or --help); any other
    exception escaping main (a traceback for the user) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            if not parsing:
                raise
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, *needles: object) -> str:
    """The only stderr line starting with "anefx:", holding every NEEDLE (progress lines may
    precede it); no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("anefx:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ROOT, never following a link: files by sha256, links by target,
    folders and special files by kind."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            elif path.is_file():
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = "special"
    return found
