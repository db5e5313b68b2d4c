"""Every real-shape preset lowers on the meta device with zero ANE errors."""

from __future__ import annotations

from fractions import Fraction

import pytest

import anefx
from anefx.core import rules
from anefx.core.signature import pack_states
from anefx.lowering.matrix import matrix_presets
from anefx.models.families import FAMILIES
from anefx.models.presets import PRESETS, num_experts, sparse_layers

# the presets of families that lower (Family.unlowered empty); Qwen4-Exp's is checked to name
# what blocks it (tests/test_qwen4_exp.py)
REAL = [n for n in matrix_presets() if not FAMILIES[PRESETS[n]["model_type"]].unlowered]
# one real shape per family in the default run (the checker tests lower qwen3-0.6b too): dense
# Qwen3, Qwen2.5, long-context Qwen3, Qwen3-MoE, Qwen2-MoE, the Qwen3.5 hybrid, the hybrids with
# experts (Qwen3.5-MoE, Qwen3-Next) and the language towers of Qwen2.5-VL, Qwen3-VL and
# Qwen3-VL-MoE; every preset under -m slow
DEFAULT = {
    "qwen3-1.7b",
    "qwen2.5-0.5b",
    "qwen3-4b-2507",
    "qwen3-30b-a3b",
    "qwen1.5-moe-a2.7b",
    "qwen3.5-0.8b",
    "qwen3.5-35b-a3b",
    "qwen3-next-80b-a3b",
    "qwen2.5-vl-3b",
    "qwen3-vl-2b",
    "qwen3-vl-30b-a3b",
}


def _hybrid(name: str) -> bool:
    """A preset whose family has linear-attention layers."""
    cfg = PRESETS[name]
    return FAMILIES[cfg["model_type"]].linear_attention(cfg)[0] > 0


@pytest.mark.parametrize(
    "name",
    [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in REAL],
)
def test_preset_lowers_without_errors(name: str) -> None:
    low = anefx.lower(f"preset:{name}", seq_len=64, meta=True)
    rep = low.report
    # one package above 2 GB is a real error until the decoder is chunked (issue 6)
    errors = [e for e in rep.errors if e.rule != "weights_size"]
    assert not errors, rep.render()
    vocab = PRESETS[name]["vocab_size"]
    assert rep.stats["lm_head_slices"] == rules.lm_head_slices(vocab)
    assert all(
        b - a <= rules.MAX_CONV_OUT_CHANNELS for a, b in (o.vocab for o in low.signature.logits)
    )
    cfg = PRESETS[name]
    if num_experts(cfg):
        moe = rep.stats["moe"]
        assert moe["blocks"] == len(sparse_layers(cfg)) and "unmatched" not in moe
        # every expert runs densely; a shared expert runs either way (counted on both sides)
        width, shared = cfg["moe_intermediate_size"], cfg.get("shared_expert_intermediate_size", 0)
        want = Fraction(
            num_experts(cfg) * width + shared, cfg["num_experts_per_tok"] * width + shared
        )
        assert Fraction(moe["compute_multiplier"]).limit_denominator(10**6) == want
        assert moe.get("shared_expert_width", 0) == shared


@pytest.mark.slow  # the default run lowers the tiny hybrid's stateful graphs (test_qwen3_5.py)
@pytest.mark.parametrize("name", [n for n in REAL if _hybrid(n)])
def test_hybrid_stateful_graphs_lower_without_errors(name: str) -> None:
    """A hybrid's prefill and decode with states: 0 errors, one Core ML state per program (the
    full layers' K and V), the conv and delta-rule states carried."""
    for seq in (64, 1):
        low = anefx.lower(f"preset:{name}", seq_len=seq, meta=True, context=512)
        errors = [e for e in low.report.errors if e.rule != "weights_size"]
        assert not errors, low.report.render()
        sig = low.signature
        assert len(pack_states(sig.states)) == 1
        assert {s.kind for s in sig.carried} == {"conv", "recurrent"}
