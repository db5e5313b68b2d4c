"""Seeded random weights: values that depend only on the seed, the tensor's name and its shape.

So the same model comes out whatever the dtype, the tying or the order in which tensors are
visited: `random_init_` fills a model, and models/synthetic.py writes the same values into
checkpoint files without building the model.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

CHUNK = 1 << 22  # elements generated at once: bounds the float32 scratch to 16 MB
STD, NORM_STD = 0.02, 0.1  # random_init_'s defaults, which checkpoints are written with


def _stream_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def fill_normal_(
    tensor: torch.Tensor,
    seed: int,
    name: str,
    mean: float,
    std: float,
    scratch: torch.Tensor | None = None,
) -> None:
    # `scratch`, float32 of at least CHUNK elements, is reused across calls by the checkpoint
    # writer: a fresh 16 MB buffer per chunk fragments the heap between the tensors it keeps.
    gen = torch.Generator(device="cpu").manual_seed(_stream_seed(seed, name))
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        if scratch is None:
            chunk = torch.empty(stop - start, dtype=torch.float32)
        else:
            chunk = scratch[: stop - start]
        chunk.normal_(generator=gen)
        flat[start:stop].copy_(chunk.mul_(std).add_(mean))


def init_stats(model: nn.Module, name: str, std: float, norm_std: float) -> tuple[float, float]:
    """(mean, std) of parameter `name`: norm weights 1 + norm_std * N(0, 1), the rest std * N."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf == "weight" and "Norm" in type(owner).__name__:
        return 1.0, norm_std
    # Biases use the same scale as matrices: small, but non-zero so they are tested.
    return 0.0, std


def random_init_(
    model: nn.Module, seed: int = 0, std: float = STD, norm_std: float = NORM_STD
) -> nn.Module:
    """Overwrite every parameter with seeded random values, in place; returns `model`.

    Matrices and embeddings ~ N(0, std); norm weights ~ 1 + norm_std * N(0, 1), so a test that
    ignored them would notice; biases ~ std * N(0, 1). Tied parameters are filled once.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_meta:
                raise ValueError(f"parameter '{name}' is on the meta device; materialise it first")
            mean, scale = init_stats(model, name, std, norm_std)
            fill_normal_(param, seed, name, mean, scale)
    return model
