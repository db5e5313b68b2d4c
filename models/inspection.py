"""`anefx inspect`: a model's config, where each field came from, its parameter count and its
stored weight bytes, without materialising any weight (headers and the meta device only)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from anefx.models import load
from anefx.models.families import family_of
from anefx.progress import Progress, quiet

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
    stored tensors the model reads; for a preset, of its parameters in its dtype) and
    `_tensors`. A family's own rows (`Family.describe`: a hybrid's layer kinds and heads) come
    first, are named in `_derived` and listed with the fields they restate (`_declared` or
    `_inferred`); `_notes` says what loading leaves out (a vision tower's tensors), when it
    does, and PROGRESS says it too. Headers and the meta device only: no weight is read or
    allocated.
    """
    from transformers import PreTrainedConfig

    say = progress or quiet()
    # the same validation and bounds as loading: config, files and layers, before the model
    say(f"reading {spec}: the config and every safetensors header")
    plan = load.preflight(spec)
    config, result = plan.config, plan.inferred
    for note in plan.notes:  # what loading leaves out: said once
        say(note)
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
    # the family's own rows (a hybrid's layer kinds and linear heads): first, and said to come
    # from where the config came from (declared, or inferred from the tensors)
    derived = family_of(config).describe(config)
    out.update(derived)
    for key, value in config.to_dict().items():
        if key not in generic and not key.startswith("_"):
            out["num_experts" if key == "num_local_experts" else key] = value
    out.update(
        {
            "_source": plan.source,
            "_config": plan.origin,
            "_declared": list(plan.declared) + (list(derived) if result is None else []),
            "_inferred": (result.inferred + list(derived)) if result else [],
            "_defaulted": result.defaulted if result else {},
            "_reasons": result.reasons if result else {},
            "_parameters": params,
            "_active_parameters": params - _idle_expert_parameters(model, config),
            "_weight_bytes": sum(by_dtype.values()),
            "_weight_bytes_by_dtype": dict(by_dtype),
            "_tensors": len(plan.tensors) if plan.tensors is not None else None,
        }
    )
    if derived:
        out["_derived"] = list(derived)
    if plan.notes:
        out["_notes"] = list(plan.notes)
    return out
