"""The stock Qwen3.5 hybrid (Gated DeltaNet layers beside gated attention), two ways.

As capture hands it to the passes (transformers' delta rule swapped for the loop-free one,
models/families/qwen3_5/delta_rule.py), the passes lower every op: no violation is left but
fp32 itself in a parity graph, and nothing is reported as left by a pass.

With that substitution switched off, the layer is one the passes do not know (transformers'
chunked delta rule: an unrolled loop of scatters into rank-5 tensors, a cumulative sum, an
in-graph mask): the pipeline still lowers to the end with a full report instead of aborting;
every pass leaves what it cannot lower, says so, and the checker names each such op with its
rule, module and the pass that left it. Either way the lowered graph computes what
transformers computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter

import pytest
import torch

import anefx
from anefx.models.families import FAMILIES

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


def _computes_the_model(hybrid, low, dtype) -> None:
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hybrid(input_ids=ids, use_cache=False).logits
    err = (low.run(ids).float() - ref).abs().max().item()
    assert err < (2e-5 if dtype == torch.float32 else 5e-3), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_stock_hybrid_lowers_with_nothing_left(hybrid, dtype) -> None:
    low = anefx.lower(hybrid, seq_len=8, dtype=dtype)
    # an fp32 parity graph breaks the fp16 rule everywhere, by design; nothing else is left
    errors = [v for v in low.report.errors if not (dtype == torch.float32 and v.rule == "fp16")]
    assert not errors, low.report.render()
    # no op is left unlowered: what a pass left is a layout copy the sweep could not remove,
    # in the delta-rule layers only (in fp32 its note rides on that value's fp16 error)
    left = [v for v in low.report.violations if "(left by " in v.message]
    assert all(v.rule == "fp16" and "(left by sink_layout_changes" in v.message for v in left)
    copies = low.report.stats.get("layout_changes_left", {"modules": []})["modules"]
    assert all(m.endswith(".linear_attn") for m in copies), copies
    _computes_the_model(hybrid, low, dtype)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, marks=pytest.mark.slow), torch.float16]
)
def test_an_unknown_architecture_is_reported_not_aborted(hybrid, dtype, monkeypatch) -> None:
    family = FAMILIES[hybrid.config.model_type]
    # transformers' own delta rule, as a model the passes were not written for would bring it
    stock = dataclasses.replace(family, capture_context=lambda model: contextlib.nullcontext())
    monkeypatch.setitem(FAMILIES, hybrid.config.model_type, stock)
    low = anefx.lower(hybrid, seq_len=8, dtype=dtype)
    rules = Counter(v.rule for v in low.report.errors)
    # what stands in the way, named: the unrolled loop (scatters, rank-5 tensors), its
    # cumulative sum, its in-graph mask, and ops with no Core ML translation
    assert {"rank", "scatter", "routing", "in_graph_mask", "unsupported_op"} <= set(rules)
    left = [v for v in low.report.errors if "(left by " in v.message]
    assert left, "no violation says which pass left its op"
    assert {v.message.split("(left by ")[1].split(":")[0] for v in left} <= {
        "rms_norm_to_layer_norm",
        "l2_norm_to_layer_norm",
        "limit_rank",
        "sink_layout_changes",
    }
    # beside fp32 itself (the fp16 rule), every error is in the delta rule's layers: the
    # passes lowered the rest (the MLPs, the norms, the gated attention)
    modules = {v.module for v in low.report.errors if v.rule != "fp16"}
    assert modules and all(m and m.endswith(".linear_attn") for m in modules), modules
    _computes_the_model(hybrid, low, dtype)
