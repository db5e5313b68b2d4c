"""The loop-free gated delta rule capture substitutes for transformers' (models/families/qwen3_5/
delta_rule.py) computes transformers' function: on random shapes (sequence length, key and
value heads, dk != dv, chunk length), decays from none to underflowing, with and without a
previous state; padded slots leave the state exactly as it was; no exp of a positive value."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anefx.models.families.qwen3_5 import delta_rule

modeling = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")


def _unwrapped(fn):
    """transformers' reference function beneath its kernel-hub wrapper."""
    return getattr(fn, "__wrapped__", fn)


REF_CHUNK = _unwrapped(modeling.torch_chunk_gated_delta_rule)
REF_STEP = _unwrapped(modeling.torch_recurrent_gated_delta_rule)


def _inputs(seed: int, s: int, hk: int, ratio: int, dk: int, dv: int, decay: float, state: bool):
    g = torch.Generator().manual_seed(seed)
    hv = hk * ratio
    q = torch.randn(1, s, hk, dk, generator=g)
    k = torch.randn(1, s, hk, dk, generator=g)
    v = torch.randn(1, s, hv, dv, generator=g)
    # g <= 0 as the model makes it (-exp(A_log) * softplus(.)); DECAY scales it, up to
    # decays that underflow exp in fp32
    gate = -decay * torch.rand(1, s, hv, generator=g)
    beta = torch.rand(1, s, hv, generator=g)
    initial = torch.randn(1, hv, dk, dv, generator=g) if state else None
    return q, k, v, gate, beta, initial


shapes = st.tuples(
    st.integers(0, 2**16),  # seed
    st.integers(2, 40),  # S
    st.integers(1, 3),  # key heads
    st.sampled_from([1, 2, 3]),  # value heads per key head
    st.integers(2, 12),  # dk
    st.integers(2, 12),  # dv
    st.sampled_from([0.0, 0.05, 1.0, 30.0]),  # decay scale
    st.booleans(),  # a previous state
)


@settings(max_examples=40, deadline=None)
@given(case=shapes, chunk=st.sampled_from([2, 3, 4, 8, 16, 64]))
def test_chunked_form_equals_transformers(case, chunk: int) -> None:
    q, k, v, gate, beta, initial = _inputs(*case)
    want, want_state = REF_CHUNK(
        q, k, v, gate, beta, initial_state=initial, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    got, got_state = delta_rule.chunk_delta_rule(
        q, k, v, gate, beta, chunk_size=chunk, initial_state=initial, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    assert got.shape == want.shape and got_state.shape == want_state.shape
    scale = 1 + want.abs().max().item()
    assert (got - want).abs().max().item() < 2e-5 * scale
    assert (got_state - want_state).abs().max().item() < 2e-5 * (1 + want_state.abs().max().item())


@settings(max_examples=25, deadline=None)
@given(case=shapes)
def test_recurrent_step_equals_transformers(case) -> None:
    seed, _, hk, ratio, dk, dv, decay, _ = case
    q, k, v, gate, beta, initial = _inputs(seed, 1, hk, ratio, dk, dv, decay, True)
    want, want_state = REF_STEP(
        q, k, v, gate, beta, initial_state=initial, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    got, got_state = delta_rule.recurrent_step(
        q, k, v, gate, beta, initial_state=initial, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    assert (got - want).abs().max().item() < 1e-5 * (1 + want.abs().max().item())
    assert (got_state - want_state).abs().max().item() < 1e-5 * (1 + want_state.abs().max())


@settings(max_examples=20, deadline=None)
@given(case=shapes, real=st.integers(0, 40), chunk=st.sampled_from([4, 16]))
def test_padded_slots_leave_the_state_as_it_was(case, real: int, chunk: int) -> None:
    """Real tokens first, padding after (as generation.py feeds a prefill): outputs of the real
    tokens and the final state equal transformers on the real tokens alone."""
    q, k, v, gate, beta, initial = _inputs(*case[:-1], True)
    s = q.shape[1]
    real = min(real, s)
    valid = (torch.arange(s) < real).float()[None]
    got, got_state = delta_rule.chunk_delta_rule(
        q, k, v, gate, beta, chunk_size=chunk, initial_state=initial, output_final_state=True,
        use_qk_l2norm_in_kernel=True, anefx_valid=valid,
    )  # fmt: skip
    if real == 0:
        assert torch.equal(got_state, initial)
        return
    want, want_state = REF_CHUNK(
        q[:, :real], k[:, :real], v[:, :real], gate[:, :real], beta[:, :real],
        initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    assert (got[:, :real] - want).abs().max().item() < 2e-5 * (1 + want.abs().max().item())
    assert (got_state - want_state).abs().max().item() < 2e-5 * (1 + want_state.abs().max())


def test_every_exp_is_of_a_value_at_most_zero(monkeypatch) -> None:
    """The chunked form takes exp only of sums of g (<= 0): no overflow in fp16, no -inf
    masking (transformers' form masks with -inf before its exp)."""
    seen: list[float] = []
    real_exp = torch.exp

    def spy(x, *args, **kwargs):
        seen.append(x.max().item())
        return real_exp(x, *args, **kwargs)

    monkeypatch.setattr(torch, "exp", spy)
    q, k, v, gate, beta, initial = _inputs(5, 37, 2, 2, 8, 6, 1.0, True)
    delta_rule.chunk_delta_rule(q, k, v, gate, beta, chunk_size=8, initial_state=initial)
    delta_rule.recurrent_step(q[:, :1], k[:, :1], v[:, :1], gate[:, :1], beta[:, :1], initial)
    assert seen and max(seen) <= 0.0


def test_fp16_close_to_fp32_transformers() -> None:
    """Every op in fp16 (torch CPU accumulates fp16 matmuls in fp32, so this bounds the ANE's
    fp16 accumulation from above; the package's own figure comes from the executor)."""
    q, k, v, gate, beta, initial = _inputs(7, 64, 2, 2, 32, 32, 1.0, True)
    want, _ = REF_CHUNK(q, k, v, gate, beta, initial_state=initial, use_qk_l2norm_in_kernel=True)
    half = [x.half() for x in (q, k, v, gate, beta, initial)]
    got, _ = delta_rule.chunk_delta_rule(*half[:5], initial_state=half[5],
                                         use_qk_l2norm_in_kernel=True)  # fmt: skip
    err = (got.float() - want).pow(2).mean().sqrt()
    psnr = 20 * torch.log10(want.abs().max() / err).item()
    assert psnr > 55, psnr
