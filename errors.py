"""The two kinds of failure a user sees: bad input (exit 2) and an illegal graph (exit 1)."""


class AnefxInputError(Exception):
    """Bad user input: a checkpoint, preset, path or option. The CLI exits with 2.

    The message names the file, field or tensor at fault and is shown as one line.
    """


class AnefxGraphError(Exception):
    """The graph broke an invariant a pass promised, or the package cannot be emitted."""
