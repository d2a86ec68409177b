"""The few collectives interest discovery needs, each a no-op without a process group (or with one rank),
so the same clustering code runs in one process and across ranks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def group_active(group: Optional[dist.ProcessGroup]) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(t: torch.Tensor, group, op=None) -> torch.Tensor:
    if group_active(group):
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def all_gather_scalar(value: int, device: torch.device, group) -> torch.Tensor:
    if not group_active(group):
        return torch.tensor([value], device=device)
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=device), group=group)
    return torch.cat(out)


def global_offsets(n_local: int, device: torch.device, group) -> Tuple[int, int]:
    """(index of this rank's first row, total rows) when the ranks' rows are concatenated in rank order."""
    sizes = all_gather_scalar(n_local, device, group)
    rank = dist.get_rank(group) if group_active(group) else 0
    return int(sizes[:rank].sum()), int(sizes.sum())


def broadcast_from_first(t: torch.Tensor, group) -> torch.Tensor:
    """`t` as the group's first rank holds it, on every rank (in place)."""
    if group_active(group):
        dist.broadcast(t, group=group, group_src=0)
    return t
