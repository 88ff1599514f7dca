"""Reading FSDP2-sharded parameters (``DTensor``) and the process's rank, without setting anything up.

The core (merge refusals, saving and loading adapter files) needs to know whether a model is sharded
and to move whole tensors in and out of shards; starting process groups and sharding a model is
:mod:`lorakit.distributed`'s, at the top. Outside ``torch.distributed`` everything here is the
single-process case (rank 0 of 1, nothing sharded).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "is_main", "is_sharded", "full_tensor", "like_param"]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def is_sharded(model: torch.nn.Module, trainable: bool = False) -> bool:
    """True if ``model``'s parameters (``trainable``: its trainable ones) are FSDP2's ``DTensor`` shards."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad or not trainable)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a ``DTensor`` is gathered from every rank (a collective), a tensor returned as is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``t`` laid out like ``param``: this rank's shard of it if ``param`` is a ``DTensor``."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        return distribute_tensor(t.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return t
