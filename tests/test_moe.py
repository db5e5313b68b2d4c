"""Mixture of experts (Qwen3-MoE, and Qwen2-MoE's shared expert): the dense rewrite computes
what transformers computes.

Random tiny Qwen3MoeForCausalLM models (experts, top-k, expert width, renormalised or not,
dense layers mixed in, sequence lengths down to 1, expert groups forced small) are lowered and
compared with the stock model; so are random Qwen2MoeForCausalLM models, whose blocks add a
sigmoid-gated shared expert of its own width (the report counts it in the compute multiplier);
the fp16 package passes the checker; greedy decoding with the KV cache equals transformers'
generate; a block the pass does not understand is reported, not silently lowered.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import transformers
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import anefx
from anefx.core import rules
from anefx.generation import Session, lower_decoder
from anefx.passes.densify_experts import densify_experts
from anefx.targets.coreml import emit

VOCAB = 512


def moe_model(
    experts: int = 8,
    top_k: int = 2,
    inter: int = 32,
    hidden: int = 64,
    layers: int = 2,
    norm_topk: bool = True,
    mlp_only_layers: tuple[int, ...] = (),
    act: str = "silu",
    seed: int = 0,
) -> torch.nn.Module:
    """A random-weight Qwen3MoeForCausalLM; the router's weights are large enough that its
    probabilities differ clearly (no near-ties for the top-k to fall between)."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=inter,
        norm_topk_prob=norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=list(mlp_only_layers),
        hidden_act=act,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if name.endswith("mlp.gate.weight") else 0.15)
    return model


def shared_moe_model(
    experts: int,
    top_k: int,
    inter: int,
    shared: int,
    norm_topk: bool = False,
    mlp_only_layers: tuple[int, ...] = (),
    sparse_step: int = 1,
    seed: int = 0,
) -> torch.nn.Module:
    """A random-weight Qwen2MoeForCausalLM (q/k/v bias, a sigmoid-gated shared expert of width
    SHARED beside the routed ones), routers scaled as in moe_model."""
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=norm_topk,
        decoder_sparse_step=sparse_step,
        mlp_only_layers=list(mlp_only_layers),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if name.endswith("mlp.gate.weight") else 0.15)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _logits_close(model, low, seq: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, seq), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
    got = low.run(ids).float()
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 2e-5 * max(scale, 1.0), "dense MoE != model"


@given(
    experts=st.integers(2, 12),
    top_k=st.integers(1, 4),
    inter=st.sampled_from([8, 16, 24]),
    seq=st.sampled_from([1, 5, 16]),
    norm_topk=st.booleans(),
    dense_layer=st.booleans(),
    small_groups=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=8, phases=[Phase.explicit, Phase.generate])  # a capture each: no shrinking
def test_dense_experts_match_the_model(
    experts, top_k, inter, seq, norm_topk, dense_layer, small_groups, seed
) -> None:
    top_k = min(top_k, experts)
    model = moe_model(
        experts, top_k, inter, norm_topk=norm_topk, mlp_only_layers=(0,) if dense_layer else ()
    )
    with pytest.MonkeyPatch.context() as mp:
        if small_groups:  # force several expert groups: 2 experts per conv
            mp.setattr(rules, "MAX_CONV_OUT_CHANNELS", 2 * inter)
        low = anefx.lower(model, seq_len=seq, dtype=torch.float32)
    moe = low.report.stats["moe"]
    sparse = 1 if dense_layer else 2
    assert moe["blocks"] == sparse and "unmatched" not in moe
    assert moe["compute_multiplier"] == experts / top_k
    assert "shared_expert_width" not in moe  # the residual add is no shared expert
    if small_groups:
        assert moe["expert_groups"] == -(-experts // 2)
    counts = low.report.counts()
    assert "routing" not in counts and counts.get("gather") == 1, counts  # the embedding only
    _logits_close(model, low, seq, seed)
    assert not densify_experts(low.graph_module).modified  # idempotent


@given(
    experts=st.integers(2, 12),
    top_k=st.integers(1, 4),
    inter=st.sampled_from([8, 16, 24]),
    shared=st.sampled_from([8, 40, 96]),
    seq=st.sampled_from([1, 5, 16]),
    norm_topk=st.booleans(),
    dense=st.sampled_from(["none", "mlp_only_layers", "decoder_sparse_step"]),
    small_groups=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=8, phases=[Phase.explicit, Phase.generate])  # a capture each: no shrinking
def test_shared_expert_blocks_match_the_model(
    experts, top_k, inter, shared, seq, norm_topk, dense, small_groups, seed
) -> None:
    """Routed experts plus a sigmoid-gated shared expert (Qwen2-MoE's block): the dense form
    equals transformers, and the multiplier counts the shared expert on both sides."""
    top_k = min(top_k, experts)
    model = shared_moe_model(
        experts,
        top_k,
        inter,
        shared,
        norm_topk=norm_topk,
        mlp_only_layers=(0,) if dense == "mlp_only_layers" else (),
        sparse_step=2 if dense == "decoder_sparse_step" else 1,  # layer 1 only is sparse
        seed=seed,
    )
    with pytest.MonkeyPatch.context() as mp:
        if small_groups:
            mp.setattr(rules, "MAX_CONV_OUT_CHANNELS", 2 * inter)
        low = anefx.lower(model, seq_len=seq, dtype=torch.float32)
    moe = low.report.stats["moe"]
    assert moe["blocks"] == (2 if dense == "none" else 1) and "unmatched" not in moe
    # (E I + Is) / (k I + Is): every expert runs densely, the shared one runs either way
    want = Fraction(experts * inter + shared, top_k * inter + shared)
    assert Fraction(moe["compute_multiplier"]).limit_denominator(10**6) == want
    assert moe["shared_expert_width"] == shared and moe["shared_expert_gated"] is True
    assert f"+ a gated shared expert of width {shared}" in low.report.render()
    counts = low.report.counts()
    assert "routing" not in counts and counts.get("gather") == 1, counts
    _logits_close(model, low, seq, seed)
    assert not densify_experts(low.graph_module).modified


def test_fp16_package_has_no_errors_and_states_the_multiplier(tmp_path) -> None:
    model = moe_model(experts=8, top_k=2)
    low = anefx.lower(model, seq_len=16, dtype=torch.float16)
    assert not low.report.errors, low.report.render()
    assert "every expert evaluated densely, expert compute x4" in low.report.render()
    for i in range(2):  # the 3-D expert weights were replaced by their grouped copies: freed
        assert not hasattr(low.graph_module, f"model_layers_{i}_mlp_experts_gate_up_proj")
        assert not hasattr(low.graph_module, f"model_layers_{i}_mlp_experts_down_proj")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    err = (low.run(ids).float() - ref).pow(2).mean()
    psnr = 10 * torch.log10(ref.abs().max() ** 2 / err).item()
    assert psnr >= 60.0, psnr
    result = emit(low, tmp_path / "moe.mlpackage")
    (rep,) = result["emitted_reports"]
    assert not rep.errors, rep.render()
    assert "routing" not in rep.counts() and rep.stats["op_types"].get("greater")


def test_greedy_decoding_with_the_cache_matches_generate() -> None:
    model = moe_model(experts=6, top_k=2, layers=2, seed=3)
    dec = lower_decoder(model, batch=8, context=64, dtype=torch.float32)
    for prompt_len in (3, 11):
        prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator()).tolist()
        want = model.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, prompt_len:].tolist()
        assert Session(dec).generate(prompt, max_new_tokens=32) == want


def test_block_not_understood_is_reported() -> None:
    """relu2 squares with pow between the expert matmuls: not elementwise-safe for the pass."""
    model = moe_model(experts=4, top_k=2, layers=1, act="relu2")
    low = anefx.lower(model, seq_len=4, dtype=torch.float16)
    moe = low.report.stats["moe"]
    assert moe["blocks"] == 0 and len(moe["unmatched"]) == 1
    assert moe["unmatched"][0]["module"] == "model.layers.0.mlp"
    assert "not elementwise" in moe["unmatched"][0]["reason"]
    routing = [v for v in low.report.errors if v.rule == "routing"]
    assert routing and all(v.module.startswith("model.layers.0.mlp") for v in routing)
    assert "not densified" in low.report.render()
