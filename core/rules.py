"""The ANE rule table: the one place where the hardware limits are written down.

Sources for every number are in ane-facts.md (shared reference). The rank pass, the LM-head
split and the checker all read the constants and the RULES list below; nothing restates them.
"""

from __future__ import annotations

from dataclasses import dataclass

RULES_VERSION = "2026.11-5"

MAX_RANK = 4
# Rank-4 tensors are read as (N, C, H, W); lower ranks are left-padded with 1s.
DIM_LIMITS = {"N": 65536, "C": 65536, "H": 16384, "W": 16384}
# A 1x1 conv's output channels are bounded like a spatial axis (executorch#7907 hit it at 32000):
# this is the width an LM-head slice may have.
MAX_CONV_OUT_CHANNELS = DIM_LIMITS["W"]
# The last axis is padded to 64 bytes; shorter trailing dims waste ANE memory.
MIN_TRAILING_DIM = 64
# A Core ML state (the KV cache) failed to bind on the ANE when its width was not a multiple of 32
# (coremltools #2631). Checked on a state's last two axes (context, head_dim): the leading axes
# (1, kv_heads) are fixed by the model, and ANEMLL's cache runs with kv_heads = 8 there.
STATE_ALIGN = 32
# Core ML states per program: the projects that run on the ANE ship one (ANEMLL: a chunk's K and
# V in one tensor; CoreML-LLM: one, two for Gemma); a Qwen3.5 port with three states per program
# compiled and then failed at prediction on the ANE (Error=(11)) and ANEMLL's 48-state Qwen3.5
# attempt gave empty output (device-facts.md, "States").
MAX_STATES_PER_PROGRAM = 1
WEIGHTS_WARN_BYTES = 1 << 30
WEIGHTS_ERROR_BYTES = 2 << 30
COMPUTE_DTYPE = "float16"
INDEX_DTYPES = ("int32", "int16", "int8", "uint8", "int64", "bool")
# Palettized weights (iOS18 constexpr_lut_to_dense): index widths Core ML defines for a LUT
# (coremltools' OpPalettizerConfig and the MIL op spec: uint1/2/3/4/6/8), and the table itself
# in fp16, the ANE's compute dtype, with exactly 2**bits entries per group.
LUT_BITS = (1, 2, 3, 4, 6, 8)
LUT_DTYPE = COMPUTE_DTYPE


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str  # "error" | "warning"
    summary: str


RULES = [
    Rule("rank", "error", f"tensor rank above {MAX_RANK}"),
    Rule("dim_nc", "error", f"N or C above {DIM_LIMITS['N']} (rank-4 reading N, C, H, W)"),
    Rule("dim_hw", "error", f"H or W above {DIM_LIMITS['W']}"),
    Rule("conv_width", "error", f"conv with more than {MAX_CONV_OUT_CHANNELS} output channels"),
    Rule("fp16", "error", f"floating tensor not {COMPUTE_DTYPE} (the ANE computes in fp16)"),
    Rule("linear", "error", "dense layer as linear/matmul-with-weight, not a 1x1 conv"),
    Rule("rms_pow_rsqrt", "error", "pow/rsqrt normalisation (fp16 overflow; use layer_norm)"),
    Rule("scatter", "error", "scatter / index_put leaves the ANE"),
    Rule(
        "routing",
        "error",
        "data-dependent routing (topk, sort, histc, cumsum, grouped matmul) leaves the ANE",
    ),
    Rule("control_flow", "error", "control flow (cond/while) leaves the ANE"),
    # ane-facts.md, "Ops that leave the ANE": dilated conv (hollance/neural-engine
    # unsupported-layers.md)
    Rule("dilated_conv", "error", "convolution with a dilation above 1 leaves the ANE"),
    # ane-facts.md, "Precision": the ANE computes in fp16 only; integer arithmetic (hashing
    # token ids with int64 multiply / xor / remainder, counting) is no fp16 op
    Rule(
        "int_arith",
        "error",
        "integer arithmetic (int64 multiply, xor, remainder, running max) leaves the ANE, which "
        "computes in fp16 only",
    ),
    Rule("dynamic_shape", "error", "dynamic shape leaves the ANE"),
    Rule(
        "in_graph_mask", "error", "causal mask built in the graph (band_part/triu) leaves the ANE"
    ),
    Rule(
        "lut",
        "error",
        f"palettized weight Core ML cannot run: index bits not in {LUT_BITS}, LUT not "
        f"{LUT_DTYPE} or not 2**bits entries, or LUT groups that do not tile the weight",
    ),
    # source: this project's emitter (targets/op_registry.py); core/ops.py EMITTABLE lists its
    # ops. Checked on lowered graphs only: a captured graph is reported by the rules above.
    Rule("unsupported_op", "error", "an op the Core ML emitter has no translation for"),
    Rule("gather", "warning", "gather (embedding lookup) runs on the CPU"),
    Rule(
        "trailing_dim", "warning", f"trailing dimension below {MIN_TRAILING_DIM} (64-byte padding)"
    ),
    Rule(
        "state_count",
        "error",
        f"more than {MAX_STATES_PER_PROGRAM} Core ML state per program (device-facts.md)",
    ),
    Rule(
        "state_align",
        "warning",
        f"state (KV cache) context or head_dim not a multiple of {STATE_ALIGN}",
    ),
    Rule(
        "weights_size",
        "warning",
        f"weights above {WEIGHTS_WARN_BYTES >> 30} GB per package (error above "
        f"{WEIGHTS_ERROR_BYTES >> 30} GB)",
    ),
]
RULES_BY_ID = {r.id: r for r in RULES}

# Canonical op kinds the rules speak about. The fx and the Core ML readers map their own op
# names onto these (lowering/checker.py), so each rule is written once for both.
OFF_ANE_KINDS = {
    "scatter": "scatter",
    "control_flow": "control_flow",
    "linear": "linear",
    "pow": "rms_pow_rsqrt",
    "rsqrt": "rms_pow_rsqrt",
    "band_part": "in_graph_mask",
    "gather": "gather",
    "topk": "routing",
    "sort": "routing",
    "argsort": "routing",
    "histc": "routing",
    "cumsum": "routing",
    "nonzero": "routing",
    "grouped_mm": "routing",
    "dilated_conv": "dilated_conv",
    "int_arith": "int_arith",
}
# The ops that are arithmetic when their result is an integer tensor (comparisons and the
# index computations of a gather are not: their results are booleans or indices the ops read)
INT_ARITH_OPS = (
    "mul",
    "add",
    "sub",
    "bitwise_xor",
    "bitwise_and",
    "bitwise_or",
    "remainder",
    "fmod",
    "floor_divide",
    "div",
    "cummax",
    "cummin",
)


def lm_head_slices(width: int) -> int:
    """How many conv slices a head of WIDTH output channels needs."""
    return -(-width // MAX_CONV_OUT_CHANNELS)


# Head slices are cut at multiples of this many channels, so each slice is whole groups of the
# per-grouped-channel palettization (16 rows per table): an odd width such as 15194 only
# allows groups of 2 (+25% table bytes at 8 bits, 4x the clustering time).
HEAD_SLICE_ALIGN = 16


def lm_head_slice_width(width: int) -> int:
    """Channels per slice of a WIDTH-channel head (the last slice takes the rest)."""
    even = -(-width // lm_head_slices(width))
    return min(-(-even // HEAD_SLICE_ALIGN) * HEAD_SLICE_ALIGN, MAX_CONV_OUT_CHANNELS)


def rank4(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape read as (N, C, H, W): left-padded with 1s (rank > 4 is returned as is)."""
    return (1,) * (MAX_RANK - len(shape)) + tuple(shape)


# ---------------------------------------------------------------------------------------------
# Chips the cost model estimates for (anefx cost). Every figure is an input of an ESTIMATE, not a
# measurement of ours: ANE read bandwidth as anemll-bench measured it (its llama_lm_head
# benchmark, Results.MD; device-facts.md), peak ANE compute where Apple published it (M1 11, M3
# 18, M4 38 TOPS, A18 Pro 35; device-facts.md). None: no published figure.
@dataclass(frozen=True)
class Chip:
    name: str
    ane_gbps: float | None  # ANE read bandwidth, GB/s (anemll-bench)
    ane_tops: float | None  # peak ANE compute, 10^12 ops/s (Apple)
    source: str


CHIPS = {
    c.name: c
    for c in (
        Chip("M1", 60.9, 11.0, "anemll-bench Results.MD; Apple M1 (11 TOPS)"),
        Chip("M2", 60.5, None, "anemll-bench Results.MD"),
        Chip("M3", 63.1, 18.0, "anemll-bench Results.MD; Apple M3 (18 TOPS)"),
        Chip("M3 Max", 120.2, None, "anemll-bench Results.MD"),
        Chip("M4", 64.2, 38.0, "anemll-bench Results.MD; Apple M4 (38 TOPS)"),
        Chip("M4 Pro", 126.4, None, "anemll-bench Results.MD"),
        Chip("M4 Max", 118.9, None, "anemll-bench Results.MD"),
        Chip("M5", 70.2, None, "anemll-bench Results.MD"),
        Chip("M5 Max", 148.4, None, "anemll-bench Results.MD"),
        Chip("A18 Pro", None, 35.0, "Apple A18 Pro (35 TOPS); no ANE bandwidth measured"),
    )
}
DEFAULT_CHIP = "M4"
# The fixed cost of one program call on the ANE (ANEForge reports about 70 us; device-facts.md):
# a decode step over N parts pays it N times.
DISPATCH_FLOOR_S = 70e-6
