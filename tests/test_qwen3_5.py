"""Qwen3.5 hybrids through the stateful pipeline, in torch: the lowered prefill and decode graphs
of a tiny random hybrid (more value heads than key heads, dk != dv, full attention at an
irregular place) equal transformers: logits, greedy tokens of `generate` for prompts shorter
than, equal to and longer than the prefill batch, teacher-forced decode steps; padded slots
leave every state as it was; a prefill that would pass the end of the context becomes single
steps; rewinding restores the states; each program holds one state."""

from __future__ import annotations

import math

import pytest
import torch

from anefx.core.signature import pack_states
from anefx.generation import Session, lower_decoder
from anefx.models.capture import context_mask
from anefx.models.families import FAMILIES
from anefx.models.presets import get_preset

transformers = pytest.importorskip("transformers")

FAMILY = FAMILIES["qwen3_5_text"]
BATCH, CONTEXT = 8, 96


def _model(preset: str = "qwen3.5-tiny") -> torch.nn.Module:
    raw = {k: v for k, v in get_preset(preset).items() if k not in ("model_type", "architectures")}
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**raw)).eval()
    with torch.no_grad():  # the norms' weights are 0 (zero-centred) or 1 at init: vary them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model()


@pytest.fixture(scope="module")
def fp32(model):
    return lower_decoder(model, batch=BATCH, context=CONTEXT, dtype=torch.float32)


@pytest.fixture(scope="module")
def fp16(model):
    return lower_decoder(model, batch=BATCH, context=CONTEXT, dtype=torch.float16)


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    err = (ref.double() - out.double()).pow(2).mean().sqrt().item()
    return math.inf if err == 0 else 20 * math.log10(ref.abs().max().item() / err)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """transformers' logits of every position, one forward over the whole sequence."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def test_signature_states_and_one_state_per_program(fp32) -> None:
    for low in (fp32.prefill, fp32.decode):
        sig = low.signature
        layers = low.config.layer_types
        assert sig.states == FAMILY.states(low.config, CONTEXT, "float32")
        kinds = {s.kind for s in sig.states}
        assert kinds == {"conv", "recurrent", "key", "value"}
        assert all(s.carried == (s.kind in ("conv", "recurrent")) for s in sig.states)
        assert {s.layers[0] for s in sig.carried} == {
            i for i, t in enumerate(layers) if t == "linear_attention"
        }
        assert len(pack_states(sig.states)) == 1  # the full layers' K and V, packed
        assert "state_count" not in {v.rule for v in low.report.errors}
        assert any("gated delta rule" in s for s in low.report.stats["substitutions"])


@pytest.mark.parametrize("n", [5, BATCH, 13])
def test_greedy_tokens_equal_transformers_generate(model, fp32, n: int) -> None:
    ids = _ids(n, seed=n)
    with torch.no_grad():
        want = model.generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, n:].tolist()
    assert Session(fp32).generate(ids, max_new_tokens=32) == want


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_teacher_forced_decode_steps(model, request, dtype: str) -> None:
    """A prompt (a padded prefill), then 64 decode steps fed the reference's tokens: every
    step's logits against transformers on the whole sequence."""
    decoder = request.getfixturevalue(dtype)
    ids = _ids(5 + 64, seed=11)
    session = Session(decoder)
    got = session.feed_all(ids).float()
    want = _teacher_forced(model, ids)
    if dtype == "fp32":
        assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    else:
        assert _psnr(want, got) >= 60


def _reference_states(model, ids: list[int]):
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return cache


def test_padded_slots_leave_every_state_as_it_was(model, fp32) -> None:
    """A prefill of 3 real tokens of 8, from a state that is already in use: the conv windows
    and delta-rule states equal transformers' after those tokens alone (whatever the padding's
    ids), and the KV slots of real positions hold their rows."""
    first, real = _ids(BATCH, seed=1), _ids(3, seed=2)
    session = Session(fp32)
    session.feed_all(first)
    states = []
    for pad_id in (0, 7):
        low = fp32.prefill
        pos = torch.tensor([[*range(BATCH, BATCH + 3)] + [CONTEXT] * (BATCH - 3)])
        ids = torch.tensor([real + [pad_id] * (BATCH - 3)])
        with torch.no_grad():
            out = low.graph_module(
                ids.int(), pos.int(), context_mask(pos, CONTEXT), *session.states
            )
        states.append(out[len(out) - len(session.states) :])
    ref = _reference_states(model, first + real)
    sig = fp32.prefill.signature
    window = model.config.linear_conv_kernel_dim - 1
    for spec, a, b in zip(sig.states, *states, strict=True):
        layer = ref.layers[spec.layers[0]]
        if spec.kind == "conv":
            want = layer.conv_states[0][..., -window:]
        elif spec.kind == "recurrent":
            want = layer.recurrent_states[0]
        else:
            rows = layer.keys if spec.kind == "key" else layer.values
            want = rows.transpose(-1, -2)
            a, b = a[..., : BATCH + 3], b[..., : BATCH + 3]
        assert torch.equal(a, b), f"{spec.name} depends on the padding's ids"
        assert (a - want).abs().max().item() < 1e-4, spec.name


def test_prefill_past_the_context_end_becomes_single_steps(model) -> None:
    """With carried states a call never starts before the position (a recurrent state cannot
    take a token twice): near the end of the context the tokens go one by one, and the
    tokens still equal transformers' up to the full context."""
    decoder = lower_decoder(model, batch=BATCH, context=16, dtype=torch.float32)
    ids = _ids(11, seed=4)  # 8 + 3: the second call would need slots 8..15, then 16 is full
    session = Session(decoder)
    got = session.generate(ids, max_new_tokens=32)
    assert session.stop_reason.kind == "context_full" and len(got) == 16 - 11 + 1
    with torch.no_grad():
        want = model.generate(
            torch.tensor([ids]), max_new_tokens=len(got), min_new_tokens=len(got), do_sample=False
        )[0, 11:].tolist()
    assert got == want


def test_rewind_restores_the_states(fp32) -> None:
    """Two turns, then back to the end of the first (a snapshot) and to a point inside it (a
    snapshot, then tokens fed again): the next tokens equal a fresh session's."""
    turn1, turn2 = _ids(10, seed=5), _ids(6, seed=6)
    session = Session(fp32)
    reply = session.generate(turn1, max_new_tokens=4)
    session.generate(turn2, max_new_tokens=4)
    for keep in (len(turn1) + len(reply), 7, 0):
        history = (turn1 + reply)[:keep]
        session.rewind(keep)
        assert session.position == keep
        fresh = Session(fp32)
        if history:
            fresh.feed_all(history)
        assert session.generate(turn2, max_new_tokens=6) == fresh.generate(turn2, max_new_tokens=6)
        session.rewind(keep)
