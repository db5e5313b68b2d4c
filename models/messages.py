"""Shaping values for one-line error messages."""

from __future__ import annotations


def shown(value: object, width: int = 60) -> str:
    """repr(VALUE) cut to WIDTH characters: a hostile value must not flood the message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width else text[: width - 3] + "..."
