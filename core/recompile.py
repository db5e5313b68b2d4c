"""Deferred code generation of a GraphModule, shared by the passes and the pass manager."""

from __future__ import annotations

from contextlib import contextmanager

import torch.fx as fx

_DEFER = [0]


def recompile(gm: fx.GraphModule) -> None:
    """Regenerate GM's code, unless a pipeline defers it to its end (it costs ~0.3 s per
    call on a 28-layer graph and nothing between passes runs the generated code)."""
    if not _DEFER[0]:
        gm.recompile()


@contextmanager
def deferred_recompile():
    """Within this block, recompile() does nothing; the caller recompiles once at the end."""
    _DEFER[0] += 1
    try:
        yield
    finally:
        _DEFER[0] -= 1
