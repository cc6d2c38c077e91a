"""This process's rank and the two collectives checkpoint I/O needs; outside a process group
(a plain script) there is one rank and nothing to wait for."""
from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(objects: list) -> None:
    """Rank 0's ``objects`` (a list, changed in place) on every rank."""
    if dist.is_initialized():
        dist.broadcast_object_list(objects, src=0)
