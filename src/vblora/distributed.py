"""Sharded tensors and ranks: what saving a model trained with FSDP2 (``fully_shard``) needs."""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import Tensor


def is_sharded(tensor: Tensor) -> bool:
    """True for a DTensor, as FSDP2's ``fully_shard`` makes of every parameter."""
    return callable(getattr(tensor, "full_tensor", None))


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor, detached; a DTensor is gathered (a collective: every rank must call)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    return any(is_sharded(t) for t in tensors)


def writer_rank(sharded: bool) -> bool:
    """Whether this process writes shared files: always, unless the tensors are sharded and a
    process group runs, where rank 0 alone writes (the gathered tensors are the same on every rank)."""
    if not sharded:
        return True
    return not dist.is_initialized() or dist.get_rank() == 0


def several_processes() -> bool:
    """Whether a process group of more than one process runs (other ranks may write beside us)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
