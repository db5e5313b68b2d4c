"""Weight palettization (``--lut``): large weights become iOS18 ``constexpr_lut_to_dense`` ops.

Each chosen weight is cut into groups of ``GROUP_SIZE`` output channels (coremltools'
"per_grouped_channel" granularity); every group gets its own table of 2**bits fp16 values and
each weight element stores only its index into that table. The tables come from coremltools'
optimize API (``OpPalettizerConfig(mode="custom")`` with the palettize_weights graph pass) fed
by :func:`kmeans_lut`, a deterministic one-dimensional k-means: coremltools' own "kmeans" mode
runs the exact kmeans1d solver (38-71 s per million weights at 8 bits: 8-15 hours for a
0.6B model on two cores) or scikit-learn (not a dependency), and "uniform" loses 11-12 dB on
heavy-tailed weights. docs/palettization.md has the measurements behind every choice here.

Which weights: a const of at least ``MIN_ELEMENTS`` elements whose every reader is a conv (as its
weight) or a gather (as its table); norm vectors, rotary tables and one-hot constants feed other
ops and stay dense. Its kind, which the model's family decides (``Family.weight_kind``), decides
its bits: "embed" for a gather table (the embedding, even when it is tied to the head and so
named after lm_head), "head" for a conv under the head (``lm_head``), "ffn" for a conv in a
decoder layer (attention and MLP alike; a mixture-of-experts router, ``mlp.gate``, stays
dense).

A weight that several functions of one package share (same ``weight_id``: same bytes) is
clustered once; the other functions get the same indices and table under shared blob ids, so
the package stores it once, as it does dense weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from anefx.core.rules import LUT_BITS
from anefx.errors import AnefxGraphError, AnefxInputError
from anefx.models import families
from anefx.targets.mil_program import split_op_name

KINDS = ("embed", "ffn", "head")
# Output channels that share one table. 16 keeps the table overhead small at 8 bits (512 B per
# 16 rows: +3% over the indices for a 1024-wide layer) and measured within 0.04-0.8 dB of
# 8-channel groups; larger groups lose more on weights whose rows differ in scale.
GROUP_SIZE = 16
# Smaller weights save a few KiB at most while their table overhead grows; 4096 elements
# (8 KiB of fp16) is the smallest matrix of the tiny test models (64 x 64).
MIN_ELEMENTS = 4096
# Package metadata key holding the palettization summary (JSON).
LUT_KEY = "anefx.lut"
MODE = "kmeans (1-D Lloyd, cube-root density start; coremltools mode=custom)"

# k-means: the starting centroids are quantiles of density**(1/3) (the high-resolution optimum
# for mean squared error) over a coarse histogram; coarse because a fine one follows sampling
# noise in the tails. Lloyd's iterations then run to a fixed point (no cell boundary moves) or
# _MAX_ITERS: past 8 iterations the error measured changes by under 0.1 dB.
_INIT_BINS = 64
_MAX_ITERS = 16
# below this many values a uint16 sort beats counting over all 65536 fp16 keys
_BINCOUNT_MIN = 8192


def _distinct_fp16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(values, return_inverse=True, return_counts=True) for fp16, on integer keys.

    numpy sorts fp16 without vector instructions (2 ms for 16k values, most of the clustering
    time); an fp16's 16 bits map to an order-preserving integer key instead. Large groups are
    counted with one bincount over the 65536 keys, small ones (where that fixed cost dominates)
    sorted as uint16. -0.0 and +0.0 stay two entries.
    """
    bits = values.reshape(-1).view(np.uint16).astype(np.int64)
    # negative: reverse their order below the positives; positive: above 0x8000
    keys = np.where(bits & 0x8000, 0xFFFF - bits, bits | 0x8000)
    if keys.size < _BINCOUNT_MIN:
        present, inverse, counts = np.unique(
            keys.astype(np.uint16), return_inverse=True, return_counts=True
        )
        present = present.astype(np.int64)
    else:
        per_key = np.bincount(keys, minlength=1 << 16)
        present = np.flatnonzero(per_key)
        rank = np.zeros(1 << 16, np.int64)
        rank[present] = np.arange(len(present))
        inverse, counts = rank[keys], per_key[present]
    uniq_bits = np.where(present & 0x8000, present & 0x7FFF, 0xFFFF - present).astype(np.uint16)
    return uniq_bits.view(np.float16), inverse.reshape(-1), counts


def kmeans_lut(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2**nbits-entry fp16 table and uint8 indices (flat) for VALUES, by 1-D k-means.

    Deterministic: no random start, and every step is a sort, a cumulative sum or a search.
    With at most 2**nbits distinct values the table holds them exactly (zero-padded).
    """
    k = 1 << nbits
    values = np.asarray(values, np.float16)
    # -0.0 equals +0.0: one table entry serves both (the counting sort would keep two)
    values = np.where(values == 0, np.float16(0), values)
    uniq, inverse, counts = _distinct_fp16(values)
    if len(uniq) <= k:
        lut = np.zeros(k, np.float16)
        lut[: len(uniq)] = uniq
        return lut, inverse.astype(np.uint8)
    u = uniq.astype(np.float64)
    hist, edges = np.histogram(u, bins=_INIT_BINS, weights=counts)
    cdf = np.concatenate([[0.0], np.cumsum(np.cbrt(hist))])
    centroids = np.interp((np.arange(k) + 0.5) / k, cdf / cdf[-1], edges)
    # prefix sums over the sorted distinct values: a cell's count and mean in O(1)
    csum_n = np.concatenate([[0], np.cumsum(counts)])
    csum_x = np.concatenate([[0.0], np.cumsum(u * counts)])
    bounds = np.empty(k + 1, np.int64)  # cell j holds u[bounds[j]:bounds[j + 1]]
    bounds[0], bounds[-1] = 0, len(u)
    cut = None
    for _ in range(_MAX_ITERS):
        new = np.searchsorted(u, (centroids[1:] + centroids[:-1]) / 2)
        if cut is not None and (new == cut).all():
            break
        cut = bounds[1:-1] = new
        n = np.diff(csum_n[bounds])
        total = np.diff(csum_x[bounds])
        # an empty cell keeps its centroid, which stays between its neighbours: order is kept
        centroids = np.where(n > 0, total / np.maximum(n, 1), centroids)
    lut = centroids.astype(np.float16)
    # each value to the nearest entry of the fp16 table actually stored (sorted ascending)
    mids = (lut[1:].astype(np.float64) + lut[:-1]) / 2
    return lut, np.searchsorted(mids, u)[inverse].astype(np.uint8)


class _LutFunction:
    """kmeans_lut at fixed bits, in the (values) -> (lut, indices) form coremltools calls."""

    def __init__(self, nbits: int):
        self.nbits = nbits

    def __call__(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kmeans_lut(values, self.nbits)


def check_lut(lut: dict[str, int] | None) -> dict[str, int]:
    """Validate a kind -> bits mapping (``--lut`` options); raise AnefxInputError if bad."""
    out = {}
    for kind, bits in (lut or {}).items():
        if kind not in KINDS:
            raise AnefxInputError(
                f"unknown LUT weight kind {kind!r}: expected one of {', '.join(KINDS)}"
            )
        if bits is None:
            continue
        if (
            isinstance(bits, bool)
            or not isinstance(bits, (int, np.integer))
            or bits not in LUT_BITS
        ):
            raise AnefxInputError(
                f"LUT bits for {kind} must be one of {', '.join(map(str, LUT_BITS))} "
                f"(Core ML's palettization widths), got {bits!r}"
            )
        out[kind] = int(bits)
    return out


@dataclass
class PalettizedWeight:
    """One palettized weight (once per package, however many functions read it)."""

    name: str  # the const op's name in the first function that reads it
    module: str | None
    kind: str
    shape: tuple[int, ...]
    bits: int
    group_size: int  # output channels per table (GROUP_SIZE or the largest divisor below it)
    dense_bytes: int
    palettized_bytes: int  # indices at `bits` per element + the tables in fp16
    functions: list[str]


@dataclass
class SkippedWeight:
    name: str
    module: str | None
    kind: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class LutSummary:
    """What palettize_program did; ``to_metadata`` is what the package records.

    The time taken stays out of the metadata, which must be the same on every conversion.
    """

    bits: dict[str, int]
    weights: list[PalettizedWeight]
    skipped: list[SkippedWeight]
    seconds: float

    def to_metadata(self) -> dict:
        by_kind: dict[str, int] = {}
        for w in self.weights:
            by_kind[w.kind] = by_kind.get(w.kind, 0) + 1
        return {
            "bits": self.bits,
            "mode": MODE,
            "granularity": "per_grouped_channel",
            "group_size": GROUP_SIZE,
            "min_elements": MIN_ELEMENTS,
            "weights": by_kind,
            "dense_bytes": sum(w.dense_bytes for w in self.weights),
            "palettized_bytes": sum(w.palettized_bytes for w in self.weights),
            "skipped": [asdict(s) for s in self.skipped],
        }


def _group_size(channels: int) -> int:
    """GROUP_SIZE, or the largest divisor of CHANNELS below it (iOS18 LUT groups must tile)."""
    return max(g for g in range(1, GROUP_SIZE + 1) if channels % g == 0)


def _palettized_bytes(shape: tuple[int, ...], bits: int, group: int) -> int:
    return math.ceil(math.prod(shape) * bits / 8) + (shape[0] // group) * (1 << bits) * 2


# (module path, reader op "gather" / "conv") -> "embed" / "ffn" / "head", or None: dense
WeightKind = Callable[[str | None, str], str | None]


def _kind(op, modules: dict[str, str], weight_kind: WeightKind) -> tuple[str | None, str | None]:
    """(kind, module) of a const op by its readers; kind None: not a palettizable weight."""
    var = op.outputs[0]
    module = split_op_name(op.name, modules)[0]
    readers = var.child_ops
    if not readers:
        return None, module
    if all(c.op_type == "gather" and c.x is var for c in readers):
        return weight_kind(module, "gather"), module
    if all(c.op_type == "conv" and c.weight is var for c in readers):
        return weight_kind(module, "conv"), module
    return None, module


def _candidates(fn, modules: dict[str, str], weight_kind: WeightKind):
    """(op, kind, module, shape) for every weight-sized fp16 const of FN read by conv/gather."""
    for op in fn.operations:
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        if not isinstance(val, np.ndarray) or val.dtype != np.float16:
            continue
        if val.ndim < 2 or val.size < MIN_ELEMENTS:
            continue
        kind, module = _kind(op, modules, weight_kind)
        if kind is not None:
            yield op, kind, module, tuple(int(d) for d in val.shape)


@dataclass
class _Entry:
    """A weight palettized in its first function, and what later functions reuse of it."""

    weight: PalettizedWeight
    weight_id: str | None  # the dense const's blob id (same bytes in every function)
    indices: np.ndarray | None = None
    table: np.ndarray | None = None

    @property
    def tag(self) -> str:
        return f"{self.weight_id}_lut{self.weight.bits}g{self.weight.group_size}"


def palettize_program(
    prog, lut: dict[str, int], modules: dict[str, str], weight_kind: WeightKind | None = None
) -> LutSummary:
    """Palettize the chosen weights of a pymil Program in place; return what was done.

    LUT maps a weight kind ("embed", "ffn", "head") to bits; a missing kind stays dense.
    MODULES maps the encoded module names in op names to dotted module paths. WEIGHT_KIND is
    the model's family's rule (``family_of(config).weight_kind``); without it, a weight gets
    the kind every family agrees on, and stays dense where any family keeps it dense.
    """
    from coremltools.converters.mil.mil import Program
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    weight_kind = weight_kind or families.weight_kind
    bits_by_kind = check_lut(lut)
    t0 = time.perf_counter()
    done: dict[tuple, _Entry] = {}  # (blob id, bits, group) -> its first palettization
    skipped: list[SkippedWeight] = []
    skipped_ids: set[str] = set()
    for fname, fn in prog.functions.items():
        configs: dict[str, object] = {}
        fresh: list[_Entry] = []
        reuse: list[tuple[object, _Entry]] = []
        for op, kind, module, shape in _candidates(fn, modules, weight_kind):
            bits = bits_by_kind.get(kind)
            if bits is None:
                continue
            ident = op.weight_id or f"{fname}/{op.name}"  # the blob: the same in every function
            group = _group_size(shape[0])
            dense, packed = math.prod(shape) * 2, _palettized_bytes(shape, bits, group)
            if packed >= dense:
                reason = (
                    f"{shape[0]} output channels allow groups of {group} only: "
                    f"{packed} palettized bytes >= {dense} dense"
                )
                if ident not in skipped_ids:  # listed once per package
                    skipped_ids.add(ident)
                    skipped.append(SkippedWeight(op.name, module, kind, shape, reason))
                continue
            key = (ident, bits, group)
            if key in done:
                reuse.append((op, done[key]))
                done[key].weight.functions.append(fname)
                continue
            configs[op.name] = OpPalettizerConfig(
                mode="custom",
                lut_function=_LutFunction(bits),
                granularity="per_grouped_channel",
                group_size=group,
                weight_threshold=MIN_ELEMENTS - 1,
            )
            weight = PalettizedWeight(
                op.name, module, kind, shape, bits, group, dense, packed, [fname]
            )
            done[key] = _Entry(weight, op.weight_id)
            fresh.append(done[key])
        if configs:
            # the pass walks every function of the program it is given: hand it this one only,
            # so names in other functions are never matched and a shared weight clusters once
            single = Program()
            single.add_function(fname, fn)
            palettize_weights(config=OptimizationConfig(op_name_configs=configs)).apply(single)
            for entry in fresh:
                _adopt(fn, entry)
        if reuse:
            _reuse(fn, reuse)
    return LutSummary(
        bits_by_kind, [e.weight for e in done.values()], skipped, time.perf_counter() - t0
    )


def _adopt(fn, entry: _Entry) -> None:
    """Find the pass's constexpr op for ENTRY; give its indices and table shared blob ids.

    coremltools writes a const once per blob id; without one it keys the blob by function, and
    a weight that prefill and decode share would be stored twice.
    """
    name = f"{entry.weight.name}_palettized"
    op = next((o for o in fn.operations if o.name == name), None)
    if op is None or op.op_type != "constexpr_lut_to_dense":
        raise AnefxGraphError(f"coremltools did not palettize {entry.weight.name}")
    entry.indices, entry.table = op.indices.val, op.lut.val
    if entry.weight_id is not None:
        op.indices.op.weight_id = f"{entry.tag}_indices"
        op.lut.op.weight_id = f"{entry.tag}_lut"


def _reuse(fn, reuse: list) -> None:
    """Replace consts whose weight another function already palettized by the same tables."""
    from coremltools.converters.mil import Builder as mb

    with fn:
        for op, entry in reuse:
            new = mb.constexpr_lut_to_dense(
                indices=entry.indices, lut=entry.table, name=f"{op.name}_palettized", before_op=op
            )
            new.op.indices.op.weight_id = f"{entry.tag}_indices"
            new.op.lut.op.weight_id = f"{entry.tag}_lut"
            fn.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
            )
            fn.remove_ops([op])
