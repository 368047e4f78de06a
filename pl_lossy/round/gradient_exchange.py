"""One process's side of a gradient rule (``gradient``, ``zero_fill``, ``hadamard``): one all_reduce per round.

The rules' math is in :mod:`pl_lossy.round.aggregation`. Between the backward pass and the optimizer step:

1. *gather*: every trained parameter's gradient (``[k, ...]`` for ``k`` workers, or the module's own for
   ``k = 1``) is copied into its place in an fp32 buffer ``[k, S, P, E]`` laid out like the model (no
   gradient: zeros); ``hadamard`` then spreads every block in place;
2. this process's contribution to every server, ``send = sum_j w_j * g_j`` with the rule's uplink
   weights (``up / c`` or ``up / W``), into the wire buffer, with the side slots after it
   (see :mod:`pl_lossy.round.exchange`), and one all_reduce (sum) of it;
3. every worker takes the aggregate, except at the packets it misses (sparse): its own gradient there
   (``gradient``) or zeros (``zero_fill``, ``hadamard``); ``hadamard`` transforms back;
4. *scatter*: the result goes back into the parameters' ``.grad``, in their dtype.

Masks, weights and packet indices are built on the host and sent with non-blocking copies; the
Hadamard signs are drawn on the device from ``(seed, round)``: a round never waits for the device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import aggregation, rps
from .exchange import SIDE_FIELDS, AllReduce


class GradientExchange:
    """The gradient exchange of process ``process_rank`` (of ``n_processes``), hosting ``k`` workers whose
    trained tensors are ``params`` (each ``[k, *shape]``, or ``shape`` when ``k = 1``) at element
    ``offsets`` of a worker's flat model.

    Args:
        rule: one of :data:`pl_lossy.round.aggregation.GRADIENT_RULES`.
        seed: the run's seed, for ``hadamard``'s per-round signs.
    """

    def __init__(
        self,
        rule: str,
        params: Sequence[Tensor],
        offsets: Sequence[int],
        layout: rps.PacketLayout,
        process_rank: int,
        n_processes: int,
        workers_per_process: int = 1,
        colocated_servers: bool = True,
        seed: int = 0,
    ) -> None:
        if rule not in aggregation.GRADIENT_RULES:
            raise ValueError(f"a gradient exchange runs one of {aggregation.GRADIENT_RULES}, got {rule!r}")
        block = layout.packets_per_block * layout.elems_per_packet
        if rule == "hadamard" and block & (block - 1):
            raise ValueError(f"hadamard needs power-of-two blocks; the layout's are {block} elements (PacketLayout power_of_two_blocks)")
        self.rule, self.layout, self.k = rule, layout, workers_per_process
        self.params, self.offsets = list(params), list(offsets)
        self.process_rank, self.n_processes = process_rank, n_processes
        self.n_workers = n_processes * workers_per_process
        self.first_worker = process_rank * workers_per_process
        self.colocated_servers, self.seed = colocated_servers, seed
        self.identity = self.n_workers == 1 and colocated_servers
        device = self.params[0].device
        n = layout.padded_numel
        self.grads = torch.zeros(self.k, n, dtype=torch.float32, device=device)
        self._wire = torch.zeros(n + SIDE_FIELDS * n_processes, dtype=torch.float32, device=device)
        self._weights = torch.empty((self.k, *layout.shape[:2]), dtype=torch.float32)
        self._kept = torch.empty(0, layout.elems_per_packet, dtype=torch.float32, device=device)
        if rule == "hadamard":
            self._signs = torch.empty(layout.n_servers, block, dtype=torch.float32, device=device)
            self._scratch = torch.empty(self.k, layout.n_servers, block, dtype=torch.float32, device=device)
            self._generator = torch.Generator(device=device)

    def extra_bytes(self) -> int:
        """Memory the exchange holds besides the gradients themselves."""
        held = [self.grads, self._wire, self._kept] + ([self._signs, self._scratch] if self.rule == "hadamard" else [])
        return sum(t.numel() * t.element_size() for t in held)

    def _to_device(self, t: Tensor) -> Tensor:
        device = self.grads.device
        return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)

    def _gather(self) -> None:
        rows = self.grads
        rows[:, self.layout.numel :].zero_()  # the padding: the Hadamard transform's last round left values there
        for p, offset in zip(self.params, self.offsets):
            n = p.numel() // self.k
            if p.grad is None:
                rows[:, offset : offset + n].zero_()
            else:
                rows[:, offset : offset + n].copy_(p.grad.reshape(self.k, n))

    def _scatter(self, rows: Tensor) -> None:
        for p, offset in zip(self.params, self.offsets):
            if not p.requires_grad:
                continue
            n = p.numel() // self.k
            if p.grad is None:  # unused by this step here, but others' gradients arrived for it
                p.grad = torch.empty_like(p)
            p.grad.copy_(rows[:, offset : offset + n].view(p.shape))

    @torch.no_grad()
    def step(self, up: Tensor, down: Tensor, all_reduce: AllReduce, round_index: int,
             side_values: tuple[float, ...] = (0.0, 0.0)) -> Tensor:
        """Aggregate this round's gradients in place given the global masks (bool CPU ``[W, S, P]``, ``[S, W, P]``).

        Returns the side values ``[SIDE_FIELDS, n_processes]`` of every process."""
        if self.identity:  # one worker, its own server: nothing crosses the network (side values stay on the host)
            return torch.tensor(side_values, dtype=torch.float32).view(SIDE_FIELDS, 1)
        side = self._wire[self._wire.numel() - SIDE_FIELDS * self.n_processes :].view(SIDE_FIELDS, self.n_processes)
        first, k, lay = self.first_worker, self.k, self.layout
        self._gather()
        blocks = self.grads.view(k, lay.n_servers, -1)  # [k, S, P * E]
        if self.rule == "hadamard":
            aggregation.round_signs(self.seed, round_index, self._signs, self._generator)
            aggregation.spread_(blocks, self._signs, self._scratch)
        counts = rps.server_counts(up)
        if self.rule == "gradient":
            for j in range(k):
                rps.uplink_weights(up[first + j], counts, self._weights[j])
            missed_cpu = aggregation.missed_packets(down[:, first : first + k].transpose(0, 1), counts)
        else:
            for j in range(k):
                aggregation.zero_fill_weights(up[first + j], self.n_workers, self._weights[j])
            missed_cpu = aggregation.missed_packets(down[:, first : first + k].transpose(0, 1))
        weights = self._to_device(self._weights)
        missed = self._to_device(missed_cpu)
        g = self.grads.view(k, *lay.shape)
        send = self._wire[: lay.padded_numel].view(lay.shape)
        kept = None
        if self.rule == "gradient" and missed_cpu.numel():
            n = missed_cpu.numel()
            if n > self._kept.shape[0]:  # grows to the most packets ever missed in one round, then stays
                self._kept = torch.empty(max(n, 2 * self._kept.shape[0]), lay.elems_per_packet, dtype=torch.float32,
                                         device=self._kept.device)
            kept = torch.index_select(g.view(-1, lay.elems_per_packet), 0, missed, out=self._kept[:n])
        torch.mul(g[0], weights[0].unsqueeze(-1), out=send)
        for j in range(1, k):
            send.addcmul_(g[j], weights[j].unsqueeze(-1))
        side.zero_()
        for field, value in enumerate(side_values):
            side[field, self.process_rank] = value
        all_reduce(self._wire)
        if k == 1:  # the aggregate is this worker's: fix it up where it lies (one model-sized copy fewer)
            out = send.unsqueeze(0)
        else:
            g.copy_(send.expand_as(g))
            out = g
        if missed_cpu.numel():
            flat = out.reshape(-1, lay.elems_per_packet)  # a view: both are contiguous
            if kept is not None:
                flat.index_copy_(0, missed, kept)
            else:
                flat.index_fill_(0, missed, 0.0)
        if self.rule == "hadamard":
            aggregation.unspread_(out.view(k, lay.n_servers, -1), self._signs, self._scratch)
        self._scatter(out.view(k, -1))
        return side
