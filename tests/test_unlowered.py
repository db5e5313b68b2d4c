"""A model the passes do not know (the stock Qwen3.5 hybrid: Gated DeltaNet layers beside gated
attention) lowers to the end with a full report instead of aborting: every pass leaves what it
cannot lower, says so, and the checker names each such op with its rule, module and the pass
that left it; the lowered graph still computes what transformers computes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import anefx

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hybrid():
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
    )
    torch.manual_seed(0)
    return transformers.Qwen3_5ForCausalLM(cfg).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_unknown_architecture_is_reported_not_aborted(hybrid, dtype) -> None:
    low = anefx.lower(hybrid, seq_len=8, dtype=dtype)
    rules = Counter(v.rule for v in low.report.errors)
    # what stands in the way, named: the delta rule's unrolled loop (scatters, rank-5
    # tensors), its cumulative sum, the L2 norms (rsqrt), and ops with no Core ML translation
    assert {"rank", "scatter", "routing", "rms_pow_rsqrt", "unsupported_op"} <= set(rules)
    left = [v for v in low.report.errors if "(left by " in v.message]
    assert left, "no violation says which pass left its op"
    assert {v.message.split("(left by ")[1].split(":")[0] for v in left} <= {
        "rms_norm_to_layer_norm",
        "limit_rank",
        "sink_layout_changes",
    }
    # beside fp32 itself (the fp16 rule), no error is in an MLP: the passes lowered those
    assert not any(".mlp" in (v.module or "") for v in low.report.errors if v.rule != "fp16")
    assert any(".linear_attn" in (v.module or "") for v in low.report.errors)
    # and the graph still computes the model
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hybrid(input_ids=ids, use_cache=False).logits
    err = (low.run(ids).float() - ref).abs().max().item()
    assert err < (2e-5 if dtype == torch.float32 else 5e-3), err
