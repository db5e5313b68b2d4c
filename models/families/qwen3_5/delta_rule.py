"""The gated delta rule without loops, scatters or rank-5 tensors: what capture substitutes for
transformers' ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``.

transformers' chunked form pads S to 64 and unrolls a 63-step forward substitution with
scatters into rank-5 tensors (about 1100 ATen nodes per layer); its recurrent form writes each
token's output with select_scatter. Both compute, per value head with state S (dk, dv)::

    S <- S * exp(g_t);  delta = beta_t (v_t - S^T k_t);  S <- S + k_t delta^T;  o_t = S^T q_t

with q, k L2-normalised (``use_qk_l2norm_in_kernel``) and q scaled by dk^-1/2. The functions
here take the same arguments (batch 1) and compute the same function:

* S > 1, :func:`chunk_delta_rule`: the sequence (padded to a multiple of the chunk C with
  g = 0, beta = 0, which leaves the state unchanged) is cut into N chunks, all batched on one
  axis: (H, N, C, D), rank 4. Every cumulative sum of g is a matmul with a constant 0/1 matrix
  (prefix sums, suffix sums, and the pairwise sums sum_{j<l<=i} g_l), so there is no difference
  of two cumulative sums (fp16 cancellation) and every exp is of a value <= 0; masks are
  constants multiplied after the exp (no -inf). The unit lower-triangular (I + A) is inverted
  by block doubling, T <- T - T (A * M_b) T for b = 1, 2, .., C/2 (M_b the off-diagonal
  b-blocks of each 2b-block): exact, log2(C) steps, no power series (repeated squaring
  overflows fp16). The scan over the N chunks is unrolled (3 matmuls each).
* S == 1, :func:`recurrent_step`: the recurrence as three rank-4 matmuls on (1, H, ., .).

A padded prefill slot (``anefx_valid`` 0) gets beta = 0 and g = 0: it neither writes nor
decays the state. Constants are numpy-built, so export lifts them as constant tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from anefx.models.families.common import MROPE_SUBSTITUTION

# Chunk length of the prefill form: 16 measured best in fp16 with op-by-op rounding
# (qwen35-hybrid.md: 51.7 dB, 189 MIL ops for 64 tokens; chunks of 8: 209 ops).
CHUNK = 16

# The delta rule's output o feeds the gated RMSNorm (eps 1e-6, below fp16's smallest normal
# number: rounded to a subnormal it is off by about 1 %, which matters when o is small). Capture
# returns OUTPUT_SCALE * o (folded into q's dk^-1/2 scale: no extra op) and gives the norm
# eps * OUTPUT_SCALE^2: the same function exactly (RMSNorm is scale-invariant but for eps), with
# an eps fp16 holds to 3 digits. A power of two, so the scaling itself rounds nothing.
OUTPUT_SCALE = 16.0

SUBSTITUTIONS = (
    "gated delta rule: transformers' torch_chunk_gated_delta_rule (63-step loop with scatters, "
    "rank 5) and torch_recurrent_gated_delta_rule replaced by the loop-free chunked form and "
    "a rank-4 recurrent step (models/families/qwen3_5/delta_rule.py; equal to rounding, "
    "tests/test_delta_rule.py), its output scaled by 16 and the gated norm's eps by 256 (the "
    "same function; an eps fp16 holds)",
    MROPE_SUBSTITUTION,
)


def _constants(c: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """The constant 0/1 matrices of chunk length C (numpy-built: lifted by export)."""
    idx = np.arange(c)
    row, col = idx[:, None], idx[None, :]
    # pairwise[l, i*C + j] = 1 if j < l <= i: g @ pairwise = sum_{j<l<=i} g_l
    pairwise = (idx[None, :, None] >= idx[:, None, None]) & (
        idx[None, None, :] < idx[:, None, None]
    )
    found = {
        "prefix": row <= col,  # g @ prefix: sum_{l<=i} g_l
        "suffix": row > col,  # g @ suffix: sum_{l>i} g_l
        "pairwise": pairwise.reshape(c, c * c),
        "lower": row >= col,
        "strict": row > col,
        "eye": np.eye(c, dtype=bool),
        "ones": np.ones((c, 1), dtype=bool),  # g @ ones: the chunk's sum
    }
    b = 1
    while b < c:  # the off-diagonal lower b-blocks inside each 2b-block
        found[f"block{b}"] = (
            (row // (2 * b) == col // (2 * b)) & ((row // b) % 2 == 1) & ((col // b) % 2 == 0)
        )
        b *= 2
    return {
        k: torch.tensor(v.astype(np.float32), dtype=dtype, device=device) for k, v in found.items()
    }


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """transformers' l2norm (eps 1e-6), spelled as it is: x * rsqrt(sum(x^2) + eps)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _heads(query, key, value, g, beta, normalise: bool, dtype: torch.dtype, scale: float):
    """(1, S, H*, D) inputs -> (H, S, D) q, k, v and (H, S) g, beta in DTYPE; q scaled by
    SCALE * dk^-1/2, key heads repeated to the value heads (each key head serves Hv / Hk
    consecutive value heads)."""
    if query.shape[0] != 1:
        raise ValueError(f"the loop-free delta rule runs batch 1, got {query.shape[0]}")
    hk, hv = key.shape[2], value.shape[2]
    s = query.shape[1]
    q, k, v = (
        x.reshape(s, x.shape[2], x.shape[3]).transpose(0, 1).to(dtype) for x in (query, key, value)
    )
    if hk != hv:
        q, k = (x.repeat_interleave(hv // hk, dim=0) for x in (q, k))
    if normalise:
        q, k = l2_normalise(q), l2_normalise(k)
    q = q * (scale * q.shape[-1] ** -0.5)
    g, beta = (x.reshape(s, x.shape[2]).transpose(0, 1).to(dtype) for x in (g, beta))  # (H, S)
    return q, k, v, g, beta


def chunk_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = CHUNK,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    anefx_valid: torch.Tensor | None = None,
    output_scale: float = 1.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' torch_chunk_gated_delta_rule, loop-free (module docstring), its output
    times OUTPUT_SCALE. ANEFX_VALID (1, S), 1 for a real token and 0 for padding: padding
    leaves the state as it was."""
    in_dtype = query.dtype
    dt = torch.float32 if in_dtype == torch.float32 else in_dtype
    q, k, v, g, beta = _heads(query, key, value, g, beta, use_qk_l2norm_in_kernel, dt, output_scale)
    if anefx_valid is not None:
        keep = anefx_valid.reshape(1, -1).to(dt)
        g, beta = g * keep, beta * keep
    h, s, dk = k.shape
    dv = v.shape[-1]
    c = min(chunk_size, s)
    pad = (-s) % c
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (s + pad) // c
    m = _constants(c, dt, q.device)

    q, k, v = (x.reshape(h, n, c, x.shape[-1]) for x in (q, k, v))
    g4 = g.reshape(h, n, 1, c)
    beta4 = beta.reshape(h, n, c, 1)
    prefix = (g4 @ m["prefix"]).reshape(h, n, c, 1)  # sum_{l<=i} g_l <= 0
    suffix = (g4 @ m["suffix"]).reshape(h, n, c, 1)  # sum_{l>i} g_l <= 0
    pairwise = (g4 @ m["pairwise"]).reshape(h, n, c, c)  # sum_{j<l<=i} g_l <= 0
    decay = torch.exp(pairwise) * m["lower"]
    whole = torch.exp(g4 @ m["ones"])  # (h, n, 1, 1) the chunk's decay

    kb = k * beta4
    a = (kb @ k.transpose(-1, -2)) * (decay * m["strict"])
    t = m["eye"].expand(h, n, c, c)  # (I + A)^-1 by block doubling
    b = 1
    while b < c:
        t = t - t @ (a * m[f"block{b}"]) @ t
        b *= 2
    u = t @ (v * beta4)  # (h, n, c, dv)
    w = t @ (kb * torch.exp(prefix))  # (h, n, c, dk)
    intra = (q @ k.transpose(-1, -2)) * decay
    qd = q * torch.exp(prefix)
    kd = k * torch.exp(suffix)

    # the scan over chunks, unrolled (none when one chunk covers S); slices keep rank 4, and
    # no state (a stateless prefill) starts the scan without a zeros tensor
    state = None if initial_state is None else initial_state.reshape(h, 1, dk, dv).to(dt)
    outs = []
    for i in range(n):
        at = slice(i, i + 1)
        new = u[:, at] if state is None else u[:, at] - w[:, at] @ state
        inside = intra[:, at] @ new
        outs.append(inside if state is None else qd[:, at] @ state + inside)
        carried = kd[:, at].transpose(-1, -2) @ new
        state = carried if state is None else state * whole[:, at] + carried
    o = outs[0] if n == 1 else torch.cat(outs, dim=2)  # (h, 1, s + pad, dv)
    o = o.reshape(h, n * c, dv)
    if pad:
        o = o[:, :s]
    o = o.transpose(0, 1)[None].to(in_dtype)  # (1, S, H, dv)
    return o, (state.reshape(1, h, dk, dv) if output_final_state else None)


def recurrent_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    anefx_valid: torch.Tensor | None = None,
    output_scale: float = 1.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' torch_recurrent_gated_delta_rule for S == 1 as three rank-4 matmuls, its
    output times OUTPUT_SCALE; longer S goes to :func:`chunk_delta_rule` (the same function)."""
    if query.shape[1] != 1:
        return chunk_delta_rule(
            query,
            key,
            value,
            g,
            beta,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            anefx_valid=anefx_valid,
            output_scale=output_scale,
        )
    in_dtype = query.dtype
    dt = torch.float32 if in_dtype == torch.float32 else in_dtype
    q, k, v, g, beta = _heads(query, key, value, g, beta, use_qk_l2norm_in_kernel, dt, output_scale)
    if anefx_valid is not None:
        keep = anefx_valid.reshape(1, 1).to(dt)
        g, beta = g * keep, beta * keep
    h, _, dk = k.shape
    dv = v.shape[-1]
    q, k, v = q[None], k[None], v[None]  # (1, H, 1, D)
    state = (
        torch.zeros(1, h, dk, dv, dtype=dt, device=q.device)
        if initial_state is None
        else initial_state.to(dt)
    )
    state = state * torch.exp(g).reshape(1, h, 1, 1)
    delta = (v - k @ state) * beta.reshape(1, h, 1, 1)  # (1, H, 1, dv)
    state = state + k.reshape(1, h, dk, 1) @ delta
    o = (q @ state).transpose(1, 2).to(in_dtype)  # (1, 1, H, dv)
    return o, (state if output_final_state else None)
