"""anefx: compile a stock Hugging Face Qwen model into an ANE-ready Core ML package.

low = anefx.lower("preset:qwen3-tiny", seq_len=64, dtype=torch.float16)
low.report.render()          # constraint report of the lowered graph
logits = low.run(input_ids)  # runs the lowered fx graph in torch
anefx.emit(low, "out.mlpackage")
"""

from anefx.errors import AnefxGraphError, AnefxInputError

__all__ = ["lower", "emit", "AnefxInputError", "AnefxGraphError"]


def lower(model: str, seq_len: int = 64, dtype=None, meta: bool = False, seed: int = 0):
    """Load MODEL (a checkpoint folder or ``preset:NAME``), capture and lower it."""
    from anefx.lowering.api import lower as _lower

    return _lower(model, seq_len=seq_len, dtype=dtype, meta=meta, seed=seed)


def emit(lowered, path: str, force: bool = False):
    """Write the lowered model as a Core ML package at PATH (atomically)."""
    from anefx.targets.coreml import emit as _emit

    return _emit(lowered, path, force=force)
