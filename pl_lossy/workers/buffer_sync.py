"""Module buffers (BatchNorm statistics) made equal over the workers after a round, reliably.

Buffers are not parameters: they do not cross the lossy network. After each round they are made equal
over the workers that are up, with one collective per buffer dtype: ``broadcast`` the first worker up's
(as DDP broadcasts rank 0's), or ``average`` the floating-point ones over the workers up (others are
broadcast); ``none`` keeps every worker's own. A down worker keeps its buffers (it rejoins with them).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

SYNC_BUFFERS = ("broadcast", "average", "none")


def sync_buffers(buffers: Sequence[Tensor], mode: str, n_workers: int, first_worker: int, world_size: int,
                 down_workers: Sequence[int], all_reduce_sum: Callable[[Tensor], None]) -> None:
    """Make ``buffers`` (this process's, each stacked ``[k, ...]``) equal over the workers up; see the module docstring."""
    if mode == "none" or not buffers:
        return
    up = [w for w in range(n_workers) if w not in down_workers] if down_workers else range(n_workers)
    if len(up) <= 1:
        return
    k = buffers[0].shape[0]
    rows = [j for j in range(k) if first_worker + j not in down_workers]  # this process's workers that are up
    for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order on every rank
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(k, -1) for b in group], dim=1)
        if mode == "average" and dtype.is_floating_point:
            synced = flat[rows].sum(0) if len(rows) < k else flat.sum(0)
            all_reduce_sum(synced)
            synced.div_(len(up))
        else:
            source = up[0]
            synced = flat[source % k].clone()
            if world_size > 1:
                dist.broadcast(synced, src=source // k)
        for b, part in zip(group, synced.split([b[0].numel() for b in group])):
            part = part.view_as(b[0])
            if len(rows) == k:
                b.copy_(part.expand_as(b))
            else:
                for row in rows:
                    b[row].copy_(part)
