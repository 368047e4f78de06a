"""One rank's side of the RPS exchange: the model in two flat buffers, one all_reduce per round.

The parameters live as views of a flat buffer padded to ``[S, P, E]`` (see :class:`~pl_lossy.rps.PacketLayout`).
A round writes ``own * w`` straight into the *other* buffer (the only dense pass besides the
all_reduce), sums it over ranks in place, patches the few packets this worker did not receive back
from its own buffer, and then makes the other buffer the parameters' storage. Two flat copies of the
model per rank, three with dedicated servers (their previous blocks); nothing else is allocated per
round but index tensors as long as the number of lost packets.

Each buffer ends in one slot per rank (``side``): a rank writes a scalar (its compute time) into its
own slot and the same all_reduce hands every rank everyone's value, so no extra collective is needed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import rps

AllReduce = Callable[[Tensor], None]


class RPSExchange:
    def __init__(
        self,
        params: Sequence[Tensor],
        rank: int,
        n_workers: int,
        n_servers: int,
        packet_bytes: int = 1400,
        colocated_servers: bool = True,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("the model has no trainable parameters to exchange")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"RPS exchanges one floating-point dtype; the parameters have {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        if colocated_servers and n_servers > n_workers:
            raise ValueError(f"num_servers={n_servers} co-located servers need as many workers; there are {n_workers}")
        self.rank, self.n_workers, self.colocated_servers = rank, n_workers, colocated_servers
        self.params = params
        numel = sum(p.numel() for p in params)
        self.layout = rps.PacketLayout.for_model(numel, n_servers, packet_bytes)
        dtype, device = params[0].dtype, params[0].device
        n = self.layout.padded_numel
        self._flat = [torch.zeros(n + n_workers, dtype=dtype, device=device) for _ in range(2)]
        self._views: list[list[Tensor]] = [[], []]
        offset = 0
        for p in params:
            for k in range(2):
                self._views[k].append(self._flat[k][offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        with torch.no_grad():
            for p, v in zip(params, self._views[0]):
                v.copy_(p)
        self._current = 0
        self._repoint()
        self.server_blocks = None if colocated_servers else self.blocks(0).clone()
        self._weights = torch.empty(self.layout.shape[:2], dtype=dtype)  # CPU: computed from CPU masks

    def blocks(self, k: int | None = None) -> Tensor:
        """Buffer ``k`` (default: the parameters' current storage) as ``[S, P, E]``."""
        k = self._current if k is None else k
        return self._flat[k][: self.layout.padded_numel].view(self.layout.shape)

    @property
    def flat(self) -> Tensor:
        """The parameters' current flat storage (padding and side slots included)."""
        return self._flat[self._current]

    def _repoint(self) -> None:
        for p, v in zip(self.params, self._views[self._current]):
            p.data = v

    def sync_from_params(self) -> None:
        """Re-adopt the parameters if something replaced their storage (e.g. ``load_state_dict(assign=True)``)."""
        for p, v in zip(self.params, self._views[self._current]):
            if p.data.data_ptr() != v.data_ptr():
                with torch.no_grad():
                    v.copy_(p.data)
                p.data = v

    @torch.no_grad()
    def step(self, up: Tensor, down: Tensor, all_reduce: AllReduce, side_value: float = 0.0) -> Tensor:
        """Run one round given the global masks (bool CPU tensors ``[W, S, P]`` and ``[S, W, P]``).

        ``all_reduce`` must sum a tensor in place over all ranks. Returns the ``[W]`` side values
        (``side_value`` of every rank).
        """
        own, nxt = self.blocks(self._current), self.blocks(1 - self._current)
        send = self._flat[1 - self._current]
        device = own.device
        counts = rps.server_counts(up)
        weights = rps.uplink_weights(up[self.rank], counts, self._weights)
        rps.scale_blocks(own, weights.to(device, non_blocking=True), out=nxt)
        side = send[self.layout.padded_numel :]
        side.zero_()
        side[self.rank] = side_value
        all_reduce(send)
        if self.server_blocks is not None:
            rps.copy_packets(nxt, self.server_blocks, rps.silent_packets(counts).to(device))
            self.server_blocks.copy_(nxt)
        rps.copy_packets(nxt, own, rps.lost_packets(down[:, self.rank]).to(device))
        self._current = 1 - self._current
        self._repoint()
        return side

    @torch.no_grad()
    def divergence(self, all_reduce: AllReduce) -> tuple[float, float]:
        """Replicas' spread: ``(rms_i ||v_i - mean||, ||mean||)``. Two all_reduces; uses the spare buffer."""
        own = self._flat[self._current][: self.layout.padded_numel]
        spare = self._flat[1 - self._current][: self.layout.padded_numel]
        spare.copy_(own)
        all_reduce(spare)
        spare.div_(self.n_workers)
        mean_norm = float(spare.norm())
        spare.sub_(own)
        sq = spare.norm().square().reshape(1).to(torch.float64)
        all_reduce(sq)
        return float(sq.div_(self.n_workers).sqrt_()), mean_norm

    def state_dict(self) -> dict:
        return {"server_blocks": None if self.server_blocks is None else self.server_blocks.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        blocks = state.get("server_blocks")
        if (blocks is None) != (self.server_blocks is None):
            raise ValueError("checkpoint and strategy disagree on co-located vs dedicated servers")
        if blocks is not None:
            if tuple(blocks.shape) != tuple(self.server_blocks.shape):
                raise ValueError(f"checkpoint's server blocks {tuple(blocks.shape)} do not fit this model's layout {self.layout.shape}")
            self.server_blocks.copy_(blocks)
