"""One rank's side of the RPS exchange: the model in one flat buffer, one all_reduce per round.

The parameters live as views of a flat buffer padded to ``[S, P, E]`` (see :class:`~pl_lossy.rps.PacketLayout`),
so a round works on the model in place:

1. copy aside the few packets whose averaged value will not reach this worker (sparse);
2. scale every packet by its uplink weight ``w = up[i] / c`` (the only dense pass besides the
   all_reduce; in place, which costs about half an out-of-place copy);
3. all_reduce (sum): every packet now holds its server's average;
4. put the packets copied aside back (keep-own, sparse).

Nothing the size of the model is allocated per round: the extra memory is a scratch that grows to
the largest number of lost packets seen, plus, with dedicated servers, their previous blocks (one
model copy). Each buffer ends in one slot per rank (``side``): a rank writes a scalar (its compute
time) into its own slot and the same all_reduce hands every rank everyone's value, so no extra
collective is needed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import rps

AllReduce = Callable[[Tensor], None]

#: Elements per all_reduce when measuring divergence (bounds its scratch memory).
DIVERGENCE_CHUNK = 1 << 20


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
        self._flat = torch.zeros(n + n_workers, dtype=dtype, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                view = self._flat[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
        self.server_blocks = None if colocated_servers else self.blocks().clone()
        self._weights = torch.empty(self.layout.shape[:2], dtype=dtype)  # CPU: computed from CPU masks
        self._kept = torch.empty(0, self.layout.elems_per_packet, dtype=dtype, device=device)
        self._spare: Tensor | None = None

    def blocks(self) -> Tensor:
        """The parameters' storage as ``[S, P, E]``."""
        return self._flat[: self.layout.padded_numel].view(self.layout.shape)

    @property
    def flat(self) -> Tensor:
        """The parameters' flat storage (padding and side slots included)."""
        return self._flat

    def extra_bytes(self) -> int:
        """Memory the exchange holds beyond the parameters themselves."""
        extra = (self._flat.numel() - self.layout.numel) * self._flat.element_size()
        for t in (self.server_blocks, self._kept, self._spare):
            if t is not None:
                extra += t.numel() * t.element_size()
        return extra

    def _keep_aside(self, packets: Tensor) -> Tensor:
        k = packets.numel()
        if k > self._kept.shape[0]:  # grows to the most packets ever lost in one round, then stays
            self._kept = torch.empty(max(k, 2 * self._kept.shape[0]), self.layout.elems_per_packet,
                                     dtype=self._flat.dtype, device=self._flat.device)
        kept = self._kept[:k]
        torch.index_select(self.blocks().view(-1, self.layout.elems_per_packet), 0, packets, out=kept)
        return kept

    @torch.no_grad()
    def step(self, up: Tensor, down: Tensor, all_reduce: AllReduce, side_value: float = 0.0) -> Tensor:
        """Run one round given the global masks (bool CPU tensors ``[W, S, P]`` and ``[S, W, P]``).

        ``all_reduce`` must sum a tensor in place over all ranks. Returns the ``[W]`` side values
        (``side_value`` of every rank).
        """
        blocks = self.blocks()
        device = blocks.device
        lost = rps.lost_packets(down[:, self.rank]).to(device)
        kept = self._keep_aside(lost)
        counts = rps.server_counts(up)
        weights = rps.uplink_weights(up[self.rank], counts, self._weights)
        rps.scale_blocks_(blocks, weights.to(device, non_blocking=True))
        side = self._flat[self.layout.padded_numel :]
        side.zero_()
        side[self.rank] = side_value
        all_reduce(self._flat)
        if self.server_blocks is not None:
            rps.copy_packets(blocks, self.server_blocks, rps.silent_packets(counts).to(device))
            self.server_blocks.copy_(blocks)
        if lost.numel():
            blocks.view(-1, self.layout.elems_per_packet).index_copy_(0, lost, kept)
        return side

    @torch.no_grad()
    def divergence(self, all_reduce: AllReduce) -> tuple[float, float]:
        """Replicas' spread: ``(rms_i ||v_i - mean||, ||mean||)``, in chunks through a small scratch."""
        own = self._flat[: self.layout.numel]
        if self._spare is None:
            self._spare = torch.empty(min(DIVERGENCE_CHUNK, own.numel()), dtype=own.dtype, device=own.device)
        sums = torch.zeros(2, dtype=torch.float64, device=own.device)  # ||mean||^2, ||v_i - mean||^2
        for start in range(0, own.numel(), self._spare.numel()):
            chunk = own[start : start + self._spare.numel()]
            spare = self._spare[: chunk.numel()]
            spare.copy_(chunk)
            all_reduce(spare)
            spare.div_(self.n_workers)
            sums[0] += spare.double().square().sum()
            spare.sub_(chunk)
            sums[1] += spare.double().square().sum()
        spread = sums[1:].clone()
        all_reduce(spread)
        return float(spread.div_(self.n_workers).sqrt_()), float(sums[0].sqrt())
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
