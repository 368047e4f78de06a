"""One process's side of the RPS exchange: its workers' models in one storage, one all_reduce per round.

The storage holds the ``k`` workers of this process as rows of the packet layout ``[k, S, P, E]`` (see
:class:`~pl_lossy.round.rps.PacketLayout` and :class:`~pl_lossy.workers.replicas.WorkerReplicas`), followed by
``SIDE_FIELDS`` *side slots* per process: a process writes scalars (its compute time, a hash of the
masks it applies) into its own slots and the round's all_reduce hands every process everyone's
values, so no extra collective is needed. Side values must be exact in fp32 to compare (integers
below 2^24 are).

A round, given the global masks (every process knows them):

1. copy aside the few packets whose averaged value will not reach a worker here (sparse);
2. this process's contribution to every server: ``send = sum_j v_j * w_j`` with the uplink weights
   ``w_j = up[j] / c`` per packet (the only dense pass besides the all_reduce);
3. all_reduce (sum): every packet now holds its server's average;
4. every worker takes the averages, then the packets copied aside are put back (keep-own, sparse).

Two ways to do 2-4, the same math (:func:`pl_lossy.round.rps.rps_round`):

- *in place* (one fp32 worker per process, the common case): ``v *= w`` on the parameters'
  own storage, then the all_reduce of that storage. Nothing model-sized is allocated.
- *wire buffer* (several workers per process, or parameters in bf16/fp16): ``send`` is an fp32
  buffer the size of one model, summed over the ``k`` workers, all_reduced, then copied into every
  worker. Packets carry fp32 whatever the parameters' dtype, so weights, sums and averages are fp32:
  averaging identical bf16 replicas leaves them unchanged.

On CUDA nothing in a round waits for the device: masks, weights and packet indices are built on the
host and sent with non-blocking copies from pinned memory.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import rps

AllReduce = Callable[[Tensor], None]

#: Elements per all_reduce when measuring divergence (bounds its scratch memory).
DIVERGENCE_CHUNK = 1 << 20
#: Scalars each process sends along with every round: ``[compute time, mask hash]``.
SIDE_FIELDS = 2


class RPSExchange:
    """The exchange of process ``process_rank`` (of ``n_processes``) hosting ``workers_per_process``
    workers ``process_rank * k ... + k - 1`` over ``storage`` (1-D: ``k`` rows of ``layout.padded_numel``,
    then ``SIDE_FIELDS x n_processes`` side slots)."""

    def __init__(
        self,
        storage: Tensor,
        layout: rps.PacketLayout,
        process_rank: int,
        n_processes: int,
        workers_per_process: int = 1,
        colocated_servers: bool = True,
    ) -> None:
        k = workers_per_process
        n_side = SIDE_FIELDS * n_processes
        if storage.dim() != 1 or storage.numel() != k * layout.padded_numel + n_side:
            raise ValueError(f"storage must be 1-D of {k} x {layout.padded_numel} + {n_side} elements, got {tuple(storage.shape)}")
        self.n_workers = n_processes * k
        if colocated_servers and layout.n_servers > self.n_workers:
            raise ValueError(f"num_servers={layout.n_servers} co-located servers need as many workers; there are {self.n_workers}")
        self.storage, self.layout, self.k = storage, layout, k
        self.process_rank, self.n_processes = process_rank, n_processes
        self.first_worker = process_rank * k
        self.colocated_servers = colocated_servers
        dtype, device = storage.dtype, storage.device
        self.in_place = k == 1 and dtype == torch.float32
        # one worker, its own server: nothing crosses the network and the round changes nothing
        self.identity = self.n_workers == 1 and colocated_servers
        n = layout.padded_numel
        # made on the first round that needs it: a gradient rule keeps this exchange for divergence only
        self._wire: Tensor | None = None
        self._wire_numel = None if self.in_place or self.identity else n + n_side
        self.server_blocks = None if colocated_servers else self.blocks()[0].float().clone()
        self._weights = torch.empty((k, *layout.shape[:2]), dtype=torch.float32)  # CPU: computed from CPU masks
        self._kept = torch.empty(0, layout.elems_per_packet, dtype=dtype, device=device)
        self._spare: Tensor | None = None

    @classmethod
    def for_params(
        cls, params: Sequence[Tensor], rank: int, n_workers: int, n_servers: int,
        packet_bytes: int = 1400, colocated_servers: bool = True,
    ) -> "RPSExchange":
        """One worker per process over plain tensors: lays them out in a new storage and makes them its views."""
        params = list(params)
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"RPS exchanges one floating-point dtype; the parameters have {sorted(map(str, dtypes))}")
        layout = rps.PacketLayout.for_model(sum(p.numel() for p in params), n_servers, packet_bytes)
        storage = torch.zeros(layout.padded_numel + SIDE_FIELDS * n_workers, dtype=params[0].dtype, device=params[0].device)
        offset = 0
        with torch.no_grad():
            for p in params:
                view = storage[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
        return cls(storage, layout, rank, n_workers, 1, colocated_servers)

    def blocks(self) -> Tensor:
        """This process's workers' models as ``[k, S, P, E]`` (views of the storage)."""
        return self.storage[: self.k * self.layout.padded_numel].view(self.k, *self.layout.shape)

    def side(self) -> Tensor:
        """The side slots ``[SIDE_FIELDS, n_processes]`` after a round: every process's values."""
        buffer = self.storage if self._wire is None else self._wire
        return buffer[buffer.numel() - SIDE_FIELDS * self.n_processes :].view(SIDE_FIELDS, self.n_processes)

    def extra_bytes(self) -> int:
        """Memory the exchange holds beyond the parameters themselves."""
        extra = (self.storage.numel() - self.k * self.layout.numel) * self.storage.element_size()
        for t in (self.server_blocks, self._kept, self._spare, self._wire):
            if t is not None:
                extra += t.numel() * t.element_size()
        return extra

    def free_scratch(self) -> None:
        """Release the fp32 wire buffer (one model's size) until a round needs it again: a fit has ended."""
        self._wire = None

    def _to_device(self, t: Tensor) -> Tensor:
        device = self.storage.device
        if device.type == "cpu":
            return t
        # pinned copies come from torch's caching host allocator, which reuses a block only after its copy is done
        return t.pin_memory().to(device, non_blocking=True)

    def _keep_aside(self, packets: Tensor) -> Tensor:
        k = packets.numel()
        if k > self._kept.shape[0]:  # grows to the most packets ever lost in one round, then stays
            self._kept = torch.empty(max(k, 2 * self._kept.shape[0]), self.layout.elems_per_packet,
                                     dtype=self.storage.dtype, device=self.storage.device)
        kept = self._kept[:k]
        torch.index_select(self.blocks().view(-1, self.layout.elems_per_packet), 0, packets, out=kept)
        return kept

    @torch.no_grad()
    def step(self, up: Tensor, down: Tensor, all_reduce: AllReduce, side_values: tuple[float, ...] = (0.0, 0.0)) -> Tensor:
        """Run one round given the global masks (bool CPU tensors ``[W, S, P]`` and ``[S, W, P]``).

        ``all_reduce`` must sum a tensor in place over all processes. Returns the side values
        ``[SIDE_FIELDS, n_processes]`` (``side_values`` of every process), on the storage's device.
        """
        if self.identity:  # nothing to send: the side values stay on the host (no kernel, nothing to read back)
            return torch.tensor(side_values, dtype=torch.float32).view(SIDE_FIELDS, 1)
        first, k, E = self.first_worker, self.k, self.layout.elems_per_packet
        blocks = self.blocks()
        lost_cpu = rps.lost_packets(down[:, first : first + k].transpose(0, 1))
        lost = self._to_device(lost_cpu)
        kept = self._keep_aside(lost) if lost_cpu.numel() else None
        counts = rps.server_counts(up)
        weights = self._to_device(rps.uplink_weights(up[first : first + k], counts, self._weights))
        silent = None if self.server_blocks is None else self._to_device(rps.silent_packets(counts))
        if self.in_place:
            rps.scale_blocks_(blocks[0], weights[0].to(blocks.dtype))
            send, buffer = blocks[0], self.storage
        else:
            if self._wire is None:
                self._wire = torch.zeros(self._wire_numel, dtype=torch.float32, device=self.storage.device)
            buffer = self._wire
            send = buffer[: self.layout.padded_numel].view(self.layout.shape)
            torch.mul(blocks[0], weights[0].unsqueeze(-1), out=send)
            for j in range(1, k):
                send.addcmul_(blocks[j], weights[j].unsqueeze(-1))
        side = buffer[buffer.numel() - SIDE_FIELDS * self.n_processes :].view(SIDE_FIELDS, self.n_processes)
        side.zero_()
        for field, value in enumerate(side_values):
            side[field, self.process_rank] = value
        all_reduce(buffer)
        if self.server_blocks is not None:
            rps.copy_packets(send, self.server_blocks.to(send.dtype), silent)
            self.server_blocks.copy_(send)
        if not self.in_place:
            blocks.copy_(send.expand_as(blocks))
        if kept is not None:
            blocks.view(-1, E).index_copy_(0, lost, kept)
        return side

    @torch.no_grad()
    def divergence(self, all_reduce: AllReduce) -> tuple[float, float]:
        """Replicas' spread over all workers: ``(rms_w ||v_w - mean||, ||mean||)``, in chunks through a small scratch."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.storage.device)  # ||mean||^2, sum_w ||v_w - mean||^2
        for chunk, mean in self._mean_chunks(all_reduce):
            sums[0] += mean.double().square().sum()
            sums[1] += (chunk.double() - mean.double()).square().sum()
        spread = sums[1:].clone()
        all_reduce(spread)
        return float(spread.div_(self.n_workers).sqrt_()), float(sums[0].sqrt())

    @torch.no_grad()
    def mean_model(self, all_reduce: AllReduce) -> Tensor:
        """The replicas' mean over all workers, ``(1/n) sum_w v_w``: the model the theory's bounds are about, flat
        (the parameters in ``named_parameters`` order, without the packet padding), float32, on the CPU."""
        out = torch.empty(self.layout.numel, dtype=torch.float32)
        start = 0
        for _, mean in self._mean_chunks(all_reduce):
            out[start : start + mean.numel()].copy_(mean)
            start += mean.numel()
        return out

    def _mean_chunks(self, all_reduce: AllReduce) -> Iterator[tuple[Tensor, Tensor]]:
        """``(this process's rows [k, c], the mean over all workers [c])`` for consecutive chunks of the model (every
        process must iterate them all: each chunk is one all_reduce)."""
        rows = self.storage[: self.k * self.layout.padded_numel].view(self.k, -1)[:, : self.layout.numel]
        numel = rows.shape[1]
        if self._spare is None:
            self._spare = torch.empty(min(DIVERGENCE_CHUNK, numel), dtype=torch.float32, device=rows.device)
        for start in range(0, numel, self._spare.numel()):
            chunk = rows[:, start : start + self._spare.numel()]
            spare = self._spare[: chunk.shape[1]]
            torch.sum(chunk, dim=0, dtype=torch.float32, out=spare)
            all_reduce(spare)
            spare.div_(self.n_workers)
            yield chunk, spare

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
