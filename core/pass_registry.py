"""The pass registry: every pass in ``passes/`` registers itself here; the pipeline names them.

This follows coremltools' ``PASS_REGISTRY``: a pass module calls :func:`register_pass` when it
is imported, and the pipeline (``lowering/pipeline.py``) is a list of registered names with the
reason for each position. So ``lowering/`` never imports ``passes/`` and ``passes/`` never
imports ``lowering/``: both import this module. :func:`registered` imports the ``anefx.passes``
package (whose ``__init__`` imports every pass module) on first use, as a plugin package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

PassFn = Callable[[fx.GraphModule], PassResult]
Check = Callable[[fx.GraphModule], list[str]]
Summary = Callable[[fx.GraphModule], dict | None]

PASSES_PACKAGE = "anefx.passes"


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: how to build it from its options, what holds after it, and what it
    adds to the report's statistics (None: nothing)."""

    name: str
    build: Callable[..., PassFn]  # options (keywords) -> the pass
    postcondition: Check
    summary: Summary | None = None
    module: str = ""


_REGISTRY: dict[str, PassSpec] = {}


def register_pass(
    name: str, build: Callable[..., PassFn], postcondition: Check, summary: Summary | None = None
) -> PassSpec:
    """Register the pass NAME; BUILD makes it from the pipeline's options (a pass without
    options: ``lambda: fn``). Registering a name twice is a programming error."""
    module = getattr(build, "__module__", "") or ""
    old = _REGISTRY.get(name)
    if old is not None and old.module != module:
        raise ValueError(f"pass {name!r} registered by {old.module} and {module}")
    spec = PassSpec(name, build, postcondition, summary, module)
    _REGISTRY[name] = spec
    return spec


def registered() -> dict[str, PassSpec]:
    """Every registered pass by name (importing the passes package on first use)."""
    importlib.import_module(PASSES_PACKAGE)
    return dict(_REGISTRY)


def get_pass(name: str) -> PassSpec:
    passes = registered()
    if name not in passes:
        raise KeyError(f"no pass {name!r} is registered; registered: {', '.join(sorted(passes))}")
    return passes[name]
