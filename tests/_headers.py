"""What a checkpoint's safetensors headers say of tensors, without the files: the input config
inference and recognition read (models/infer_config.py), built from a model's tensors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from anefx.models.checkpoint_files import TensorEntry

FILE = Path("ckpt/model.safetensors")
# multi-token-prediction tensors a published hybrid checkpoint stores beside the model: loading
# and inference skip them and say so
MTP = {"mtp.fc.weight": torch.ones(8, 8), "mtp.norm.weight": torch.ones(8)}


def header(shape: tuple[int, ...], dtype: str = "BF16") -> TensorEntry:
    """One tensor's header entry."""
    return TensorEntry(FILE, dtype, tuple(shape))


def headers(tensors: Mapping[str, torch.Tensor], dtype: str = "BF16") -> dict[str, TensorEntry]:
    """Every tensor's header entry, by name."""
    return {k: header(tuple(v.shape), dtype) for k, v in tensors.items()}
