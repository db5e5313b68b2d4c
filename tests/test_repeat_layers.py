"""Exporting a few layers and repeating them in the graph equals exporting every layer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers

import anefx
import anefx.models.capture as capture_mod
from anefx.core.signature import signature_of
from anefx.models.capture import capture, example_inputs
from anefx.models.repeat_layers import RepeatError, prefix_length

VOCAB, SEQ, CONTEXT = 256, 8, 32


def _model(kind: str, layers: int, mlp_only: list[int] | None = None) -> torch.nn.Module:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    if kind == "moe":
        config = transformers.Qwen3MoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=mlp_only or [],
            **common,
        )
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "hybrid":  # Qwen3.5: linear, linear, full, linear, ... (irregular)
        from anefx.models.presets import get_preset

        raw = get_preset("qwen3.5-tiny")
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
        kinds = ["linear_attention", "linear_attention", "full_attention"]
        raw.update(
            num_hidden_layers=layers, layer_types=(kinds * layers)[:layers], vocab_size=VOCAB
        )
        config, cls = transformers.Qwen3_5TextConfig(**raw), transformers.Qwen3_5ForCausalLM
    elif kind == "qwen2":
        common.pop("head_dim")
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.Qwen3Config(**common), transformers.Qwen3ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(layers)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if kind == "hybrid" and not name.endswith("norm.weight"):
                continue  # the delta rule's decays and gates as initialised: in range
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)  # distinct layers, distinct norms
    return model


def _extra(cap) -> dict:
    """The hybrid's stateful graph also takes which slots are valid (all of them here)."""
    names = [n.target for n in cap.graph_module.graph.nodes if n.op == "placeholder"]
    return {"anefx_valid": torch.ones(1, SEQ)} if "anefx_valid" in names else {}


def _run(cap, seed: int) -> tuple[torch.Tensor, ...]:
    gm = cap.graph_module
    _, pos, mask = example_inputs(SEQ, torch.float32, "cpu", cap.context)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g, dtype=torch.int32)
    states = [torch.randn(s.shape, generator=g) for s in signature_of(gm).states]
    out = gm(ids, pos, mask, *states, **_extra(cap))
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize(
    "kind, layers, mlp_only, exported, context",
    [
        ("qwen3", 5, None, 2, None),
        ("qwen3", 5, None, 2, CONTEXT),
        ("qwen2", 4, None, 2, None),
        ("moe", 5, [0, 3], 4, CONTEXT),  # the dense kind must come after layer 0: layer 3
        ("moe", 4, [1], 3, None),
        ("hybrid", 7, None, 3, None),
        ("hybrid", 5, None, 3, CONTEXT),  # conv, recurrent and K/V states per layer
    ],
)
def test_repeated_equals_full_export(kind, layers, mlp_only, exported, context) -> None:
    model = _model(kind, layers, mlp_only)
    fast = capture(model, seq_len=SEQ, context=context)
    full = capture(model, seq_len=SEQ, context=context, repeat=False)
    assert fast.exported_layers == exported
    assert full.exported_layers == layers
    assert signature_of(fast.graph_module) == signature_of(full.graph_module)
    for seed in (0, 1):
        a, b = _run(fast, seed), _run(full, seed)
        assert len(a) == len(b) == (1 + 2 * layers if context else 1)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    # every repeated node points at its own layer
    modules = {n.meta.get("anefx_module") for n in fast.graph_module.graph.nodes}
    last = "linear_attn" if kind == "hybrid" and (layers - 1) % 3 != 2 else "self_attn"
    assert f"model.layers.{layers - 1}.{last}" in modules
    assert len(model.model.layers) == model.config.num_hidden_layers == layers  # restored


def test_repeated_hybrid_lowers_to_the_full_exports_graph() -> None:
    """After the passes too: a constant a layer's code makes is the layer's own in the repeated
    graph as in a full export (shared, CSE merged the layers' uses of it: one node fewer per
    repeated linear layer than the full export lowers to)."""
    model = _model("hybrid", 5)
    fast, full = (anefx.lower(model, seq_len=32, dtype=torch.float32, repeat=r) for r in (1, 0))
    assert fast.exported_layers == 3 and full.exported_layers == 5

    def targets(low) -> Counter:
        return Counter(str(n.target) for n in low.graph_module.graph.nodes if n.op != "get_attr")

    assert targets(fast) == targets(full)


@pytest.mark.parametrize(
    "sigs, k",
    [("ABBB", 2), ("ABAA", 3), ("AA", 2), ("ABC", 3), ("AAAAAA", 2), ("ABBA", 4)],
)
def test_prefix_length(sigs: str, k: int) -> None:
    assert prefix_length(list(sigs)) == k


def test_falls_back_to_a_full_export(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise RepeatError("test")

    monkeypatch.setattr(capture_mod, "repeat_layers", refuse)
    model = _model("qwen3", 4)
    cap = capture(model, seq_len=SEQ)
    assert cap.exported_layers == 4
    full = capture(model, seq_len=SEQ, repeat=False)
    assert torch.equal(_run(cap, 0)[0], _run(full, 0)[0])
