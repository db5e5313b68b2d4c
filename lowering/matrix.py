"""The conversion matrix: every preset lowered on the meta device, one row of numbers each.

The presets are the families' own (``models/families``, listed by ``matrix_presets``); a
family whose layers differ (a hybrid's linear-attention and full-attention layers) has its
layers counted by kind, what its capture substituted for the stock code counted, and the
layout changes the lowering could not remove listed, in its row.
"""

from __future__ import annotations

import math
import time

import torch

from anefx.core import rules


def matrix_presets() -> list[str]:
    """The published presets of every family, in listing order (the tiny test presets left
    out, by each family's own name for them)."""
    from anefx.models.families import FAMILIES
    from anefx.models.presets import PRESETS

    tiny = [f.tiny for f in FAMILIES.values()]
    return [n for n in PRESETS if not any(n == t or n.startswith(f"{t}-") for t in tiny)]


def matrix_row(preset: str, seq_len: int = 64) -> dict:
    """Lower PRESET on the meta device (raw report too) and summarise it."""
    import anefx
    from anefx.models.presets import active_parameters, count_parameters, get_preset

    cfg = get_preset(preset)
    t0 = time.perf_counter()
    low = anefx.lower(
        f"preset:{preset}", seq_len=seq_len, dtype=torch.float16, meta=True, raw_report=True
    )
    seconds = time.perf_counter() - t0
    raw, rep = low.captured_report, low.report
    weight_bytes = rep.stats["weight_bytes"]
    row = {
        "preset": preset,
        "family": cfg["model_type"],
        "parameters": count_parameters(cfg),
        "active_parameters": active_parameters(cfg),
        "layers": cfg["num_hidden_layers"],
        "captured_nodes": raw.stats["nodes"],
        "lowered_nodes": rep.stats["nodes"],
        "before": raw.counts(),
        "after": rep.counts(),
        "errors_before": len(raw.errors),
        "errors_after": len(rep.errors),
        # the package-size rule is met by chunking (issue 6), not by the lowering
        "errors_after_except_size": sum(1 for e in rep.errors if e.rule != "weights_size"),
        "lm_head_slices": rep.stats["lm_head_slices"],
        "weight_bytes": weight_bytes,
        "packages_1gb": math.ceil(weight_bytes / rules.WEIGHTS_WARN_BYTES),
        "exported_layers": low.exported_layers,
        "seconds": round(seconds, 2),
    }
    kinds = _layer_kinds(low.config)
    if any(kinds):  # the layers differ: how many of each kind
        row["layer_kinds"] = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    if rep.stats.get("substitutions"):  # stock code capture replaced (the captured graph's)
        row["substitutions"] = len(rep.stats["substitutions"])
    left = rep.stats.get("layout_changes_left")
    if left:  # copies the layout sweep could not remove (not errors; the ANE runs them)
        row["layout_changes_left"] = left["count"]
    blocking = rep.blocking()
    if blocking:  # the constructs errors remain in, by transformers class
        row["blocking"] = [
            {"class": g["class"], "module": g["module"], "errors": g["errors"]} for g in blocking
        ]
    moe = rep.stats.get("moe")
    if moe:
        row["moe_compute_multiplier"] = moe.get("compute_multiplier")
        row["moe_unmatched"] = len(moe.get("unmatched", []))
    return row


def _layer_kinds(config) -> list[str]:
    """The family's label of each layer ("" each when they are alike)."""
    from anefx.models.families import known_family

    family = known_family(config)
    return family.layer_kinds(config) if family else [""] * config.num_hidden_layers


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def render_matrix(rows: list[dict]) -> str:
    """A Markdown table (the README's conversion matrix)."""
    head = (
        "| preset | family | params (active) | layers | captured nodes | ANE violations "
        "captured | after lowering | head slices | weights | packages at 1 GB | seconds |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        params = f"{r['parameters'] / 1e9:.2f} B"
        if r["active_parameters"] != r["parameters"]:
            params += f" ({r['active_parameters'] / 1e9:.2f} B)"
        after = _counts(r["after"])
        if r.get("moe_compute_multiplier"):
            after += f"; MoE dense x{r['moe_compute_multiplier']:g}"
        if r.get("layout_changes_left"):
            after += f"; {r['layout_changes_left']} layout changes left"
        if r.get("blocking"):
            after += "; blocked by " + ", ".join(
                f"{g['class']} ({g['module']}, {g['errors']})" for g in r["blocking"]
            )
        layers = str(r["layers"])
        if r.get("layer_kinds"):
            layers += " (" + ", ".join(f"{n} {k}" for k, n in r["layer_kinds"].items()) + ")"
        before = _counts(r["before"])
        if r.get("substitutions"):
            before += f" (after {r['substitutions']} capture substitutions)"
        lines.append(
            f"| {r['preset']} | {r['family']} | {params} | {layers} | "
            f"{r['captured_nodes']} | {before} | {after} | "
            f"{r['lm_head_slices']} | {r['weight_bytes'] / 1e9:.1f} GB | {r['packages_1gb']} | "
            f"{r['seconds']:.1f} |"
        )
    return "\n".join(lines)
