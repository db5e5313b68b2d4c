"""Runs the pipeline: one pass at a time, each followed by lint, shape propagation and checks.

After every pass the manager
  * tags each node the pass created with ``meta["anefx_pass"]`` (the report points back to it),
  * runs ``graph.lint()`` and meta-device shape propagation,
  * runs the postcondition of this pass and of every pass before it (what a pass established
    must stay true), and on failure raises AnefxGraphError naming the pass that broke it and
    the passes that ran before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.fx as fx

from anefx.core.annotations import MODULE, MODULE_CLASS
from anefx.core.pass_registry import Check, PassFn, Summary
from anefx.core.recompile import deferred_recompile
from anefx.errors import AnefxGraphError
from anefx.lowering.shape_prop import propagate_shapes


@dataclass(frozen=True)
class Step:
    """One pipeline position: the pass, what holds after it, and why it sits here."""

    name: str
    run: PassFn
    postcondition: Check
    reason: str
    summary: Summary | None = None  # what the pass adds to the report's statistics


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass
class PassLog:
    records: list[PassRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


def _tag_new_nodes(gm: fx.GraphModule, before: set[fx.Node], name: str) -> None:
    for node in gm.graph.nodes:
        if node in before:
            continue
        # a pass that re-emits an existing op keeps that op's origin (None = the capture)
        if "anefx_pass" not in node.meta:
            node.meta["anefx_pass"] = name
        if MODULE not in node.meta:
            # a pass that forgot to say where a node came from: borrow from its inputs
            for arg in node.all_input_nodes:
                if MODULE in arg.meta:
                    for key in (MODULE, MODULE_CLASS):
                        if key in arg.meta:
                            node.meta[key] = arg.meta[key]
                    break


def run_pipeline(
    gm: fx.GraphModule, steps: list[Step], verify: bool = True
) -> tuple[fx.GraphModule, PassLog]:
    """Run STEPS in order on GM; return the final module and a per-pass log."""
    log = PassLog()
    done: list[Step] = []
    with deferred_recompile():
        gm = _run_steps(gm, steps, verify, log, done)
    gm.recompile()
    return gm, log


def _run_steps(gm, steps, verify, log, done) -> fx.GraphModule:
    for step in steps:
        t0 = time.perf_counter()
        before = set(gm.graph.nodes)
        n_before = len(before)
        try:
            result = step.run(gm)
        except AnefxGraphError:
            raise
        except Exception as exc:
            raise AnefxGraphError(
                f"pass {step.name} failed: {type(exc).__name__}: {exc} "
                f"(passes before it: {', '.join(s.name for s in done) or 'none'})"
            ) from exc
        gm = result.graph_module
        _tag_new_nodes(gm, before, step.name)
        done.append(step)
        if verify:
            _verify(gm, step, done)
        log.records.append(
            PassRecord(
                step.name, result.modified, time.perf_counter() - t0, n_before, len(gm.graph.nodes)
            )
        )
    return gm


def _verify(gm: fx.GraphModule, step: Step, done: list[Step]) -> None:
    previous = ", ".join(s.name for s in done[:-1]) or "none"
    problems: list[str] = []
    try:
        gm.graph.lint()
        propagate_shapes(gm)
    except Exception as exc:
        problems.append(str(exc))
    if not problems:
        for s in done:
            problems += [f"[{s.name}] {p}" for p in s.postcondition(gm)]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        )
        raise AnefxGraphError(f"after pass {step.name}: {shown} (passes before it: {previous})")


def pipeline_stats(gm: fx.GraphModule, steps: list[Step]) -> dict:
    """The statistics the passes of STEPS add to the report (e.g. densify_experts: "moe")."""
    stats: dict = {}
    for step in steps:
        if step.summary is not None:
            stats.update(step.summary(gm) or {})
    return stats
