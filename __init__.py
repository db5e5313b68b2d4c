"""anefx: compile a stock Hugging Face Qwen model into an ANE-ready Core ML package.

result = anefx.convert("Qwen/Qwen3-0.6B", "out/qwen3-0.6b", context=512)  # the whole job
low = anefx.lower("preset:qwen3-tiny", seq_len=64, dtype=torch.float16)
low.report.render()          # constraint report of the lowered graph
logits = low.run(input_ids)  # runs the lowered fx graph in torch
anefx.emit(low, "out.mlpackage")
verdict = anefx.verify("out/qwen3-0.6b", "Qwen/Qwen3-0.6B")  # .passed against thresholds
"""

from anefx.errors import AnefxGraphError, AnefxInputError

__all__ = ["convert", "lower", "emit", "verify", "AnefxInputError", "AnefxGraphError"]


def __getattr__(name: str):
    # the real functions (one signature, one docstring), imported on first use so that
    # `import anefx` stays free of torch and coremltools
    if name == "convert":
        from anefx.conversion import convert

        return convert
    if name == "lower":
        from anefx.lowering.api import lower

        return lower
    if name == "emit":
        from anefx.targets.coreml import emit

        return emit
    if name == "verify":
        from anefx.targets.verify import verify

        return verify
    raise AttributeError(f"module 'anefx' has no attribute {name!r}")
