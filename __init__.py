"""anefx: compile a stock Hugging Face Qwen model into an ANE-ready Core ML package.

low = anefx.lower("preset:qwen3-tiny", seq_len=64, dtype=torch.float16)
low.report.render()          # constraint report of the lowered graph
logits = low.run(input_ids)  # runs the lowered fx graph in torch
anefx.emit(low, "out.mlpackage")
"""

from anefx.errors import AnefxGraphError, AnefxInputError

__all__ = ["lower", "emit", "AnefxInputError", "AnefxGraphError"]


def __getattr__(name: str):
    # lower and emit are the real functions (one signature, one docstring), imported on first
    # use so that `import anefx` stays free of torch and coremltools
    if name == "lower":
        from anefx.lowering.api import lower

        return lower
    if name == "emit":
        from anefx.targets.coreml import emit

        return emit
    raise AttributeError(f"module 'anefx' has no attribute {name!r}")
