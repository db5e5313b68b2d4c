"""anefx: compile a stock Hugging Face Qwen model into an ANE-ready Core ML package.

low = anefx.lower("preset:qwen3-tiny", seq_len=64, dtype=torch.float16)
low.report.render()          # constraint report of the lowered graph
logits = low.run(input_ids)  # runs the lowered fx graph in torch
anefx.emit(low, "out.mlpackage")
"""

from anefx.errors import AnefxGraphError, AnefxInputError

__all__ = ["lower", "emit", "AnefxInputError", "AnefxGraphError"]


def lower(
    model,
    seq_len: int = 64,
    dtype=None,
    meta: bool = False,
    seed: int = 0,
    raw_report: bool = False,
    context: int | None = None,
    argmax: bool = False,
    repeat: bool = True,
):
    """Load MODEL (a checkpoint folder, ``preset:NAME`` or a transformers model), capture it
    and lower it; DTYPE float16 (default) or float32. Returns an ``anefx.lowering.api.Lowered``.
    """
    from anefx.lowering.api import lower as _lower

    return _lower(
        model,
        seq_len=seq_len,
        dtype=dtype,
        meta=meta,
        seed=seed,
        raw_report=raw_report,
        context=context,
        argmax=argmax,
        repeat=repeat,
    )


def emit(lowered, path: str, force: bool = False) -> dict:
    """Write the lowered model as a Core ML package at PATH (atomically), with report.json
    beside it; returns the report as a dict."""
    from anefx.targets.coreml import emit as _emit

    return _emit(lowered, path, force=force)
