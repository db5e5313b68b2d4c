"""Build a stock transformers *ForCausalLM from a checkpoint folder or a named preset.

The model always comes from transformers' own classes; this module only decides where its
weights come from (safetensors shards, seeded random values, or nothing at all on the meta
device) and turns every malformed input into a one-line AnefxInputError.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import tempfile
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig, PreTrainedModel

from anefx.errors import AnefxInputError
from anefx.models.infer_config import ConfigDefaultsWarning, infer_from_tensors
from anefx.models.presets import get_preset
from anefx.models.synthetic import random_init_

PRESET_PREFIX = "preset:"

# Model families we can build: model_type -> (config class, causal-LM class) by transformers
# name. Adding a family that transformers already ships is one entry here.
SUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}

# The config classes silently default these (e.g. hidden_size=4096), which would turn a broken
# config.json into a wrongly-shaped model, so they must be present.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_POSITIVE_INT_FIELDS = (
    *REQUIRED_FIELDS,
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "decoder_sparse_step",
)
# Per family, fields its config class would otherwise default (Qwen3MoeConfig: 128 experts of
# width 768); each entry lists the accepted spellings (transformers itself writes
# num_experts as num_local_experts, its attribute_map alias).
_FAMILY_REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {
    "qwen3_moe": (("num_experts", "num_local_experts"), ("moe_intermediate_size",)),
}

LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# safetensors dtype tag -> bytes per element (used to check the header before reading).
_ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_ST_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_RAM_FRACTION = 0.8


@dataclass
class LoadedModel:
    """A transformers causal LM ready for export, plus where it came from."""

    model: PreTrainedModel
    config: PreTrainedConfig
    source: str
    random_weights: bool
    dtype: torch.dtype
    meta: bool


@dataclass(frozen=True)
class _TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _input_error(message: str) -> AnefxInputError:
    return AnefxInputError(_one_line(message))


# ---------------------------------------------------------------------------------------------
# Config and model construction


def _family_classes(model_type: object, where: str) -> tuple[type, type]:
    supported = ", ".join(sorted(SUPPORTED_FAMILIES))
    if model_type is None:
        raise _input_error(f"{where}: field 'model_type' missing; supported: {supported}")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_FAMILIES:
        raise _input_error(
            f"{where}: model_type {model_type!r} is not supported; supported: {supported}"
        )
    config_name, model_name = SUPPORTED_FAMILIES[model_type]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def model_class_for(config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The transformers *ForCausalLM class for `config.model_type`."""
    return _family_classes(config.model_type, "config")[1]


def build_config(raw: dict[str, Any], where: str = "config") -> PreTrainedConfig:
    """Validate a config dict and build its transformers config class, set to eager attention.

    `where` names the source (a config.json path or "preset:NAME") in error messages.
    """
    if not isinstance(raw, dict):
        raise _input_error(f"{where}: expected a JSON object, got {type(raw).__name__}")
    config_cls, _ = _family_classes(raw.get("model_type"), where)
    required = [(f,) for f in REQUIRED_FIELDS] + list(_FAMILY_REQUIRED.get(raw["model_type"], ()))
    for spellings in required:
        if not any(f in raw for f in spellings):
            raise _input_error(
                f"{where}: field '{spellings[0]}' missing (needed by {config_cls.__name__})"
            )
    for field in _POSITIVE_INT_FIELDS:
        if field not in raw or (raw[field] is None and field not in REQUIRED_FIELDS):
            continue
        value = raw[field]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _input_error(
                f"{where}: field '{field}' must be a positive integer, got {value!r}"
            )
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or 0
    if kv_heads and heads % kv_heads:
        raise _input_error(
            f"{where}: field 'num_attention_heads' ({heads}) must be a multiple of "
            f"'num_key_value_heads' ({kv_heads})"
        )

    experts = raw.get("num_experts", raw.get("num_local_experts"))
    top_k = raw.get("num_experts_per_tok")
    if experts is not None and top_k is not None and top_k > experts:
        raise _input_error(
            f"{where}: field 'num_experts_per_tok' ({top_k}) exceeds 'num_experts' ({experts})"
        )

    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        config = config_cls(**kwargs)
    except Exception as exc:  # the strict config dataclasses raise several error types
        raise _input_error(f"{where}: invalid config: {exc}") from exc
    # Eager attention is plain matmul/softmax with an additive mask, the form we lower; it
    # takes a prepared (B, 1, S, S) float mask as is.
    config._attn_implementation = "eager"
    return config


def build_meta_model(config: PreTrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """Construct the family's *ForCausalLM on the meta device with parameters in `dtype`.

    Mirrors transformers' own loading: the default dtype is switched rather than casting the
    model afterwards, so the RoPE buffers (created with an explicit float32 dtype) stay float32.
    """
    model_cls = model_class_for(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def materialize_(model: PreTrainedModel) -> PreTrainedModel:
    """Give a meta model real (uninitialised) CPU storage and restore its weight ties."""
    model.to_empty(device="cpu")
    # to_empty replaces each module's parameter separately, which silently unties lm_head
    # from embed_tokens.
    model.tie_weights()
    return model


def reset_rotary_(model: PreTrainedModel) -> None:
    """Recompute RoPE buffers (garbage after to_empty) with transformers' own initialisation.

    This is the same `_init_weights` path `from_pretrained` uses for non-persistent buffers.
    """
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "inv_freq"):
            model._init_weights(module)


def tied_targets(model: PreTrainedModel) -> set[str]:
    """State-dict names that are tied to another tensor and so absent from HF checkpoints."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def checkpoint_names(model: PreTrainedModel) -> list[str]:
    """Names of the tensors a checkpoint for `model` holds, in state-dict order."""
    skip = tied_targets(model)
    return [name for name in model.state_dict() if name not in skip]


# ---------------------------------------------------------------------------------------------
# safetensors inspection


def read_safetensors_header(path: Path) -> dict[str, _TensorEntry]:
    """Parse and sanity-check a safetensors header without reading tensor data.

    Layout: 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
    dtype, shape and [begin, end) data_offsets relative to the data that follows.
    """

    def corrupt(detail: str) -> AnefxInputError:
        return _input_error(f"{path}: truncated or corrupt safetensors file ({detail})")

    size = path.stat().st_size
    if size < 8:
        raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len > size - 8:
            raise corrupt(f"header length {header_len} but only {size - 8} bytes follow")
        if header_len > _MAX_HEADER_BYTES:
            raise corrupt(f"header length {header_len} is implausibly large")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")

    data_len = size - 8 - header_len
    data_end = 0
    entries: dict[str, _TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise corrupt(f"malformed header entry for tensor '{name}'")
        if end > data_len:
            raise corrupt(f"tensor '{name}' ends at data byte {end} but the file holds {data_len}")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = _ST_ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != numel * itemsize:
            raise corrupt(
                f"tensor '{name}' spans {end - begin} bytes but {dtype}{shape} needs "
                f"{numel * itemsize}"
            )
        data_end = max(data_end, end)
        entries[name] = _TensorEntry(path, dtype, tuple(shape), 8 + header_len + begin)
    if data_end != data_len:
        raise corrupt(f"header describes {data_end} data bytes but the file holds {data_len}")
    return entries


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _input_error(f"{path}: not valid UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise _input_error(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _input_error(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc


def _find_index(folder: Path) -> Path | None:
    preferred = folder / "model.safetensors.index.json"
    if preferred.is_file():
        return preferred
    candidates = sorted(folder.glob("*.safetensors.index.json"))
    return candidates[0] if candidates else None


def _locate_tensors(folder: Path) -> dict[str, _TensorEntry]:
    """Map every tensor name to its shard, from the index if there is one, else the headers."""
    index_path = _find_index(folder)
    if index_path is not None:
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise _input_error(f"{index_path}: field 'weight_map' missing or not a name->file map")
        headers: dict[str, dict[str, _TensorEntry]] = {}
        for shard in dict.fromkeys(weight_map.values()):
            shard_path = folder / shard
            if not shard_path.is_file():
                tensor = next(k for k, v in weight_map.items() if v == shard)
                raise _input_error(
                    f"{index_path}: references missing shard '{shard}' (e.g. for tensor '{tensor}')"
                )
            headers[shard] = read_safetensors_header(shard_path)
        located = {}
        for name, shard in weight_map.items():
            entry = headers[shard].get(name)
            if entry is None:
                raise _input_error(
                    f"{folder / shard}: tensor '{name}' listed in {index_path.name} is not in "
                    "this file"
                )
            located[name] = entry
        return located

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise _input_error(f"{folder}: no *.safetensors files in checkpoint folder")
    located = {}
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if name in located:
                warnings.warn(
                    f"{path}: tensor '{name}' also in {located[name].file.name}; using the latter",
                    stacklevel=3,
                )
                continue
            located[name] = entry
    return located


# ---------------------------------------------------------------------------------------------
# Loading


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in LOADABLE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in LOADABLE_DTYPES)
        raise _input_error(f"dtype {dtype} not supported; use one of {names}")


def _config_dtype(config: PreTrainedConfig) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    return dtype if dtype in LOADABLE_DTYPES else None


def _total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _human_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _check_fits(model: PreTrainedModel, dtype: torch.dtype, source: str, what: str) -> None:
    need = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    ram = _total_ram_bytes()
    if ram is not None and need > _RAM_FRACTION * ram:
        name = str(dtype).removeprefix("torch.")
        raise _input_error(
            f"{source}: {what} {name} weights need {_human_bytes(need)} but this machine has "
            f"{_human_bytes(ram)} of RAM; use --meta to build the structure only"
        )


def _finish(
    model: PreTrainedModel, source: str, random_weights: bool, dtype: torch.dtype, meta: bool
) -> LoadedModel:
    model.config.dtype = dtype
    model.eval()
    return LoadedModel(model, model.config, source, random_weights, dtype, meta)


def _load_preset(name: str, dtype: torch.dtype | None, meta: bool, seed: int) -> LoadedModel:
    source = f"{PRESET_PREFIX}{name}"
    config = build_config(get_preset(name), source)
    dtype = dtype or _config_dtype(config) or torch.bfloat16
    model = build_meta_model(config, dtype)
    if not meta:
        _check_fits(model, dtype, source, "random")
        materialize_(model)
        random_init_(model, seed)
        reset_rotary_(model)
    return _finish(model, source, True, dtype, meta)


def check_folder(folder: Path) -> None:
    """Raise AnefxInputError unless `folder` is a folder with config.json or safetensors."""
    if not folder.exists():
        raise _input_error(f"{folder}: checkpoint folder does not exist")
    if not folder.is_dir():
        raise _input_error(f"{folder}: not a folder; expected a checkpoint folder")
    if not (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        raise _input_error(
            f"{folder}: config.json and *.safetensors files missing from checkpoint folder"
        )


def _load_folder(folder: Path, dtype: torch.dtype | None, meta: bool) -> LoadedModel:
    check_folder(folder)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = build_config(_read_json(config_path), str(config_path))
        located = _locate_tensors(folder)
    else:
        # Without config.json the tensor shapes give the config; what they cannot tell comes
        # from the defaults table, named in one warning.
        located = _locate_tensors(folder)
        inferred = infer_from_tensors(located, str(folder))
        warnings.warn(inferred.warning_text(str(folder)), ConfigDefaultsWarning, stacklevel=3)
        config = build_config(inferred.config, f"{folder} (config inferred from tensor shapes)")

    if dtype is None:
        dtype = _config_dtype(config)
    if dtype is None:
        found = (_ST_FLOAT_DTYPES.get(e.dtype) for e in located.values())
        dtype = next((d for d in found if d is not None), torch.float32)

    model = build_meta_model(config, dtype)
    copies = _validate_tensors(folder, located, model.state_dict(), checkpoint_names(model))
    if not meta:
        mappable = [c for c in copies if _mappable(located[c[2]], c[1], dtype)]
        _map_weights_(model, located, mappable)
        # another dtype, or experts stored apart: cast / assembled into a scratch file, mapped
        rest = _map_converted_(model, located, [c for c in copies if c not in mappable], dtype)
        if rest:
            _check_fits(model, dtype, str(folder), "the")
        _materialize_meta_(model)  # storage for what is left and for the rotary buffers
        model.tie_weights()
        _copy_weights_(model, located, rest)
        reset_rotary_(model)
    return _finish(model, str(folder), False, dtype, meta)


# ---------------------------------------------------------------------------------------------
# Memory-mapped weights: a tensor stored in the compute dtype is used where it lies in the
# file, so conversion reads each part's weights from the page cache as it emits that part and
# holds no copy of the model. The mappings are private (copy-on-write): nothing is written back.

_MAPS: list[weakref.ref] = []


def _mappable(entry: _TensorEntry, index: tuple, dtype: torch.dtype) -> bool:
    return index == () and _ST_FLOAT_DTYPES.get(entry.dtype) == dtype


def _map_file(path: Path, cache: dict) -> mmap.mmap:
    if path not in cache:
        with open(path, "rb") as fh:
            cache[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        _MAPS.append(weakref.ref(cache[path]))
    return cache[path]


def _bind_(model: PreTrainedModel, name: str, buf, offset: int, dtype, shape) -> None:
    """Make parameter (or buffer) NAME the tensor at OFFSET of mapping BUF."""
    count = math.prod(shape)
    if count == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape)
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _map_weights_(
    model: PreTrainedModel, located: dict[str, _TensorEntry], copies: list[_Copy]
) -> None:
    """Point each parameter in COPIES at its bytes in the safetensors file (no copy)."""
    cache: dict[Path, mmap.mmap] = {}
    for name, _, src in copies:
        entry = located[src]
        buf = _map_file(entry.file, cache) if math.prod(entry.shape) else None
        _bind_(model, name, buf, entry.offset, _ST_FLOAT_DTYPES[entry.dtype], entry.shape)


def _map_converted_(
    model: PreTrainedModel, located: dict[str, _TensorEntry], copies: list[_Copy], dtype
) -> list[_Copy]:
    """Write the parameters COPIES fill, cast to DTYPE and assembled, into an unlinked scratch
    file (in $ANEFX_TMPDIR, else the system temp folder) and map them from it; one tensor is in
    memory at a time. Returns the copies whose pieces do not lie in order in their parameter
    (copied into memory instead)."""
    by_param: dict[str, list[_Copy]] = {}
    for c in copies:
        by_param.setdefault(c[0], []).append(c)
    state = model.state_dict()
    ordered, left = {}, []
    for name, group in by_param.items():
        # the pieces must tile the parameter in memory order (per-expert tensors do)
        whole = torch.empty(state[name].shape, device="meta")
        at, ok = 0, True
        for _, index, src in group:
            piece = whole[index] if index else whole
            ok &= piece.storage_offset() == at and piece.is_contiguous()
            at += math.prod(located[src].shape)
        if ok and at == whole.numel():
            ordered[name] = group
        else:
            left += group
    if not ordered:
        return left
    fd, path = tempfile.mkstemp(prefix="anefx-cast-", dir=os.environ.get("ANEFX_TMPDIR"))
    os.unlink(path)  # the space is freed when the last mapping of it goes
    placed = []
    with os.fdopen(fd, "w+b") as fh, contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for name, group in ordered.items():
            placed.append((name, fh.tell()))
            for _, _, src in group:
                entry = located[src]
                try:
                    if entry.file not in handles:
                        handles[entry.file] = stack.enter_context(
                            safe_open(str(entry.file), framework="pt", device="cpu")
                        )
                    t = handles[entry.file].get_tensor(src).to(dtype).contiguous()
                except SafetensorError as exc:
                    raise _input_error(
                        f"{entry.file}: cannot read safetensors file: {exc}"
                    ) from None
                fh.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
            fh.write(b"\0" * (-fh.tell() % 64))
        fh.flush()
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if fh.tell() else None
    if buf is not None:
        _MAPS.append(weakref.ref(buf))
    for name, offset in placed:
        _bind_(model, name, buf, offset, dtype, tuple(state[name].shape))
    return left


def _materialize_meta_(model: PreTrainedModel) -> None:
    """Give every parameter and buffer still on the meta device (uninitialised) CPU storage."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and t.is_meta:
                    new = torch.empty_like(t, device="cpu")
                    store[key] = (
                        torch.nn.Parameter(new, requires_grad=False)
                        if isinstance(t, torch.nn.Parameter)
                        else new
                    )


def release_mapped_pages() -> int:
    """Drop the memory-mapped weight pages from this process's resident set; returns how
    many mappings were advised. The data stays in the page cache and is read back on the next
    touch, so this is safe at any time; the chunked emitter calls it after each part."""
    advised = 0
    for ref in list(_MAPS):
        mm = ref()
        if mm is None:
            _MAPS.remove(ref)
            continue
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED)
            advised += 1
    return advised


# One stored tensor and where it goes: (state-dict name, index into that tensor, stored name).
# The index is () for the whole tensor; a per-expert tensor fills one slice of a fused one.
_Copy = tuple[str, tuple[int | slice, ...], str]

_FUSED_EXPERTS = re.compile(r"^(.+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def expert_sources(name: str, shape: tuple[int, ...]) -> list[tuple[tuple[int | slice, ...], str]]:
    """The per-expert checkpoint tensors making up fused expert parameter `name` (else []).

    Published Qwen3-MoE checkpoints, and transformers' own save_pretrained (which undoes its
    load-time fusion), store `experts.<e>.{gate,up,down}_proj.weight`; the model holds
    `experts.gate_up_proj` (E, 2I, H), gate rows first, and `experts.down_proj` (E, H, I).
    """
    match = _FUSED_EXPERTS.match(name)
    if match is None or len(shape) != 3:
        return []
    prefix, kind = match.groups()
    if kind == "down_proj":
        return [((e,), f"{prefix}.{e}.down_proj.weight") for e in range(shape[0])]
    half = shape[1] // 2
    parts = []
    for e in range(shape[0]):
        parts.append(((e, slice(0, half)), f"{prefix}.{e}.gate_proj.weight"))
        parts.append(((e, slice(half, None)), f"{prefix}.{e}.up_proj.weight"))
    return parts


def _validate_tensors(
    folder: Path,
    located: dict[str, _TensorEntry],
    expected: dict[str, torch.Tensor],
    wanted: Iterable[str],
) -> list[_Copy]:
    """Check every tensor the model needs is stored with its shape; returns the copy plan."""
    copies: list[_Copy] = []
    missing: list[str] = []
    for name in wanted:
        if name in located:
            copies.append((name, (), name))
            continue
        parts = expert_sources(name, tuple(expected[name].shape))
        absent = [src for _, src in parts if src not in located]
        if parts and not absent:
            copies.extend((name, index, src) for index, src in parts)
        elif parts and len(absent) < len(parts):
            missing.append(absent[0])  # stored per expert, but not every expert
        elif parts:
            missing.append(f"{name}' (or per expert '{parts[0][1]}")
        else:
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _input_error(f"{folder}: tensor '{missing[0]}' missing from all shards{more}")
    for name, index, src in copies:
        entry, want = located[src], tuple(expected[name][index].shape)
        if entry.shape != want:
            raise _input_error(
                f"{entry.file}: tensor '{src}' has shape {list(entry.shape)}, expected {list(want)}"
            )
        if entry.dtype not in _ST_FLOAT_DTYPES:
            raise _input_error(
                f"{entry.file}: tensor '{src}' has dtype {entry.dtype}, expected one of "
                f"{', '.join(_ST_FLOAT_DTYPES)}"
            )
    # Tied targets (lm_head.weight) that a checkpoint carries anyway are checked when copying.
    extra = sorted(set(located) - set(expected) - {src for _, _, src in copies})
    if extra:
        shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
        warnings.warn(
            f"{folder}: ignoring {len(extra)} tensor(s) the model does not use: {shown}",
            stacklevel=4,
        )
    return copies


def _copy_weights_(
    model: PreTrainedModel, located: dict[str, _TensorEntry], copies: list[_Copy]
) -> None:
    targets = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[_Copy]] = {}
    for copy in copies:
        by_file.setdefault(located[copy[2]].file, []).append(copy)
    # HF keeps the tie when a checkpoint stores the tied copy too, but only if they agree.
    redundant = [t for t in tied_targets(model) if t in located]
    with torch.no_grad():
        for path, group in by_file.items():
            try:
                # safe_open memory-maps the file, so only one tensor is materialised at a time.
                with safe_open(str(path), framework="pt", device="cpu") as fh:
                    for name, index, src in group:
                        targets[name][index].copy_(fh.get_tensor(src))
            except SafetensorError as exc:
                raise _input_error(f"{path}: cannot read safetensors file: {exc}") from exc
        for name in redundant:
            entry = located[name]
            with safe_open(str(entry.file), framework="pt", device="cpu") as fh:
                stored = fh.get_tensor(name)
            if stored.shape != targets[name].shape or not torch.equal(
                stored.to(targets[name].dtype), targets[name]
            ):
                warnings.warn(
                    f"{entry.file}: tensor '{name}' differs from the weight it is tied to "
                    "(tie_word_embeddings is true); it is ignored",
                    stacklevel=4,
                )


def load_model(
    spec: str | os.PathLike[str],
    dtype: torch.dtype | None = torch.float16,
    meta: bool = False,
    seed: int = 0,
) -> LoadedModel:
    """Load a checkpoint folder or "preset:NAME" into the stock transformers causal LM.

    A folder without config.json gets the config its tensor shapes give (models/infer_config.py),
    with one ConfigDefaultsWarning naming the fields set to defaults. Experts stored per expert
    (as published) or fused (E, ...) both load. dtype None keeps the checkpoint's own dtype.
    meta=True builds the structure only, on the meta device. Presets get seeded random weights
    (`seed`). Bad input raises AnefxInputError.
    """
    _check_dtype(dtype)
    spec_str = os.fspath(spec)
    if spec_str.startswith(PRESET_PREFIX):
        return _load_preset(spec_str[len(PRESET_PREFIX) :], dtype, meta, seed)
    return _load_folder(Path(spec_str), dtype, meta)
