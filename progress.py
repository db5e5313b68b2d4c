"""Progress on stderr for the commands that run longer than a few seconds.

A :class:`Progress` prints one line per stage, with the time since the command started
(``[  12.3s] loading ...``), and counts steps with tqdm: a bar that redraws itself when stderr
is a terminal, and otherwise (a log file, a pipe, CI) one plain line per step, so nothing but
newline-terminated lines reaches a file. Progress never goes to stdout, which stays for the
result (and for ``--json``). Library functions take ``progress=None`` (silent) or a Progress.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

# when the command started (this module is imported with the command line): the elapsed time
# of a stage line counts the imports too, which take seconds
START = time.perf_counter()


class Progress:
    """Stage lines and step counts on STREAM (stderr), timed from the command's start;
    ENABLED False makes it silent."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = START

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def __call__(self, message: str) -> None:
        """One stage line: ``[elapsed] MESSAGE``."""
        if self.enabled:
            print(f"[{self.elapsed:6.1f}s] {message}", file=self.stream, flush=True)

    def steps(self, items: Iterable[T], total: int, what: str) -> Iterator[T]:
        """Yield ITEMS, counting them as WHAT done / TOTAL with the elapsed time."""
        if not self.enabled:
            yield from items
            return
        if self._tty():
            from tqdm import tqdm

            # explicit disable=False: the CLI sets TQDM_DISABLE to silence coremltools' bars
            yield from tqdm(
                items, total=total, desc=what, file=self.stream, disable=False, leave=False
            )
            self(f"{what}: {total}/{total} done")
            return
        done = 0
        for item in items:
            yield item
            done += 1
            self(f"{what} {done}/{total}")


def quiet() -> Progress:
    """A Progress that prints nothing (the library's default)."""
    return Progress(enabled=False)
