"""Recover a checkpoint's config from its tensor names and shapes, reading headers only.

A folder of `*.safetensors` without config.json still tells most of its config: the family
(q_norm tensors: Qwen3; expert tensors: Qwen3-MoE; a q_proj bias and no q_norm: Qwen2), the
layer count, hidden and vocabulary sizes, head_dim (Qwen3: the q_norm length), heads and KV
heads, the MLP and expert widths, which layers are sparse, tying and the dtype. What shapes
cannot tell comes from DEFAULTS, and one ConfigDefaultsWarning names every field so filled in.

`inspect_model` reports a model's config, where each field came from, its parameter count and
its stored weight bytes, without materialising any weight.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from anefx.errors import AnefxInputError
from anefx.models.limits import MAX_LAYERS
from anefx.models.presets import PRESETS
from anefx.progress import Progress, quiet

QWEN2, QWEN3, QWEN3_MOE = "qwen2", "qwen3", "qwen3_moe"
_ALL = (QWEN2, QWEN3, QWEN3_MOE)
_ARCHITECTURES = {
    QWEN2: "Qwen2ForCausalLM",
    QWEN3: "Qwen3ForCausalLM",
    QWEN3_MOE: "Qwen3MoeForCausalLM",
}
# Qwen2 has no head_dim field (head_dim = hidden / heads), so its heads cannot be read off the
# shapes: a preset with the same shapes decides, else the first of these dividing both the q
# and the k rows (every published Qwen2/2.5 model uses 128 or 64).
QWEN2_HEAD_DIMS = (128, 64, 32, 16, 8)


class ConfigDefaultsWarning(UserWarning):
    """A checkpoint without config.json: fields its tensors cannot tell were given defaults."""


@dataclass(frozen=True)
class Default:
    """One row of DEFAULTS: a field the shapes cannot tell, for the families listed."""

    field: str
    families: tuple[str, ...]
    value: Any  # a constant, or a function of the fields inferred so far
    why: str


def _qwen2_heads(fields: dict[str, Any]) -> int:
    return fields["hidden_size"] // fields["_head_dim"]


def _qwen2_kv_heads(fields: dict[str, Any]) -> int:
    return fields["_k_rows"] // fields["_head_dim"]


# Everything tensor shapes cannot tell, in one table. A row applies only when the shapes did not
# give the field (e.g. a MoE intermediate_size is read from a dense layer when there is one).
DEFAULTS: tuple[Default, ...] = (
    Default(
        "rope_parameters",
        _ALL,
        {"rope_type": "default", "rope_theta": 1000000.0},
        "every published Qwen2.5/Qwen3 model except the 2507 updates (5e6); no rope scaling",
    ),
    Default("rms_norm_eps", _ALL, 1e-6, "published Qwen2.5-Instruct, Qwen3 and Qwen3-MoE"),
    Default("max_position_embeddings", (QWEN2,), 32768, "published Qwen2.5-Instruct"),
    Default("max_position_embeddings", (QWEN3, QWEN3_MOE), 40960, "published Qwen3, Qwen3-MoE"),
    Default(
        "num_experts_per_tok",
        (QWEN3_MOE,),
        lambda f: min(8, f["num_experts"]),
        "8 as in Qwen3-30B-A3B and 235B-A22B (at most num_experts)",
    ),
    Default(
        "norm_topk_prob",
        (QWEN3_MOE,),
        True,
        "published Qwen3-MoE (the config class would default to false)",
    ),
    Default(
        "intermediate_size",
        (QWEN3_MOE,),
        lambda f: 3 * f["hidden_size"],
        "3 x hidden_size as published; only when every layer is sparse, so it is unused",
    ),
    Default(
        "num_attention_heads",
        (QWEN2,),
        _qwen2_heads,
        "hidden_size / head_dim; head_dim from a preset with the same shapes, else the first "
        f"of {', '.join(map(str, QWEN2_HEAD_DIMS))} dividing the q and k rows",
    ),
    Default("num_key_value_heads", (QWEN2,), _qwen2_kv_heads, "k_proj rows / that head_dim"),
)

_ST_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# at most 9 digits: a longer index is no layer (and int() of thousands of digits would fail)
_LAYER = re.compile(r"^model\.layers\.(\d{1,9})\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d{1,9})\.(gate_proj|up_proj|down_proj)\.weight$")
EMBED = "model.embed_tokens.weight"


class _Tensor(Protocol):
    dtype: str
    shape: tuple[int, ...]


@dataclass
class InferredConfig:
    """A config dict recovered from tensor shapes and where each field came from."""

    config: dict[str, Any]  # keyword arguments for build_config, model_type included
    inferred: list[str]  # fields read from tensor names and shapes
    defaulted: dict[str, Any]  # fields filled in from DEFAULTS -> the value used
    reasons: dict[str, str] = field(default_factory=dict)  # defaulted field -> why

    def warning_text(self, where: str) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.defaulted.items())
        return (
            f"{where}: no config.json; {len(self.inferred)} fields inferred from tensor shapes, "
            f"{len(self.defaulted)} not recoverable from shapes and set to defaults: {shown} "
            "(add a config.json to set them)"
        )


def _fail(where: str, message: str) -> AnefxInputError:
    return AnefxInputError(f"{where}: cannot infer the config from tensor shapes: {message}")


def _get(where: str, tensors: Mapping[str, _Tensor], name: str, rank: int) -> tuple[int, ...]:
    entry = tensors.get(name)
    if entry is None:
        raise _fail(
            where, f"tensor '{name}' missing (expected the Hugging Face *ForCausalLM layout)"
        )
    if len(entry.shape) != rank:
        raise _fail(where, f"tensor '{name}' has shape {list(entry.shape)}, expected rank {rank}")
    return tuple(entry.shape)


def _divide(where: str, name: str, rows: int, by: int, what: str) -> int:
    if by <= 0 or rows % by:
        raise _fail(where, f"tensor '{name}' has {rows} rows, not a multiple of {what} ({by})")
    return rows // by


def _one_value(where: str, values: dict[int, int], what: str) -> int | None:
    """The value every layer agrees on (None if no layer has one)."""
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        per_layer = ", ".join(f"layer {i}: {v}" for i, v in sorted(values.items())[:4])
        raise _fail(where, f"layers disagree on {what} ({per_layer}, ...)")
    return distinct[0] if distinct else None


def _sparse_pattern(layers: int, sparse: set[int]) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) that make exactly `sparse` the MoE layers.

    transformers' rule: layer i is sparse iff i not in mlp_only_layers and (i + 1) % step == 0.
    A step that gives the set exactly is preferred; otherwise step 1 and the dense layers listed.
    """
    for step in range(1, layers + 1):
        if {i for i in range(layers) if (i + 1) % step == 0} == sparse:
            return step, []
    return 1, sorted(set(range(layers)) - sparse)


def _qwen2_head_dim(fields: dict[str, Any]) -> tuple[int, str]:
    """head_dim for a Qwen2 checkpoint (not a config field), and where it came from."""
    hidden, k_rows = fields["hidden_size"], fields["_k_rows"]
    for name, preset in PRESETS.items():
        if preset["model_type"] != QWEN2:
            continue
        head_dim = preset.get("head_dim") or preset["hidden_size"] // preset["num_attention_heads"]
        same = (
            all(
                preset[k] == fields[k]
                for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
            )
            and preset.get("tie_word_embeddings", False) == fields["tie_word_embeddings"]
        )
        if same and preset["num_key_value_heads"] * head_dim == k_rows:
            return head_dim, f"head_dim {head_dim} of preset:{name}, whose shapes these are"
    for head_dim in QWEN2_HEAD_DIMS:
        if hidden % head_dim == 0 and k_rows % head_dim == 0:
            return head_dim, f"assumes head_dim {head_dim}"
    head_dim = math.gcd(hidden, k_rows)
    return head_dim, f"assumes head_dim {head_dim} (gcd of the q and k rows)"


def infer_from_tensors(tensors: Mapping[str, _Tensor], where: str) -> InferredConfig:
    """Infer a config dict from tensor names -> (dtype, shape); `where` names the checkpoint."""
    vocab, hidden = _get(where, tensors, EMBED, 2)
    layer_tensors: dict[int, dict[str, _Tensor]] = defaultdict(dict)
    for name, entry in tensors.items():
        match = _LAYER.match(name)
        if match:
            layer_tensors[int(match.group(1))][match.group(2)] = entry
    if not layer_tensors:
        raise _fail(where, "no 'model.layers.<i>.*' tensors")
    layers = max(layer_tensors) + 1
    if layers > MAX_LAYERS:  # before anything below walks every layer index
        name = next(iter(layer_tensors[layers - 1]))
        raise _fail(
            where,
            f"tensor 'model.layers.{layers - 1}.{name}' names layer {layers - 1}, above the "
            f"bound of {MAX_LAYERS} layers (anefx.models.limits.MAX_LAYERS)",
        )
    gaps = [i for i in range(layers) if i not in layer_tensors]
    if gaps:
        raise _fail(where, f"layer {gaps[0]} has no tensors but layer {layers - 1} has")

    suffixes = {s for per_layer in layer_tensors.values() for s in per_layer}
    if any(".shared_expert" in s for s in suffixes):
        raise _fail(where, "shared-expert tensors (Qwen2-MoE) are not a supported family")
    moe = any(s.startswith("mlp.experts.") or s == "mlp.gate.weight" for s in suffixes)
    q_norm = "self_attn.q_norm.weight" in layer_tensors[0]
    q_bias = "self_attn.q_proj.bias" in layer_tensors[0]
    if moe and not q_norm:
        raise _fail(where, "expert tensors without q_norm: only Qwen3-MoE experts are supported")
    if moe:
        model_type = QWEN3_MOE
    elif q_norm:
        model_type = QWEN3
    elif q_bias:
        model_type = QWEN2
    else:
        raise _fail(
            where,
            "layer 0 has neither q_norm (Qwen3) nor a q_proj bias (Qwen2); unknown family",
        )

    fields: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
    }
    q_name, k_name = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    )
    q_rows, _ = _get(where, tensors, q_name, 2)
    k_rows, _ = _get(where, tensors, k_name, 2)
    if model_type == QWEN2:
        if q_rows != hidden:
            raise _fail(
                where, f"tensor '{q_name}' has {q_rows} rows; Qwen2 needs hidden_size ({hidden})"
            )
        fields["_k_rows"] = k_rows
    else:
        (head_dim,) = _get(where, tensors, "model.layers.0.self_attn.q_norm.weight", 1)
        fields["head_dim"] = head_dim
        fields["num_attention_heads"] = _divide(where, q_name, q_rows, head_dim, "head_dim")
        fields["num_key_value_heads"] = _divide(where, k_name, k_rows, head_dim, "head_dim")
        fields["attention_bias"] = q_bias

    dense_width: dict[int, int] = {}
    expert_count: dict[int, int] = {}
    expert_width: dict[int, int] = {}
    for i, per_layer in layer_tensors.items():

        def shape(suffix: str, rank: int, i: int = i, per_layer: dict = per_layer) -> tuple:
            found = tuple(per_layer[suffix].shape)
            if len(found) != rank:
                raise _fail(
                    where,
                    f"tensor 'model.layers.{i}.{suffix}' has shape {list(found)}, expected "
                    f"rank {rank}",
                )
            return found

        if "mlp.gate_proj.weight" in per_layer:
            dense_width[i] = shape("mlp.gate_proj.weight", 2)[0]
        if "mlp.gate.weight" in per_layer:  # the router, (E, H)
            expert_count[i] = shape("mlp.gate.weight", 2)[0]
        if "mlp.experts.down_proj" in per_layer:  # fused, (E, H, I)
            fused = shape("mlp.experts.down_proj", 3)
            expert_count.setdefault(i, fused[0])
            expert_width[i] = fused[-1]
        per_expert = [m for s in per_layer if (m := _EXPERT.match(s))]
        if per_expert:  # (I, H) gate/up, (H, I) down per expert
            expert_count.setdefault(i, max(int(m.group(1)) for m in per_expert) + 1)
            first = shape(per_expert[0].group(0), 2)
            down = per_expert[0].group(2) == "down_proj"
            expert_width.setdefault(i, first[-1] if down else first[0])
    intermediate = _one_value(where, dense_width, "intermediate_size")
    if intermediate is not None:
        fields["intermediate_size"] = intermediate
    elif model_type != QWEN3_MOE:
        raise _fail(where, "tensor 'model.layers.0.mlp.gate_proj.weight' missing")
    if model_type == QWEN3_MOE:
        fields["num_experts"] = _one_value(where, expert_count, "num_experts")
        width = _one_value(where, expert_width, "moe_intermediate_size")
        if width is None:
            raise _fail(where, "a router 'mlp.gate.weight' but no expert weights")
        fields["moe_intermediate_size"] = width
        sparse = set(expert_count) | set(expert_width)
        step, dense = _sparse_pattern(layers, sparse)
        fields["decoder_sparse_step"] = step
        fields["mlp_only_layers"] = dense

    floats = Counter()
    for entry in tensors.values():
        if entry.dtype in _ST_DTYPE_NAMES:
            floats[entry.dtype] += math.prod(entry.shape)
    if floats:
        fields["dtype"] = _ST_DTYPE_NAMES[floats.most_common(1)[0][0]]

    inferred = [k for k in fields if not k.startswith("_")]
    reasons: dict[str, str] = {}
    if model_type == QWEN2:
        fields["_head_dim"], why = _qwen2_head_dim(fields)
        reasons["num_attention_heads"] = reasons["num_key_value_heads"] = why
    defaulted: dict[str, Any] = {}
    for row in DEFAULTS:
        if model_type not in row.families or row.field in fields:
            continue
        # a copy: the config class fills in rope_parameters in place
        value = row.value(fields) if callable(row.value) else copy.deepcopy(row.value)
        fields[row.field] = defaulted[row.field] = value
        reasons.setdefault(row.field, row.why)
    config = {k: v for k, v in fields.items() if not k.startswith("_")}
    return InferredConfig(config, inferred, defaulted, reasons)


def infer_config(folder: str | os.PathLike[str], warn: bool = True) -> InferredConfig:
    """Infer the config of checkpoint `folder` from its safetensors headers.

    With `warn`, one ConfigDefaultsWarning names every field set from DEFAULTS.
    """
    from anefx.models.checkpoint_files import check_folder, locate_tensors

    folder = Path(folder)
    check_folder(folder)
    result = infer_from_tensors(locate_tensors(folder), str(folder))
    if warn:
        warnings.warn(result.warning_text(str(folder)), ConfigDefaultsWarning, stacklevel=2)
    return result


# ---------------------------------------------------------------------------------------------
# anefx inspect

_TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _idle_expert_parameters(model: Any, config: Any) -> int:
    """Expert weights one token does not use: (E - top_k) experts in every sparse layer."""
    import torch

    top_k = getattr(config, "num_experts_per_tok", None) or 0
    idle = 0
    for module in model.modules():
        up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter):
            experts = up.shape[0]
            idle += max(experts - top_k, 0) * (up.numel() + down.numel()) // experts
    return idle


def inspect_model(spec: str | os.PathLike[str], progress: Progress | None = None) -> dict[str, Any]:
    """The config of a checkpoint folder or "preset:NAME" and where each field came from.

    Keys: the model's transformers config fields (config.to_dict() without the generic
    PreTrainedConfig ones such as return_dict; num_experts by that name), plus `_source`,
    `_config` ("config.json", "preset" or "inferred"), `_declared` / `_inferred` (field names),
    `_defaulted` (field -> value from DEFAULTS), `_reasons`, `_parameters` (tied weights
    counted once), `_active_parameters`, `_weight_bytes` and `_weight_bytes_by_dtype` (of the
    stored tensors; for a preset, of its parameters in its dtype) and `_tensors`. Headers and
    the meta device only: no weight is read or allocated.
    """
    from transformers import PreTrainedConfig

    from anefx.models import load

    say = progress or quiet()
    # the same validation and bounds as loading: config, files and layers, before the model
    say(f"reading {spec}: the config and every safetensors header")
    plan = load.preflight(spec)
    config, result = plan.config, plan.inferred
    say(f"building its structure on the meta device ({config.num_hidden_layers} layers)")
    model = load.build_meta_model(config, plan.dtype)
    if plan.tensors is not None:
        say(f"checking the {len(plan.tensors)} stored tensors against it")
        load.check_tensors(plan, model)
    params = sum(p.numel() for p in model.parameters())

    by_dtype: Counter[str] = Counter()
    if plan.tensors is not None:
        for entry in plan.tensors.values():
            by_dtype[entry.dtype] += entry.nbytes
    else:
        name = str(plan.dtype).removeprefix("torch.")
        by_dtype[_TORCH_TO_ST.get(name, name)] = params * plan.dtype.itemsize

    # The model's own fields; the generic PreTrainedConfig ones (return_dict, id2label, ...) say
    # nothing about it. Qwen3MoeConfig's to_dict spells num_experts by its alias
    # num_local_experts; the field (and published config.json files) say num_experts.
    generic = set(PreTrainedConfig().to_dict()) - {"architectures", "dtype"}
    out: dict[str, Any] = {"model_type": config.model_type}
    for key, value in config.to_dict().items():
        if key not in generic and not key.startswith("_"):
            out["num_experts" if key == "num_local_experts" else key] = value
    out.update(
        {
            "_source": plan.source,
            "_config": plan.origin,
            "_declared": list(plan.declared),
            "_inferred": result.inferred if result else [],
            "_defaulted": result.defaulted if result else {},
            "_reasons": result.reasons if result else {},
            "_parameters": params,
            "_active_parameters": params - _idle_expert_parameters(model, config),
            "_weight_bytes": sum(by_dtype.values()),
            "_weight_bytes_by_dtype": dict(by_dtype),
            "_tensors": len(plan.tensors) if plan.tensors is not None else None,
        }
    )
    return out
