"""Reading a checkpoint's stored tensors into a model: checked, memory-mapped or copied.

`validate_tensors` checks every tensor the model needs is stored with its shape and a float
dtype and returns the copy plan; the weights are then memory-mapped where they lie
(`map_weights_`), cast into an unlinked scratch file and mapped from it (`map_converted_`), or
copied (`copy_weights_`). Only the safetensors library reads tensor data, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from anefx.models.checkpoint_files import TensorEntry, input_error
from anefx.models.family import Part, StoredParts, part_of

ST_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

# One stored tensor and where it goes: (state-dict name, where in that tensor, stored name).
# The index is () for the whole tensor; a per-expert tensor fills one slice of a fused one, a
# transposed one the whole tensor with two axes swapped (models/family.py Part).
Copy = tuple[str, Part, str]


def tied_targets(model: PreTrainedModel) -> set[str]:
    """State-dict names that are tied to another tensor and so absent from HF checkpoints."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def checkpoint_names(model: PreTrainedModel) -> list[str]:
    """Names of the tensors a checkpoint for `model` holds, in state-dict order. Integer
    buffers are not among them: tables transformers derives from the config (Qwen4-Exp's
    n-gram hash multipliers and table sizes), which loading recomputes (load.reset_rotary_)
    and a checkpoint that stores them has ignored."""
    skip = tied_targets(model)
    return [
        name
        for name, tensor in model.state_dict().items()
        if name not in skip and (tensor.is_floating_point() or tensor.is_complex())
    ]


# ---------------------------------------------------------------------------------------------
# Memory-mapped weights: a tensor stored in the compute dtype is used where it lies in the
# file, so conversion reads each part's weights from the page cache as it emits that part and
# holds no copy of the model. The mappings are private (copy-on-write): nothing is written back.

_MAPS: list[weakref.ref] = []


def mappable(entry: TensorEntry, index: tuple, dtype: torch.dtype) -> bool:
    return index == () and ST_FLOAT_DTYPES.get(entry.dtype) == dtype


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


def map_weights_(
    model: PreTrainedModel, located: dict[str, TensorEntry], copies: list[Copy]
) -> None:
    """Point each parameter in COPIES at its bytes in the safetensors file (no copy)."""
    cache: dict[Path, mmap.mmap] = {}
    for name, _, src in copies:
        entry = located[src]
        buf = _map_file(entry.path, cache) if math.prod(entry.shape) else None
        _bind_(model, name, buf, entry.offset, ST_FLOAT_DTYPES[entry.dtype], entry.shape)


def map_converted_(
    model: PreTrainedModel, located: dict[str, TensorEntry], copies: list[Copy], dtype
) -> list[Copy]:
    """Write the parameters COPIES fill, cast to DTYPE and assembled, into an unlinked scratch
    file (in $ANEFX_TMPDIR, else the system temp folder) and map them from it; one tensor is in
    memory at a time. Returns the copies whose pieces do not lie in order in their parameter
    (copied into memory instead)."""
    by_param: dict[str, list[Copy]] = {}
    for c in copies:
        by_param.setdefault(c[0], []).append(c)
    state = model.state_dict()
    ordered, left = {}, []
    for name, group in by_param.items():
        # the pieces must tile the parameter in memory order (per-expert tensors do)
        whole = torch.empty(state[name].shape, device="meta")
        at, ok = 0, True
        for _, index, src in group:
            piece = part_of(whole, index)
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
                    if entry.path not in handles:
                        handles[entry.path] = stack.enter_context(
                            safe_open(str(entry.path), framework="pt", device="cpu")
                        )
                    t = handles[entry.path].get_tensor(entry.name_in_file(src))
                    t = t.to(dtype).contiguous()
                except SafetensorError as exc:
                    raise input_error(
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


def materialize_meta_(model: PreTrainedModel) -> None:
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


def validate_tensors(
    folder: Path,
    located: dict[str, TensorEntry],
    expected: dict[str, torch.Tensor],
    wanted: Iterable[str],
    stored_parts: Callable[[str, tuple[int, ...]], StoredParts],
) -> list[Copy]:
    """Check every tensor the model needs is stored with its shape, whole or in the pieces
    STORED_PARTS names (the family's: per-expert tensors of a fused parameter); returns the
    copy plan."""
    copies: list[Copy] = []
    missing: list[str] = []
    for name in wanted:
        want = tuple(expected[name].shape)
        whole = located.get(name)
        if whole is not None and whole.shape == want:
            copies.append((name, (), name))
            continue
        parts = stored_parts(name, want)
        absent = [src for _, src in parts if src not in located]
        fits = all(
            located[src].shape == tuple(part_of(expected[name], index).shape)
            for index, src in parts
            if src in located
        )
        if whole is not None and not (parts and not absent and fits):
            copies.append((name, (), name))  # its shape is refused below, naming the tensor
        elif parts and not absent:
            copies.extend((name, index, src) for index, src in parts)
        elif parts and len(absent) < len(parts):
            missing.append(absent[0])  # stored per expert, but not every expert
        elif parts:
            missing.append(f"{name}' (or per expert '{parts[0][1]}")
        else:
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise input_error(f"{folder}: tensor '{missing[0]}' missing from all shards{more}")
    for name, index, src in copies:
        entry, want = located[src], tuple(part_of(expected[name], index).shape)
        stored = entry.name_in_file(src)  # messages name the tensor as the file does
        if entry.shape != want:
            raise input_error(
                f"{entry.file}: tensor '{stored}' has shape {list(entry.shape)}, expected "
                f"{list(want)}"
            )
        if entry.dtype not in ST_FLOAT_DTYPES:
            raise input_error(
                f"{entry.file}: tensor '{stored}' has dtype {entry.dtype}, expected one of "
                f"{', '.join(ST_FLOAT_DTYPES)}"
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


def copy_weights_(
    model: PreTrainedModel, located: dict[str, TensorEntry], copies: list[Copy]
) -> None:
    targets = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[Copy]] = {}
    for one in copies:
        by_file.setdefault(located[one[2]].file, []).append(one)
    # HF keeps the tie when a checkpoint stores the tied copy too, but only if they agree.
    redundant = [t for t in tied_targets(model) if t in located]
    with torch.no_grad():
        for path, group in by_file.items():
            try:
                # safe_open memory-maps the file, so only one tensor is materialised at a time.
                real = located[group[0][2]].path
                with safe_open(str(real), framework="pt", device="cpu") as fh:
                    for name, index, src in group:
                        stored = located[src].name_in_file(src)
                        part_of(targets[name], index).copy_(fh.get_tensor(stored))
            except SafetensorError as exc:
                raise input_error(f"{path}: cannot read safetensors file: {exc}") from exc
        for name in redundant:
            entry = located[name]
            with safe_open(str(entry.path), framework="pt", device="cpu") as fh:
                stored = fh.get_tensor(entry.name_in_file(name))
            if stored.shape != targets[name].shape or not torch.equal(
                stored.to(targets[name].dtype), targets[name]
            ):
                warnings.warn(
                    f"{entry.file}: tensor '{entry.name_in_file(name)}' differs from the weight "
                    "it is tied to (tie_word_embeddings is true); it is ignored",
                    stacklevel=4,
                )
