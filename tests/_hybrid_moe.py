"""What tests/test_qwen3_next.py and tests/test_qwen3_5_moe.py check alike of a hybrid with
experts: a checkpoint folder's weights load as stored, its lowered graphs equal the stock model
(the stateful fp32 ones at rounding level at every position, the fp16 one >= 60 dB), greedy
decoding with the carried states equals transformers' `generate`, and a stateful package passes
the checker with at most one Core ML state per function and `verify` passes on the reference
executor."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import anefx
from anefx.core import rules
from anefx.generation import Session, lower_decoder
from anefx.models.load import load_model
from anefx.targets.coreml import check_package
from anefx.targets.reader import read_spec
from anefx.targets.verify import verify

VOCAB = 512
# what config inference must give back from the tensors alone
SHAPES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "layer_types",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
SEQ = 16  # the stateless graph's length
BATCH, CONTEXT = 8, 64  # the stateful prefill batch and context
PROMPT, STEPS = 13, 32  # a prompt longer than the batch, greedy steps


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """20 log10(max|ref| / RMSE), as `verify` reports it."""
    err = (ref.double() - out.double()).pow(2).mean().sqrt().item()
    return math.inf if err == 0 else 20 * math.log10(ref.abs().max().item() / err)


def stock_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The stock model's logits over TOKENS, no cache."""
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def assert_loads_as_stored(folder: Path, text: dict[str, torch.Tensor], model_class: str) -> None:
    """The folder loads into the family's stock class with exactly the text model's weights
    TEXT (a state dict as the causal LM names it)."""
    loaded = load_model(str(folder), dtype=torch.float32).model
    assert type(loaded).__name__ == model_class
    got = loaded.state_dict()
    assert got.keys() == text.keys()
    for key, tensor in text.items():
        assert torch.equal(got[key], tensor), key


def fp16_lowered(folder: Path, reference: torch.nn.Module) -> tuple[float, dict]:
    """(PSNR in dB, the report's MoE stats) of the fp16 stateless lowered graph of FOLDER, run
    in torch, against REFERENCE's fp32 logits; the graph has no checker error."""
    tokens = ids(SEQ, seed=1)
    low = anefx.lower(str(folder), seq_len=SEQ, dtype=torch.float16)
    assert not low.report.errors, low.report.render()
    return psnr(stock_logits(reference, tokens), low.run(tokens).float()), low.report.stats["moe"]


def fp32_decoder(folder: Path):
    """The lowered fp32 prefill (batch BATCH) and decode graphs of FOLDER, context CONTEXT."""
    return lower_decoder(str(folder), batch=BATCH, context=CONTEXT, dtype=torch.float32)


def stateful_error(decoder, reference: torch.nn.Module) -> float:
    """Max error, relative to the largest logit, of the stateful graphs against REFERENCE's
    one forward over the whole sequence: a prompt longer than the batch (a full prefill, then a
    padded one), then 8 decode steps, the conv and delta-rule states carried between calls."""
    tokens = ids(PROMPT + 8, seed=3)[0].tolist()
    session = Session(decoder)
    got = [session.feed_all(tokens[:PROMPT])]
    got += [session.feed_all([t]) for t in tokens[PROMPT:]]
    want = stock_logits(reference, torch.tensor([tokens]))[0]
    return ((torch.cat(got) - want).abs().max() / want.abs().max()).item()


def greedy_tokens(decoder, reference: torch.nn.Module) -> tuple[list[int], list[int]]:
    """(anefx's, transformers') greedy continuation, STEPS tokens, of a prompt longer than the
    batch: the lowered graphs carrying the conv and delta-rule states against `generate`."""
    prompt = ids(PROMPT, seed=2)[0].tolist()
    got = Session(decoder).generate(prompt, max_new_tokens=STEPS)
    with torch.no_grad():
        want = reference.generate(
            torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False
        )[0, PROMPT:].tolist()
    return got, want


def package_checked(folder: Path, out: Path):
    """A stateful package of FOLDER: every function holds at most one Core ML state (the full
    layers' K and V) and carries the rest, the checker finds no error in the emitted program;
    returns `verify`'s result on the reference executor."""
    done = anefx.convert(str(folder), out, context=CONTEXT, batch=BATCH, max_chunk_mb=10_000)
    assert done.errors == 0 and done.kind == "package"
    spec = read_spec(out)
    for fn in spec.description.functions:
        assert len(list(fn.state)) <= rules.MAX_STATES_PER_PROGRAM, fn.name
        inputs = {i.name for i in fn.input}
        outputs = {o.name for o in fn.output}
        carried = {n for n in inputs if n.startswith(("conv_state_", "rec_state_"))}
        assert carried and {f"{n}_out" for n in carried} <= outputs, fn.name
    for report in check_package(out):
        assert not report.errors, report.render()
    return verify(out, str(folder), ids=ids(11, seed=4)[0].tolist(), steps=8)
