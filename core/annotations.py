"""Per-node annotations the stages share: why a pass left a node as it is.

A pass that meets what it cannot lower leaves it in the graph and says why here; its
postcondition skips the node, the pipeline goes on, and the checker's violation for the node
carries the reason (lowering/checker.py), so the report says op by op what stands in the way.
"""

from __future__ import annotations

import torch.fx as fx

_UNLOWERED = "anefx_unlowered"
# Where a node comes from, as capture records it: the module path ("model.layers.3.mlp"), the
# transformers class of that module ("Qwen3MoeSparseMoeBlock", the report's blocking
# constructs) and torch.export's stack. A node a pass creates in place of another inherits them.
MODULE = "anefx_module"
MODULE_CLASS = "anefx_module_class"
PROVENANCE = (MODULE, MODULE_CLASS, "nn_module_stack")


def mark_unlowered(node: fx.Node, pass_name: str, reason: str) -> None:
    """Record that PASS_NAME left NODE as it is, and why."""
    node.meta[_UNLOWERED] = f"{pass_name}: {reason}"


def unlowered(node: fx.Node) -> str | None:
    """Why a pass left NODE unlowered, or None."""
    return node.meta.get(_UNLOWERED)
